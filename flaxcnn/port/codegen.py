"""A captured model -> the text of ``model.py``: one NNX class per torch class.

Each custom-module instance gets its code from :class:`flaxcnn.port.ops.Body` (both modes) and
its ``__init__`` from its children. Instances of one torch class whose code has the same
structure become one NNX class; the literals they are configured with (:class:`~flaxcnn.port.
ops.Slots`) stay literals where every instance agrees and become ``__init__`` arguments where
they differ, one argument per distinct vector of values across instances, named after the
torch class's ``__init__`` parameter holding that value (``getattr(instance, name)``) when there
is one, else after the first layer option it sets (``conv1_out_channels``). Instances whose
code differs in structure (a block with a downsample and one without) become numbered variants
(``BasicBlock``, ``BasicBlock2``).
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from dataclasses import dataclass, field

from torch import nn

from flaxcnn.port.capture import Capture, Instance, indexed, is_custom
from flaxcnn.port.errors import UnsupportedModelError, UnsupportedNode
from flaxcnn.port.layers import LAYERS, compact, layer_spec
from flaxcnn.port.body import Body
from flaxcnn.port.code import REQUIRED, TOKEN_RE, ChildCtor, ContainerCtor, FnAttrs, LayerCtor, Slots, layer_ctor
from flaxcnn.port.ops import RESERVED, SUPPORTED, rank_of

INDENT = "    "
MAX_LINE = 110


def literal_text(value) -> str:
    if isinstance(value, float) and value != value:
        return "float('nan')"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return f"float({str(value)!r})"
    if isinstance(value, tuple):
        return "(" + ", ".join(literal_text(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def init_parameter_hints(cls: type) -> dict[str, str]:
    """``{slot name: __init__ parameter}`` for layer options the torch class's ``__init__`` passes a
    parameter to unchanged (``self.conv1 = nn.Conv2d(in_planes, planes, stride=stride)`` gives
    ``conv1_in_channels: in_planes``, ``conv1_out_channels: planes``, ``conv1_stride: stride``), read
    from its source; {} where the source cannot be read. Only names come from it: every value is
    the traced module's own."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return {}
    func = tree.body[0]
    if not isinstance(func, ast.FunctionDef):
        return {}
    params = {a.arg for a in func.args.args + func.args.kwonlyargs} - {"self"}
    specs = {t.__name__: spec for t, spec in LAYERS.items()}
    hints: dict[str, str] = {}

    def join(prefix: str, name) -> str:
        return f"{prefix}_{name}" if prefix else str(name)

    def visit(call: ast.Call, prefix: str) -> None:
        func_name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
        if func_name in ("Sequential", "__init__"):
            for i, a in enumerate(call.args):
                if isinstance(a, ast.Call):
                    visit(a, join(prefix, i))
            return
        spec = specs.get(func_name)
        if spec is None:
            return
        for i, a in enumerate(call.args):
            if isinstance(a, ast.Name) and a.id in params and i < len(spec.params):
                hints.setdefault(join(prefix, spec.params[i].name), a.id)
        for kw in call.keywords:
            if kw.arg and isinstance(kw.value, ast.Name) and kw.value.id in params:
                hints.setdefault(join(prefix, kw.arg), kw.value.id)

    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.value, ast.Call):
            target = node.targets[0]
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                visit(node.value, target.attr)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and \
                isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "__init__":
            visit(node.value, "")  # super().__init__(layers...) of an nn.Sequential subclass
    return hints


def _key(value) -> str:
    """Equality of slot values that tells True from 1 and 1 from 1.0."""
    return f"{type(value).__name__}:{value!r}"


@dataclass
class InstanceCode:
    inst: Instance
    slots: Slots
    init: list[tuple[str, object]]  # (attribute, ctor) in torch's child order, then functional attrs
    params: list[str]
    lines: list[str]  # __call__ body, slot tokens inside
    deterministic: bool
    uses_f: bool
    uses_jax: bool
    signature: str = ""
    children_done: bool = False


@dataclass
class Arg:
    name: str
    slots: list[int]
    stored: bool = False  # used in __call__: kept as self.<name>


@dataclass
class Variant:
    name: str
    torch_class: type
    codes: list[InstanceCode]
    is_top: bool
    args: list[Arg] = field(default_factory=list)
    literal: dict[int, str] = field(default_factory=dict)  # slot -> text where constant
    omitted: set[int] = field(default_factory=set)  # constant default keyword slots
    lifted: bool = False


