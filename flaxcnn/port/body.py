"""One traced graph -> the lines of an NNX ``__call__``, node by node (:class:`Body`).

Each node becomes one assignment; what each operation turns into is :mod:`flaxcnn.port.ops`'s.
Variable names come from the graph: a value read once, by the next operation, keeps its
variable (``x = self.conv1(x)``); a value read again later keeps its own, and a new one is named
after the module or operation that makes it. A whole ``nn.Sequential`` called as a chain is one
call; tuples read element by element are unpacked (``x1, x2 = jnp.split(...)``, ``n, h, w, c =
x.shape``).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from flaxcnn.port.capture import Instance, indexed, is_custom, node_source
from flaxcnn.port.code import FnAttrs, Slots
from flaxcnn.port.errors import UnsupportedNode
from flaxcnn.port.layers import layer_spec
from flaxcnn.port.ops import (BINARY, BINARY_FUNCTIONS, DTYPES, FUNCTIONS, METHODS, Q4, RESERVED, UNARY,
                              UNARY_FUNCTIONS, Multi, Unsupported, atomic, logical, multi_length, qualified,
                              rank_of, tensor_meta, tuple_text)


@dataclass
class Body:
    """Generates the ``__call__`` lines of one graph (one instance, one mode)."""

    inst: Instance
    graph: fx.Graph
    slots: Slots
    fn_attrs: FnAttrs
    is_top: bool
    unsupported: list[UnsupportedNode]
    lines: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    uses_f: bool = False
    uses_jax: bool = False

    def __post_init__(self):
        self.nodes = list(self.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.var: dict[fx.Node, str] = {}
        self.var_nodes: dict[str, list[fx.Node]] = {}
        self.taken: set[str] = set(RESERVED)
        self.pending_empty: dict[fx.Node, tuple[str, str]] = {}  # torch.empty(...) etc.: (shape, dtype) texts
        self.pending_fill: dict[fx.Node, float] = {}  # torch.full(...): the fill value
        self.last_use = {n: max([self.index[u] for u in n.users] or [self.index[n]]) for n in self.nodes}
        self.done: set[fx.Node] = set()
        self.fn_attrs.new_body()

    # --- names -----------------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        base = re.sub(r"\W", "_", base).strip("_") or "v"
        if base[0].isdigit():
            base = "v" + base
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def bind_var(self, node: fx.Node, name: str) -> None:
        self.var[node] = name
        self.var_nodes.setdefault(name, []).append(node)

    def reusable(self, node: fx.Node) -> str | None:
        """The variable of ``node``'s first tensor input when nothing reads it after ``node``."""
        here = self.index[node]
        for a in node.all_input_nodes:
            name = self.var.get(a)
            if name is None or not name.isidentifier() or tensor_meta(a) is None:
                return None
            # a value read once, here, is renamed in place (x = self.conv1(x)); a branch point
            # (x feeding conv1 and a shortcut) keeps its name and each branch gets its own
            single = all(len(n.users) <= 1 for n in self.var_nodes.get(name, []))
            if single and all(self.last_use[n] <= here for n in self.var_nodes.get(name, [])):
                return name
            return None
        return None

    def base_name(self, node: fx.Node) -> str:
        if node.op == "call_module":
            module = self.inst.module.get_submodule(node.target)
            parts = node.target.split(".")
            if len(parts) > 1 and isinstance(self.inst.module.get_submodule(".".join(parts[:-1])),
                                             (nn.ModuleList, nn.ModuleDict)):
                return "_".join(parts)  # downs_0, downs_1: one name per element
            return parts[0] if (is_custom(module) or len(parts) > 1) else "out"
        name = re.sub(r"_\d+$", "", node.name)
        return {"getitem": "part", "getattr": "attr", "bernoulli_": "noise"}.get(name, name)

    def assign(self, node: fx.Node, expr: str, *, force: str | None = None) -> str:
        name = force or self.reusable(node) or self.fresh(self.base_name(node))
        self.lines.append(f"{name} = {expr}")
        self.bind_var(node, name)
        return name

    # --- values ----------------------------------------------------------------------------

    def val(self, a) -> str:
        if isinstance(a, fx.Node):
            if a in self.pending_empty:
                raise Unsupported("torch.empty(...) used other than by .bernoulli_(p)")
            if a not in self.var:
                raise Unsupported(f"a value of unsupported node {a.name}")
            return self.var[a]
        if isinstance(a, tuple):
            return tuple_text(self.val(v) for v in a)
        if isinstance(a, list):
            return "[" + ", ".join(self.val(v) for v in a) + "]"
        if isinstance(a, slice):
            parts = ["" if v is None else self.val(v) for v in (a.start, a.stop, a.step)]
            return f"{parts[0]}:{parts[1]}" + (f":{parts[2]}" if a.step is not None else "")
        if isinstance(a, torch.dtype):
            if a not in DTYPES:
                raise Unsupported(f"dtype {a}")
            return DTYPES[a]
        if isinstance(a, torch.device):
            return "None"
        if a is Ellipsis:
            return "..."
        if isinstance(a, float) and not math.isfinite(a):
            return f"float({str(a)!r})"
        if isinstance(a, torch.Tensor):
            raise Unsupported("a tensor constant")
        return repr(a)

    def lit(self, value, name: str) -> str:
        """A literal the class may lift into an argument (numbers, tuples of numbers, ...)."""
        if isinstance(value, (bool, int, float, str, type(None))) or (
                isinstance(value, tuple) and all(isinstance(v, (bool, int, float)) for v in value)):
            return self.slots.token(value, name)
        return self.val(value)

    def tensor(self, a) -> bool:
        return isinstance(a, fx.Node) and tensor_meta(a) is not None

    # --- driving -----------------------------------------------------------------------------

    def emit(self) -> list[str]:
        for i, node in enumerate(self.nodes):
            if node in self.done:
                continue
            try:
                self.node(node, i)
            except Unsupported as why:
                self.unsupported.append(UnsupportedNode(self.inst.path, f"{self.describe(node)}: {why}"
                                                        if str(why) else self.describe(node), node_source(node)))
                self.var.setdefault(node, "<unsupported>")
            except (TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
                # arguments of a form no rule expects (a supported op called in an unusual way)
                self.unsupported.append(UnsupportedNode(
                    self.inst.path, f"{self.describe(node)}: arguments of a form the port does not translate "
                    f"({type(error).__name__}: {error})", node_source(node)))
                self.var.setdefault(node, "<unsupported>")
        return self.lines

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            module = self.inst.module.get_submodule(node.target)
            t = type(module)
            own = getattr(nn, t.__name__, None) is t
            name = f"torch.nn.{t.__name__}" if own else f"{t.__module__}.{t.__qualname__}"
            return f"call_module {self.inst.child_path(node.target)} ({name})"
        if node.op == "call_method":
            return f"call_method Tensor.{node.target}"
        if node.op == "call_function":
            return f"call_function {qualified(node.target)}"
        return f"{node.op} {node.target}"

    def node(self, node: fx.Node, i: int) -> None:
        if node.op == "placeholder":
            if str(node.target).startswith("*"):
                raise Unsupported("*args/**kwargs in forward")
            target = str(node.target)
            name = self.fresh(target if target not in RESERVED else "x")  # Sequential's `input`
            self.params.append(name if not node.args else f"{name}={self.val(node.args[0])}")
            self.bind_var(node, name)
            if self.is_top and rank_of(node) == 4:
                self.lines.append(f"{name} = N.nchw_to_nhwc({name})  # NCHW in, NHWC inside")
            return
        if node.op == "output":
            self.lines.append("return " + self.output(node.args[0]))
            return
        if node.op == "get_attr":
            raise Unsupported("a parameter or buffer used directly (only layers' own weights can be ported)")
        if node.op == "call_module":
            result = self.call_module(node, i)
        elif node.op == "call_method":
            result = self.call_method(node)
        else:
            result = self.call_function(node)
        if result is None or node in self.var:
            return
        if isinstance(result, Multi):
            self.multi(node, result)
        else:
            self.assign(node, result, force=self.inplace_target(node))

    def inplace_target(self, node: fx.Node) -> str | None:
        """The variable an in-place operation writes (torch's ``x.add_(y)``, ``inplace=True``)."""
        inplace = (node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__")) \
            or node.kwargs.get("inplace") is True
        if node.op == "call_module":
            inplace = getattr(self.inst.module.get_submodule(node.target), "inplace", False) is True
        first = node.args[0] if node.args else None
        if inplace and isinstance(first, fx.Node) and first in self.var and self.var[first].isidentifier():
            return self.var[first]
        return None

    def multi(self, node: fx.Node, m: Multi) -> None:
        users = list(node.users)
        if users and all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                         and u.args[0] is node for u in users):
            by_index: dict[int, list[fx.Node]] = {}
            for u in users:
                by_index.setdefault(u.args[1] % m.length, []).append(u)
            if m.kind == "shape" and m.rank == 4:
                bases = ["n", "c", "h", "w"]
            elif m.kind == "shape":
                bases = [f"d{k}" for k in range(m.length)]
            else:
                first = node.args[0] if node.args else None
                stem = self.var.get(first, "x") if isinstance(first, fx.Node) else "x"
                stem = stem if stem.isidentifier() else "x"
                bases = [f"{stem}{k + 1}" for k in range(m.length)]
            names = [self.fresh(bases[k]) if k in by_index else "_" for k in range(m.length)]
            for k, us in by_index.items():
                for u in us:
                    self.bind_var(u, names[k])
                    self.done.add(u)
            if m.phys_unpack is not None:
                phys = [names[Q4[k]] for k in range(4)]
                self.lines.append(f"{', '.join(phys)} = {m.phys_unpack}")
            else:
                self.lines.append(f"{', '.join(names)}{',' if m.length == 1 else ''} = {m.expr}")
            self.bind_var(node, "<unpacked>")
        else:
            self.assign(node, m.expr)

    def output(self, out) -> str:
        if isinstance(out, (tuple, list)):
            return tuple_text(self.output(o) for o in out)
        if isinstance(out, dict):
            raise Unsupported("a dict output")
        text = self.val(out)
        return f"N.nhwc_to_nchw({text})" if self.is_top and rank_of(out) == 4 else text

    # --- modules -------------------------------------------------------------------------------

    def access(self, target: str) -> str:
        """``self.<...>`` for a dotted torch path: containers by index/key, modules by attribute."""
        expr, module = "self", self.inst.module
        for part in target.split("."):
            if isinstance(module, nn.Sequential) and indexed(module):
                expr += f".layers[{part}]"
            elif isinstance(module, nn.Sequential) and not is_custom(module):
                expr += f"[{part!r}]"  # a named nn.Sequential is an nnx.Dict
            elif isinstance(module, nn.ModuleList):
                expr += f"[{part}]"
            elif isinstance(module, nn.ModuleDict):
                expr += f"[{part!r}]"
            else:
                expr += f".{part}"
            module = module.get_submodule(part)
        return expr

    def sequential_leaves(self, prefix: str) -> list[str] | None:
        module = self.inst.module.get_submodule(prefix)
        out = []
        for name, child in module.named_children():
            if isinstance(child, nn.Sequential) and not is_custom(child):
                if not indexed(child):
                    return None
                inner = self.sequential_leaves(f"{prefix}.{name}")
                if inner is None:
                    return None
                out += inner
            elif isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                return None
            else:
                out.append(f"{prefix}.{name}")
        return out

    def collapse(self, node: fx.Node, i: int) -> tuple[str, fx.Node] | None:
        """(container path, last node) when ``node`` starts a whole nn.Sequential called as a chain."""
        parts = node.target.split(".")
        module = self.inst.module
        for j in range(1, len(parts)):
            module = module.get_submodule(parts[j - 1])
            if not indexed(module) or is_custom(module):
                continue
            prefix = ".".join(parts[:j])
            leaves = self.sequential_leaves(prefix)
            if not leaves:
                continue
            chain = self.nodes[i:i + len(leaves)]
            ok = len(chain) == len(leaves) and all(
                n.op == "call_module" and n.target == t and not n.kwargs and len(n.args) == 1
                for n, t in zip(chain, leaves))
            ok = ok and all(chain[k + 1].args[0] is chain[k] and list(chain[k].users) == [chain[k + 1]]
                            for k in range(len(chain) - 1))
            if ok:
                return prefix, chain[-1]
        return None

    def call_module(self, node: fx.Node, i: int):
        module = self.inst.module.get_submodule(node.target)
        collapsed = self.collapse(node, i) if "." in node.target else None
        if collapsed is not None:
            prefix, last = collapsed
            for n in self.nodes[i:self.index[last] + 1]:
                self.done.add(n)
            self.done.discard(node)
            expr = f"{self.access(prefix)}({self.val(node.args[0])})"
            name = self.reusable(node) or self.fresh(prefix.split(".")[0] if self.index[last] > i else "out")
            self.lines.append(f"{name} = {expr}")
            for n in self.nodes[i:self.index[last] + 1]:
                self.bind_var(n, name)
            return None
        args = [self.val(a) for a in node.args] + [f"{k}={self.val(v)}" for k, v in node.kwargs.items()]
        call = f"{self.access(node.target)}({', '.join(args)})"
        if is_custom(module):
            length = multi_length(node)
            return Multi(call, length) if length is not None else call
        spec = layer_spec(module)
        if spec is None:
            raise Unsupported("")
        if isinstance(module, nn.Linear) and rank_of(node.args[0]) == 4:
            x = self.val(node.args[0])
            return f"N.nchw_to_nhwc({self.access(node.target)}(N.nhwc_to_nchw({x})))"
        length = multi_length(node)
        return Multi(call, length) if length is not None else call

    # --- functions and methods -----------------------------------------------------------------

    def call_method(self, node: fx.Node):
        name = node.target
        base = name[:-1] if name.endswith("_") and not name.endswith("__") else name
        handler = METHODS.get(base)
        if handler is None:
            raise Unsupported("")
        return handler(self, node, base)

    def call_function(self, node: fx.Node):
        target = node.target
        if target in UNARY_FUNCTIONS:
            return self.unary(node, UNARY_FUNCTIONS[target])
        if target in BINARY_FUNCTIONS:
            return self.binary(node, BINARY_FUNCTIONS[target])
        handler = FUNCTIONS.get(target)
        if handler is None:
            raise Unsupported("")
        return handler(self, node)

    def unary(self, node: fx.Node, name: str) -> str:
        template = UNARY[name]
        if template.startswith("F."):
            self.uses_f = True
        if template.startswith("jax."):
            self.uses_jax = True
        x = self.val(node.args[0])
        return template.format(atomic(x) if template == "-{}" else x)

    def operand(self, a, out_rank: int | None, name: str) -> str:
        if not self.tensor(a):
            return atomic(self.lit(a, name) if not isinstance(a, fx.Node) else self.val(a))
        r, e = rank_of(a), self.var.get(a, None)
        e = self.val(a)
        if out_rank == 4:
            if r in (4, 0):
                return atomic(e)
            return f"N.nchw_to_nhwc(jnp.reshape({e}, {(1,) * (4 - r)} + {e}.shape))"
        return atomic(logical(e, r))

    def binary(self, node: fx.Node, name: str) -> str:
        if name in ("add", "sub") and "alpha" in node.kwargs:
            raise Unsupported("alpha=")
        if name == "div" and node.kwargs.get("rounding_mode") is not None:
            raise Unsupported("rounding_mode=")
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if not self.tensor(a) and not self.tensor(b):  # Python arithmetic on sizes
            return f"{atomic(self.val(a))} {BINARY[name]} {atomic(self.val(b))}"
        out = rank_of(node)
        return f"{self.operand(a, out, node.name + '_a')} {BINARY[name]} {self.operand(b, out, node.name + '_b')}"



__all__ = ["Body"]