class Generator:
    """Builds every instance's code, groups variants, lifts arguments and renders the file."""

    def __init__(self, capture: Capture, class_name: str | None, loss: str):
        self.capture, self.loss = capture, loss
        self.top_name = class_name or type(capture.root).__name__
        self.unsupported: list[UnsupportedNode] = []
        self.codes: dict[str, InstanceCode] = {}
        self.variants: list[Variant] = []
        self.variant_of: dict[str, Variant] = {}

    # --- per instance -------------------------------------------------------------------------

    def call_rank(self, inst: Instance, target: str) -> int | None:
        for graph in inst.graphs.values():
            for node in graph.nodes:
                if node.op == "call_module" and node.target == target and node.args:
                    return rank_of(node.args[0])
        return None

    def ctor(self, inst: Instance, module: nn.Module, target: str, slots: Slots):
        path = inst.child_path(target)
        if is_custom(module):
            return ChildCtor(path)
        if isinstance(module, nn.Sequential):
            return ContainerCtor("Sequential" if indexed(module) else "Dict",
                                 [(n, self.ctor(inst, m, f"{target}.{n}", slots)) for n, m in module.named_children()])
        if isinstance(module, nn.ModuleList):
            return ContainerCtor("List", [(n, self.ctor(inst, m, f"{target}.{n}", slots))
                                          for n, m in module.named_children()])
        if isinstance(module, nn.ModuleDict):
            return ContainerCtor("Dict", [(n, self.ctor(inst, m, f"{target}.{n}", slots))
                                          for n, m in module.named_children()])
        if is_custom(module):
            return ChildCtor(path)
        if layer_spec(module) is None:
            called = any(n.op == "call_module" and n.target == target for g in inst.graphs.values() for n in g.nodes)
            if not called:  # a called one is reported where it is called, with its source line
                t = type(module)
                self.unsupported.append(UnsupportedNode(inst.path, f"module {path} ({t.__module__}.{t.__qualname__})",
                                                        ""))
            return LayerCtor("Identity", [], False, False)
        return layer_ctor(module, target.replace(".", "_"), self.call_rank(inst, target), slots)

    def build(self, inst: Instance) -> InstanceCode:
        slots, fn_attrs = Slots(), FnAttrs()
        own = [n for n, _ in inst.module.named_parameters(recurse=False)] + \
              [n for n, _ in inst.module.named_buffers(recurse=False)]
        for name in own:
            self.unsupported.append(UnsupportedNode(
                inst.path, f"tensor {inst.child_path(name)} held by custom class {inst.class_name} "
                "(only the listed layers' weights can be ported)", ""))
        init = [(n, self.ctor(inst, m, n, slots)) for n, m in inst.module.named_children()]
        if not inst.called:  # its layers are built (the state dict has them); no graph to translate
            params = [n.target for n in inst.graphs["eval"].nodes if n.op == "placeholder"]
            return InstanceCode(inst, slots, init, [str(p).lstrip("*") for p in params],
                                [f"raise NotImplementedError('{inst.class_name} at {inst.path} is never called by "
                                 "the traced forward, so the port has no code for it')"], False, False, False)
        bodies = {}
        for mode in ("train", "eval"):
            found: list[UnsupportedNode] = []
            body = Body(inst, inst.graphs[mode], slots, fn_attrs, inst.path == "", found)
            body.emit()
            bodies[mode] = body
            self.unsupported += [u for u in found if u not in self.unsupported]
        train, ev = bodies["train"], bodies["eval"]
        differ = self.resolved(train.lines, slots) != self.resolved(ev.lines, slots)
        if differ:
            lines = ["if self.deterministic:  # eval mode (model.eval())"] + [INDENT + ln for ln in ev.lines] + \
                    ["else:"] + [INDENT + ln for ln in train.lines]
        else:
            lines = train.lines
        init += list(fn_attrs.ctors.items())
        return InstanceCode(inst, slots, init, train.params, lines, differ, train.uses_f or ev.uses_f,
                            train.uses_jax or ev.uses_jax)

    @staticmethod
    def resolved(lines: list[str], slots: Slots) -> list[str]:
        return [TOKEN_RE.sub(lambda m: _key(slots.items[int(m.group(1))].value), ln) for ln in lines]

    def signature(self, code: InstanceCode) -> str:
        if code.signature:
            return code.signature

        def ctor_sig(c) -> str:
            if isinstance(c, LayerCtor):
                return f"{c.nnx_name}({[(k, i) for k, i in c.args]})"
            if isinstance(c, ChildCtor):
                return "<" + self.signature(self.codes[c.path]) + ">"
            return f"{c.kind}[" + ",".join(f"{n}={ctor_sig(x)}" for n, x in c.items) + "]"

        t = type(code.inst.module)
        code.signature = "|".join([f"{t.__module__}.{t.__qualname__}", str(code.inst.path == "")]
                                  + [f"{n}={ctor_sig(c)}" for n, c in code.init] + code.params + code.lines)
        return code.signature

    # --- variants and arguments -----------------------------------------------------------------

    def group(self) -> None:
        by_sig: dict[str, Variant] = {}
        names_used: set[str] = {self.top_name} | RESERVED
        counts: dict[str, int] = {}
        for path, code in self.codes.items():
            sig = self.signature(code)
            variant = by_sig.get(sig)
            if variant is None:
                base = self.top_name if path == "" else code.inst.class_name
                k = counts.get(base, 0) + 1
                counts[base] = k
                name = base if k == 1 else f"{base}{k}"
                while path != "" and name in names_used:
                    k += 1
                    counts[base] = k
                    name = f"{base}{k}"
                names_used.add(name)
                variant = by_sig[sig] = Variant(name, type(code.inst.module), [], path == "")
                self.variants.append(variant)
            variant.codes.append(code)
            self.variant_of[path] = variant

    def child_ctors(self, ctor) -> list[ChildCtor]:
        if isinstance(ctor, ChildCtor):
            return [ctor]
        if isinstance(ctor, ContainerCtor):
            return [c for _, x in ctor.items for c in self.child_ctors(x)]
        return []

    def arg_values(self, path: str) -> list:
        """The argument values the child instance at ``path`` is constructed with."""
        variant = self.variant_of[path]
        self.lift(variant)
        code = self.codes[path]
        return [code.slots.items[a.slots[0]].value for a in variant.args]

    def add_child_slots(self, code: InstanceCode) -> None:
        if code.children_done:
            return
        code.children_done = True
        for attr, ctor in code.init:
            for child in self.child_ctors(ctor):
                variant = self.variant_of[child.path]
                values = self.arg_values(child.path)
                child.arg_slots = [len(code.slots.items) + k for k in range(len(values))]
                relative = child.path[len(code.inst.path) + 1:] if code.inst.path else child.path
                for a, v in zip(variant.args, values):
                    code.slots.token(v, f"{relative.replace('.', '_')}_{a.name}")

    def used_slots(self, code: InstanceCode) -> tuple[set[int], set[int]]:
        """(slots the constructors use, slots __call__ uses)."""
        in_init: set[int] = set()

        def walk(c):
            if isinstance(c, LayerCtor):
                in_init.update(i for _, i in c.args)
            elif isinstance(c, ChildCtor):
                in_init.update(c.arg_slots)
            elif isinstance(c, ContainerCtor):
                for _, x in c.items:
                    walk(x)

        for _, c in code.init:
            walk(c)
        in_call = {int(m.group(1)) for ln in code.lines for m in TOKEN_RE.finditer(ln)}
        return in_init, in_call

    def lift(self, variant: Variant) -> None:
        if variant.lifted:
            return
        variant.lifted = True
        for code in variant.codes:
            self.add_child_slots(code)
        first = variant.codes[0]
        in_init, in_call = self.used_slots(first)
        hints = init_parameter_hints(variant.torch_class)
        groups: dict[tuple, Arg] = {}
        for j in sorted(in_init | in_call):
            values = [c.slots.items[j].value for c in variant.codes]
            keys = tuple(_key(v) for v in values)
            slot = first.slots.items[j]
            if len(set(keys)) == 1:
                variant.literal[j] = literal_text(values[0])
                if slot.default is not REQUIRED and _key(slot.default) == keys[0]:
                    variant.omitted.add(j)
                continue
            arg = groups.get(keys)
            if arg is None:
                arg = groups[keys] = Arg("", [])
            arg.slots.append(j)
            arg.stored = arg.stored or j in in_call
        variant.args = list(groups.values())
        taken = RESERVED | {n for n, _ in first.init}
        for arg in variant.args:
            values = [c.slots.items[arg.slots[0]].value for c in variant.codes]
            arg.name = self.arg_name(variant, values, [first.slots.items[j].name for j in arg.slots], taken, hints)
            taken = taken | {arg.name}

    def arg_name(self, variant: Variant, values: list, slot_names: list[str], taken: set[str],
                 hints: dict[str, str]) -> str:
        """The torch __init__ parameter stored under its own name with these values, else the one
        the torch __init__ passes to one of these slots, else the first slot's name."""
        try:
            params = [p for p in inspect.signature(variant.torch_class.__init__).parameters if p != "self"]
        except (TypeError, ValueError):
            params = []
        missing = object()
        for p in params:
            found = [getattr(c.inst.module, p, missing) for c in variant.codes]
            if all(f is not missing and _key(compact(f)) == _key(v) for f, v in zip(found, values)) and p not in taken:
                return p
        for name in slot_names:
            if hints.get(name) is not None and hints[name] not in taken:
                return hints[name]
        fallback = re.sub(r"(^|_)(\d)", r"\1layer\2", slot_names[0])  # "0_in_channels" -> "layer0_in_channels"
        name, k = fallback, 2
        while name in taken:
            name, k = f"{fallback}_{k}", k + 1
        return name

    # --- rendering ---------------------------------------------------------------------------

    def slot_text(self, variant: Variant, j: int, in_call: bool) -> str:
        if j in variant.literal:
            return variant.literal[j]
        for a in variant.args:
            if j in a.slots:
                return f"self.{a.name}" if in_call else a.name
        raise AssertionError(f"slot {j} of {variant.name} neither literal nor argument")

    def render_ctor(self, variant: Variant, ctor, depth: int) -> str:
        if isinstance(ctor, LayerCtor):
            parts = []
            for kw, j in ctor.args:
                if kw is not None and j in variant.omitted:
                    continue
                text = self.slot_text(variant, j, False)
                parts.append(text if kw is None else f"{kw}={text}")
            if ctor.dtype:
                parts.append("dtype=dtype")
            if ctor.rngs:
                parts.append("rngs=rngs")
            return f"N.{ctor.nnx_name}({', '.join(parts)})"
        if isinstance(ctor, ChildCtor):
            child = self.variant_of[ctor.path]
            parts = [self.slot_text(variant, j, False) for j in ctor.arg_slots]
            return f"{child.name}({', '.join(parts + ['dtype=dtype', 'rngs=rngs'])})"
        items = [(n, self.render_ctor(variant, c, depth + 1)) for n, c in ctor.items]
        pad = INDENT * (depth + 3)
        end = INDENT * (depth + 2)
        if ctor.kind == "Sequential":
            inner = [t for _, t in items]
            opening, closing = "nnx.Sequential(", ")"
        elif ctor.kind == "List":
            inner = [t for _, t in items]
            opening, closing = "nnx.List([", "])"
        else:
            inner = [f"{n!r}: {t}" for n, t in items]
            opening, closing = "nnx.Dict({", "})"
        flat = opening + ", ".join(inner) + closing
        if len(flat) + len(end) + 20 <= MAX_LINE or not inner:
            return flat
        return opening + "\n" + "".join(f"{wrap(pad + t)},\n" for t in inner) + end + closing

    def render_class(self, variant: Variant) -> list[str]:
        code = variant.codes[0]
        t = variant.torch_class
        # an nn.Sequential (subclass) is an nnx.Sequential (its children keep their indices as keys)
        top_sequential = indexed(code.inst.module)
        inherit_call = top_sequential and not variant.is_top and type(code.inst.module).forward is nn.Sequential.forward
        out = [f"class {variant.name}({'nnx.Sequential' if top_sequential else 'nnx.Module'}):",
               f'{INDENT}"""{t.__qualname__} (torch: {t.__module__}.{t.__qualname__})'
               + (f", {len(variant.codes)} instances" if len(variant.codes) > 1 else "") + '."""', ""]
        if variant.is_top:
            chw = tuple(self.capture.input_chw)
            out += [f"{INDENT}input_chw = {literal_text(chw)}", f'{INDENT}loss = "{self.loss}"', ""]
        args = [a.name for a in variant.args]
        out.append(wrap(f"{INDENT}def __init__(self, {''.join(a + ', ' for a in args)}dtype=jnp.float32, *, "
                        "rngs: nnx.Rngs):"))
        body = [f"self.{a.name} = {a.name}" for a in variant.args if a.stored]
        if top_sequential:
            items = ContainerCtor("Sequential", [(n, c) for n, c in code.init if n.isdigit()])
            body.append("super().__init__" + self.render_ctor(variant, items, 0)[len("nnx.Sequential"):])
        for attr, ctor in code.init:
            if not (top_sequential and attr.isdigit()):
                body.append(f"self.{attr} = {self.render_ctor(variant, ctor, 0)}")
        if code.deterministic:
            body.append("self.deterministic = False  # model.eval() sets it: the eval-mode graph differs")
        if not body:
            body = ["pass"]
        out += [wrap(INDENT * 2 + ln) for ln in body]
        if inherit_call:  # nnx.Sequential's __call__ chains the layers as torch's forward does
            return out
        out += ["", f"{INDENT}def __call__(self, {', '.join(code.params)}):"]
        for ln in code.lines:
            text = TOKEN_RE.sub(lambda m: self.slot_text(variant, int(m.group(1)), True), ln)
            out.append(wrap(INDENT * 2 + text))
        return out

    def generate(self) -> str:
        for path, inst in self.capture.instances.items():
            self.codes[path] = self.build(inst)
        if self.unsupported:
            raise UnsupportedModelError(type(self.capture.root).__name__, self.unsupported, SUPPORTED)
        self.group()
        for variant in self.variants:
            self.lift(variant)
        order = self.definition_order()
        uses_f = any(c.uses_f for c in self.codes.values())
        uses_jax = any(c.uses_jax for c in self.codes.values())
        head = [f'"""{self.top_name}, ported from PyTorch by `flaxcnn port`.',
                "",
                "NCHW in (transposed once to NHWC inside), 4-D outputs NCHW; attributes are named like the torch",
                "modules, so a torch state_dict loads one key to one variable:",
                "    model = flaxcnn.port.load(DIR)  # this class + DIR/weights.npz (float32; dtype=jnp.float64 too)",
                '"""', "",
                *(["import jax"] if uses_jax else []), "import jax.numpy as jnp", "from flax import nnx", "",
                *(["from flaxcnn.models import functional as F"] if uses_f else []),
                "from flaxcnn.models import nn as N", ""]
        lines = head
        for variant in order:
            lines += ["", *self.render_class(variant), ""]
        return "\n".join(lines).rstrip() + "\n"

    def definition_order(self) -> list[Variant]:
        """Children before the classes that build them; the top class last."""
        seen: list[Variant] = []

        def visit(variant: Variant):
            if variant in seen:
                return
            for code in variant.codes[:1]:
                for _, ctor in code.init:
                    for child in self.child_ctors(ctor):
                        visit(self.variant_of[child.path])
            seen.append(variant)

        visit(self.variant_of[""])
        return seen


def _split_top(text: str) -> list[str]:
    parts, depth, current, quote = [], 0, "", None
    for ch in text:
        if quote:
            current += ch
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def wrap(line: str) -> str:
    """A long ``name = f(a, b, ...)`` line as a call with its arguments on continuation lines."""
    if len(line) <= MAX_LINE or "\n" in line:
        return line
    suffix = ":" if line.endswith("):") else ""  # a def line
    line = line[:-1] if suffix else line
    indent = line[: len(line) - len(line.lstrip())]
    opening = line.find("(")
    if opening < 0 or not line.endswith(")"):
        return line + suffix
    depth = 0
    for i in range(opening, len(line)):
        depth += {"(": 1, ")": -1}.get(line[i], 0)
        if depth == 0 and i != len(line) - 1:
            return line + suffix  # the first call does not span the line
    args = _split_top(line[opening + 1:-1])
    pad = indent + INDENT
    rows, row = [], ""
    for a in args:
        piece = a + ","
        if row and len(pad) + len(row) + 1 + len(piece) > MAX_LINE:
            rows.append(row)
            row = piece
        else:
            row = f"{row} {piece}" if row else piece
    rows.append(row.rstrip(","))
    return line[: opening + 1] + "\n" + "\n".join(pad + r for r in rows) + ")" + suffix


def generate(capture: Capture, *, class_name: str | None = None, loss: str = "cross_entropy") -> str:
    """The text of model.py for ``capture`` (see the module docstring)."""
    return Generator(capture, class_name, loss).generate()


__all__ = ["generate", "Generator", "wrap", "literal_text"]
