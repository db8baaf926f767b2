"""One traced graph -> straight-line NNX ``__call__`` code, node by node.

Layout: inside a port, a 4-D activation is NHWC (flaxcnn's convention, see
:mod:`flaxcnn.models.nn`); every other rank is in torch's layout. fx's shapes are torch's, so
each operation that names dims translates them for 4-D tensors (torch dim ``d`` is NHWC axis
``(0, 3, 1, 2)[d]``): cat, mean/sum, chunk/split, softmax, slicing, permute/transpose, shape
reads. Reshapes from or to 4-D go through NCHW (transpose, reshape, transpose back), as a
reshape's element order is torch's. Broadcasting a 4-D tensor with a lower-rank one aligns the
lower-rank one to torch's (N, C, H, W) first.

Literals a layer or an operation is configured with (channels, strides, dropout rates, reshape
sizes) are *slots* (:class:`Slots`): the code generator decides per class whether each stays a
literal or becomes a constructor argument (:mod:`flaxcnn.port.codegen`).
"""

from __future__ import annotations

import builtins
import keyword
import math
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import _get_qualified_name
from torch.fx.passes.shape_prop import TensorMetadata

from flaxcnn.port.capture import Instance, indexed, is_custom, node_source
from flaxcnn.port.errors import UnsupportedNode
from flaxcnn.port.layers import ALWAYS, POSITIONAL, layer_spec, supported_layers

P4 = (0, 3, 1, 2)  # torch dim -> NHWC axis of a 4-D tensor
Q4 = (0, 2, 3, 1)  # NHWC axis -> torch dim
REQUIRED = object()  # a slot without a default (always written)
TOKEN = "\x00{}\x00"
TOKEN_RE = re.compile("\x00(\\d+)\x00")
RESERVED = {"self", "jnp", "jax", "nnx", "N", "F", "dtype", "rngs"} | set(keyword.kwlist) | set(dir(builtins))

DTYPES = {torch.float32: "jnp.float32", torch.float64: "jnp.float64", torch.float16: "jnp.float16",
          torch.bfloat16: "jnp.bfloat16", torch.int32: "jnp.int32", torch.int64: "jnp.int64", torch.bool: "jnp.bool_"}


class Unsupported(Exception):
    """A node without a translation (the message names the operation)."""


@dataclass
class Slot:
    value: object
    name: str  # e.g. "conv1_out_channels": what an argument lifted from it is called
    default: object = REQUIRED  # for keyword constructor arguments: the value that is left out


class Slots:
    """The literals of one class instance, in the order its code uses them."""

    def __init__(self):
        self.items: list[Slot] = []

    def token(self, value, name: str, default=REQUIRED) -> str:
        self.items.append(Slot(value, name, default))
        return TOKEN.format(len(self.items) - 1)


@dataclass
class LayerCtor:
    """``N.<nnx_name>(args...)``: args are (keyword or None, slot index)."""

    nnx_name: str
    args: list[tuple[str | None, int]]
    dtype: bool
    rngs: bool


@dataclass
class ChildCtor:
    """A custom child module: its NNX class and arguments are known once every class is built."""

    path: str  # full torch path of the child instance


@dataclass
class ContainerCtor:
    kind: str  # "Sequential", "List", "Dict"
    items: list[tuple[str, object]]  # (torch name, ctor)


def layer_ctor(module: nn.Module, name: str, rank: int | None, slots: Slots) -> LayerCtor:
    spec = layer_spec(module)
    args = []
    for p in spec.params:
        value = p.value(module, rank)
        if p.default is POSITIONAL:
            args.append((None, len(slots.items)))
            slots.token(value, f"{name}_{p.name}")
        else:
            args.append((p.name, len(slots.items)))
            slots.token(value, f"{name}_{p.name}", REQUIRED if p.default is ALWAYS else p.default)
    return LayerCtor(spec.nnx_name, args, spec.dtype, spec.rngs)


def tensor_meta(node) -> TensorMetadata | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta if isinstance(meta, TensorMetadata) else None


def rank_of(node) -> int | None:
    meta = tensor_meta(node)
    return len(meta.shape) if meta is not None else None


def multi_length(node) -> int | None:
    """How many elements a tuple-valued node has (a tuple of tensors, a torch.Size), or None."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata):
        return len(meta)
    return None


def atomic(expr: str) -> str:
    """``expr`` parenthesised unless it is one term (no top-level operator)."""
    depth = 0
    for i, ch in enumerate(expr):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and (ch == " " or (ch == "-" and i == 0)):
            return f"({expr})"
    return expr


def logical(expr: str, rank: int | None) -> str:
    """An NHWC 4-D value in torch's NCHW layout (other ranks are torch's already)."""
    return f"N.nhwc_to_nchw({expr})" if rank == 4 else expr


def physical(expr: str, rank: int | None) -> str:
    return f"N.nchw_to_nhwc({expr})" if rank == 4 else expr


def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def phys_axis(d: int, rank: int) -> int:
    d = norm_dim(d, rank)
    return P4[d] if rank == 4 else d


def tuple_text(items) -> str:
    items = list(items)
    return "(" + ", ".join(map(str, items)) + ("," if len(items) == 1 else "") + ")"


@dataclass
class Multi:
    """An expression whose value is a tuple the code may unpack (``a, b = ...``)."""

    expr: str
    length: int
    kind: str = "tensors"  # or "shape"
    rank: int | None = None  # the tensor's rank for a shape
    phys_unpack: str | None = None  # for a 4-D shape: the NHWC tuple to unpack instead (x.shape)


def _qualified(target) -> str:
    try:
        return _get_qualified_name(target)
    except Exception:  # noqa: BLE001 - a callable without a module
        return repr(target)


def _bind(node: fx.Node, names: list[str], defaults: dict, ignore=("inplace", "_stacklevel")) -> dict:
    out = {}
    for i, name in enumerate(names):
        if i < len(node.args):
            out[name] = node.args[i]
        elif name in node.kwargs:
            out[name] = node.kwargs[name]
        elif name in defaults:
            out[name] = defaults[name]
        else:
            raise Unsupported(f"missing argument {name!r}")
    unknown = [k for k in node.kwargs if k not in names and k not in ignore]
    if len(node.args) > len(names) or unknown:
        raise Unsupported(f"arguments {unknown or list(node.args[len(names):])}")
    return out


def _sizes(args: tuple) -> object:
    """A shape given as varargs (``view(b, -1)``) or as one tuple/list/node (``view((b, -1))``)."""
    if len(args) == 1 and (isinstance(args[0], (tuple, list)) or isinstance(args[0], fx.Node)):
        return args[0]
    return tuple(args)


class FnAttrs:
    """Module attributes that functional forms need (``F.dropout`` -> ``self.dropout_fn0``).

    Attributes keep their names across the train and eval bodies of one class when they are
    built the same way (the k-th of a kind, same constructor)."""

    def __init__(self):
        self.ctors: dict[str, LayerCtor] = {}
        self.bodies: list[list[tuple[str, str]]] = []  # per body: (kind, name) in order

    def new_body(self) -> None:
        self.bodies.append([])

    def get(self, kind: str, ctor: LayerCtor, slots: Slots) -> str:
        body = self.bodies[-1]
        ordinal = sum(1 for k, _ in body if k == kind)
        for previous in self.bodies[:-1]:
            same_kind = [n for k, n in previous if k == kind]
            if ordinal < len(same_kind) and _same_ctor(self.ctors[same_kind[ordinal]], ctor, slots):
                body.append((kind, same_kind[ordinal]))
                return same_kind[ordinal]
        index = sum(1 for n in self.ctors if n.startswith(f"{kind}_fn"))
        name = f"{kind}_fn{index}"
        self.ctors[name] = ctor
        body.append((kind, name))
        return name


def _same_ctor(a: LayerCtor, b: LayerCtor, slots: Slots) -> bool:
    return (a.nnx_name == b.nnx_name and [k for k, _ in a.args] == [k for k, _ in b.args]
            and all(repr(slots.items[i].value) == repr(slots.items[j].value) for (_, i), (_, j) in zip(a.args, b.args)))


UNARY = {  # torch function / Tensor method name -> NNX expression template
    "relu": "jax.nn.relu({})", "sigmoid": "jax.nn.sigmoid({})", "tanh": "jnp.tanh({})", "silu": "jax.nn.silu({})",
    "relu6": "F.relu6({})", "hardswish": "F.hardswish({})", "hardsigmoid": "F.hardsigmoid({})",
    "exp": "jnp.exp({})", "sqrt": "jnp.sqrt({})", "abs": "jnp.abs({})", "neg": "-{}",
}
UNARY_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", F.sigmoid: "sigmoid", torch.sigmoid: "sigmoid", F.tanh: "tanh",
    torch.tanh: "tanh", F.silu: "silu", F.relu6: "relu6", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid",
    torch.exp: "exp", torch.sqrt: "sqrt", torch.abs: "abs", operator.neg: "neg", torch.neg: "neg",
}
BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/", "truediv": "/", "floordiv": "//", "pow": "**"}
BINARY_FUNCTIONS = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "truediv",
    operator.floordiv: "floordiv", operator.pow: "pow", operator.iadd: "add", operator.isub: "sub",
    operator.imul: "mul", operator.itruediv: "truediv",
    torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.div: "div", torch.pow: "pow",
}
REDUCTIONS = {"mean": "jnp.mean", "sum": "jnp.sum", "amax": "jnp.max", "amin": "jnp.min"}

SUPPORTED = (
    "layers " + supported_layers() + "; custom nn.Module classes, nn.Sequential, nn.ModuleList, nn.ModuleDict; "
    "functions F.relu/relu6/silu/sigmoid/tanh/hardswish/hardsigmoid/leaky_relu/elu/gelu/softmax/log_softmax, "
    "F.dropout/dropout2d, F.max_pool2d/avg_pool2d/adaptive_avg_pool2d/adaptive_max_pool2d, F.interpolate, "
    "torch.cat, torch.flatten, add/sub/mul/div/pow (operators, torch.* and Tensor methods, broadcasting), "
    "mean/sum/amax/amin over dims, view/reshape/flatten, permute/transpose/contiguous, squeeze/unsqueeze, "
    "chunk/split, indexing and slicing, size()/shape/ndim/dim(), expand_as, clamp, exp/sqrt/abs, "
    "stochastic depth draws (torch.empty(...)/x.new_empty(...)/torch.empty_like(x) then .bernoulli_(p), "
    "torch.bernoulli(torch.full(...)/torch.full_like(x, p)/x.new_full(...)))"
)


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
            return node.target.split(".")[0] if (is_custom(module) or "." in node.target) else "out"
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
        return self.lines

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            module = self.inst.module.get_submodule(node.target)
            t = type(module)
            name = f"torch.nn.{t.__name__}" if getattr(nn, t.__name__, None) is t else f"{t.__module__}.{t.__qualname__}"
            return f"call_module {self.inst.child_path(node.target)} ({name})"
        if node.op == "call_method":
            return f"call_method Tensor.{node.target}"
        if node.op == "call_function":
            return f"call_function {_qualified(node.target)}"
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


# --- handlers: (body, node[, method name]) -> expression ---------------------------------------


def _method_binary(body: Body, node: fx.Node, name: str) -> str:
    return body.binary(node, {"true_divide": "div", "divide": "div", "multiply": "mul", "subtract": "sub"}.get(name, name))


def _method_unary(body: Body, node: fx.Node, name: str) -> str:
    return body.unary(node, name)


def _activation(fn: str, names: list[str], defaults: dict):
    def handle(body: Body, node: fx.Node) -> str:
        a = _bind(node, names, defaults)
        body.uses_f = True
        extra = [body.lit(a[n], f"{fn}_{n}") for n in names[1:]]
        return f"F.{fn}({', '.join([body.val(a['input'])] + extra)})"
    return handle


def _softmax(fn: str):
    def handle(body: Body, node: fx.Node, _name: str | None = None) -> str:
        a = _bind(node, ["input", "dim"], {"dim": None}, ignore=("_stacklevel", "dtype"))
        x, r = a["input"], rank_of(a["input"])
        body.uses_jax = True
        if a["dim"] is None:
            body.uses_f = True
            return f"jax.nn.{fn}({body.val(x)}, axis=F.implicit_softmax_axis({r}))"
        return f"jax.nn.{fn}({body.val(x)}, axis={phys_axis(a['dim'], r)})"
    return handle


def _dropout(nnx_name: str):
    def handle(body: Body, node: fx.Node) -> str | None:
        a = _bind(node, ["input", "p", "training", "inplace"], {"p": 0.5, "training": True, "inplace": False})
        if isinstance(a["training"], fx.Node) or isinstance(a["p"], fx.Node):
            raise Unsupported("training/p computed in the graph")
        if not a["training"] or a["p"] == 0:
            body.bind_var(node, body.val(a["input"]))  # identity: PyTorch draws nothing either
            return None
        slots = body.slots
        ctor = LayerCtor(nnx_name, [(None, len(slots.items))], False, True)
        slots.token(a["p"], f"{node.name}_p", REQUIRED)
        attr = body.fn_attrs.get("dropout", ctor, slots)
        return f"self.{attr}({body.val(a['input'])}, deterministic=False)"
    return handle


def _pool(nnx_name: str, kind: str, names: list[str], defaults: dict, positional: int = 1):
    def handle(body: Body, node: fx.Node) -> str:
        a = _bind(node, ["input"] + names, defaults)
        slots = body.slots
        args = []
        for k, n in enumerate(names):
            value = a[n]
            if isinstance(value, fx.Node):
                raise Unsupported(f"{n} computed in the graph")
            from flaxcnn.port.layers import compact
            value = compact(value)
            args.append((None if k < positional else n, len(slots.items)))
            slots.token(value, f"{node.name}_{n}", REQUIRED if k < positional else defaults[n])
        attr = body.fn_attrs.get(kind, LayerCtor(nnx_name, args, False, False), slots)
        length = multi_length(node)
        call = f"self.{attr}({body.val(a['input'])})"
        return Multi(call, length) if length is not None else call
    return handle


def _interpolate(body: Body, node: fx.Node) -> str:
    names = ["input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias"]
    a = _bind(node, names, {"size": None, "scale_factor": None, "mode": "nearest", "align_corners": None,
                            "recompute_scale_factor": None, "antialias": False})
    args = [body.val(a["input"])]
    for n in names[1:]:
        v = a[n]
        if v is None or (n == "antialias" and v is False):
            continue
        args.append(f"{n}={body.lit(v, f'{node.name}_{n}') if not isinstance(v, fx.Node) else body.val(v)}")
    return f"N.interpolate({', '.join(args)})"


def _cat(body: Body, node: fx.Node) -> str:
    a = _bind(node, ["tensors", "dim"], {"dim": 0})
    tensors = a["tensors"]
    r = rank_of(node)
    return f"jnp.concatenate([{', '.join(body.val(t) for t in tensors)}], axis={phys_axis(a['dim'], r)})"


def _reshape_to(body: Body, node: fx.Node, x: fx.Node, shape_text: str) -> str:
    r_in, r_out = rank_of(x), rank_of(node)
    return physical(f"{atomic(logical(body.val(x), r_in))}.reshape({shape_text})", r_out)


def _shape_arg(body: Body, node: fx.Node, sizes) -> str:
    if isinstance(sizes, fx.Node):
        return body.val(sizes)
    return tuple_text(body.lit(s, f"{node.name}_{k}") if not isinstance(s, fx.Node) else body.val(s)
                      for k, s in enumerate(sizes))


def _view(body: Body, node: fx.Node, _name: str) -> str:
    return _reshape_to(body, node, node.args[0], _shape_arg(body, node, _sizes(node.args[1:] or node.kwargs.get("shape", ()))))


def _torch_reshape(body: Body, node: fx.Node) -> str:
    a = _bind(node, ["input", "shape"], {})
    return _reshape_to(body, node, a["input"], _shape_arg(body, node, _sizes((a["shape"],))))


def _flatten_expr(body: Body, node: fx.Node, x: fx.Node, start: int, end: int) -> str | None:
    r = rank_of(x)
    start, end = norm_dim(start, max(r, 1)), norm_dim(end, max(r, 1))
    if start >= end:
        body.bind_var(node, body.val(x))
        return None
    xv = body.val(x)
    dims = [f"{xv}.shape[{phys_axis(d, r)}]" for d in range(start)] + ["-1"] + \
           [f"{xv}.shape[{phys_axis(d, r)}]" for d in range(end + 1, r)]
    return _reshape_to(body, node, x, ", ".join(dims))


def _flatten_function(body: Body, node: fx.Node) -> str | None:
    a = _bind(node, ["input", "start_dim", "end_dim"], {"start_dim": 0, "end_dim": -1})
    return _flatten_expr(body, node, a["input"], a["start_dim"], a["end_dim"])


def _flatten_method(body: Body, node: fx.Node, _name: str) -> str | None:
    a = _bind(node, ["input", "start_dim", "end_dim"], {"start_dim": 0, "end_dim": -1})
    return _flatten_expr(body, node, a["input"], a["start_dim"], a["end_dim"])


def _permute_expr(body: Body, node: fx.Node, x: fx.Node, dims) -> str | None:
    r = rank_of(x)
    dims = [norm_dim(d, r) for d in dims]
    if r == 4:
        perm = [P4[dims[Q4[i]]] for i in range(4)]
    else:
        perm = dims
    if perm == list(range(r)):
        body.bind_var(node, body.val(x))
        return None
    return f"jnp.transpose({body.val(x)}, {tuple_text(perm)})"


def _permute_method(body: Body, node: fx.Node, _name: str) -> str | None:
    dims = _sizes(node.args[1:] or (node.kwargs.get("dims"),))
    return _permute_expr(body, node, node.args[0], dims)


def _permute_function(body: Body, node: fx.Node) -> str | None:
    a = _bind(node, ["input", "dims"], {})
    return _permute_expr(body, node, a["input"], a["dims"])


def _transpose_expr(body: Body, node: fx.Node, x: fx.Node, d0: int, d1: int) -> str | None:
    r = rank_of(x)
    dims = list(range(r))
    d0, d1 = norm_dim(d0, r), norm_dim(d1, r)
    dims[d0], dims[d1] = dims[d1], dims[d0]
    if r != 4:
        if d0 == d1:
            body.bind_var(node, body.val(x))
            return None
        return f"jnp.swapaxes({body.val(x)}, {d0}, {d1})"
    return _permute_expr(body, node, x, dims)


def _transpose_method(body: Body, node: fx.Node, _name: str) -> str | None:
    a = _bind(node, ["input", "dim0", "dim1"], {})
    return _transpose_expr(body, node, a["input"], a["dim0"], a["dim1"])


def _transpose_function(body: Body, node: fx.Node) -> str | None:
    a = _bind(node, ["input", "dim0", "dim1"], {})
    return _transpose_expr(body, node, a["input"], a["dim0"], a["dim1"])


def _alias(body: Body, node: fx.Node, _name: str | None = None) -> None:
    body.bind_var(node, body.val(node.args[0]))
    return None


def _split_points(sizes: list[int]) -> list[int]:
    points, total = [], 0
    for s in sizes[:-1]:
        total += s
        points.append(total)
    return points


def _split_expr(body: Body, node: fx.Node, x: fx.Node, sizes: list[int], dim: int) -> Multi:
    r = rank_of(x)
    axis = phys_axis(dim, r)
    if len(set(sizes)) == 1:
        expr = f"jnp.split({body.val(x)}, {len(sizes)}, axis={axis})"
    else:
        expr = f"jnp.split({body.val(x)}, {_split_points(sizes)}, axis={axis})"
    return Multi(expr, len(sizes))


def _chunk_sizes(size: int, chunks: int) -> list[int]:
    step = -(-size // chunks)
    return [min(step, size - k) for k in range(0, size, step)]


def _chunk(body: Body, node: fx.Node, _name: str | None = None) -> Multi:
    a = _bind(node, ["input", "chunks", "dim"], {"dim": 0})
    x = a["input"]
    size = tensor_meta(x).shape[norm_dim(a["dim"], rank_of(x))]
    return _split_expr(body, node, x, _chunk_sizes(size, a["chunks"]), a["dim"])


def _split(body: Body, node: fx.Node, _name: str | None = None) -> Multi:
    a = _bind(node, ["input", "split_size_or_sections", "dim"], {"dim": 0})
    x, s = a["input"], a["split_size_or_sections"]
    if a["split_size_or_sections"] is None:
        s = node.kwargs.get("split_size")
    size = tensor_meta(x).shape[norm_dim(a["dim"], rank_of(x))]
    sizes = [min(s, size - k) for k in range(0, size, s)] if isinstance(s, int) else list(s)
    return _split_expr(body, node, x, sizes, a["dim"])


def _reduce(body: Body, node: fx.Node, name: str) -> str:
    a = _bind(node, ["input", "dim", "keepdim"], {"dim": None, "keepdim": False}, ignore=("dtype",))
    x, r = a["input"], rank_of(a["input"])
    fn = REDUCTIONS[name]
    if a["dim"] is None or a["dim"] == ():
        return f"{fn}({body.val(x)})"
    dims = sorted(norm_dim(d, r) for d in (a["dim"] if isinstance(a["dim"], (tuple, list)) else (a["dim"],)))
    keep = ", keepdims=True" if a["keepdim"] else ""
    if r == 4:
        remaining_phys = [t for t in Q4 if t not in dims]
        if a["keepdim"] or remaining_phys == sorted(remaining_phys):
            axes = tuple(sorted(P4[d] for d in dims))
            return f"{fn}({body.val(x)}, axis={axes[0] if len(axes) == 1 else tuple_text(axes)}{keep})"
    axes = dims[0] if len(dims) == 1 else tuple_text(dims)
    return physical(f"{fn}({logical(body.val(x), r)}, axis={axes}{keep})", rank_of(node))


def _reduce_function(name: str):
    def handle(body: Body, node: fx.Node) -> str:
        return _reduce(body, node, name)
    return handle


def _logical_shape(expr: str, r: int) -> str:
    return f"({expr}.shape[0], {expr}.shape[3], {expr}.shape[1], {expr}.shape[2])" if r == 4 else f"{expr}.shape"


def _size(body: Body, node: fx.Node, _name: str) -> str | Multi:
    x = node.args[0]
    r = rank_of(x)
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if d is not None:
        return f"{body.val(x)}.shape[{phys_axis(d, r)}]"
    xv = body.val(x)
    return Multi(_logical_shape(xv, r), r, "shape", r, f"{xv}.shape" if r == 4 else None)


def _dim(body: Body, node: fx.Node, _name: str) -> None:
    body.bind_var(node, str(rank_of(node.args[0])))
    return None


def _getattr(body: Body, node: fx.Node):
    x, attr = node.args
    r = rank_of(x)
    if attr == "shape":
        xv = body.val(x)
        return Multi(_logical_shape(xv, r), r, "shape", r, f"{xv}.shape" if r == 4 else None)
    if attr == "ndim":
        body.bind_var(node, str(r))
        return None
    if attr == "dtype":
        return f"{body.val(x)}.dtype"
    if attr == "device":
        body.bind_var(node, "None")
        return None
    raise Unsupported(f"attribute .{attr}")


def _index_text(body: Body, parts) -> str:
    return ", ".join(body.val(p) if not isinstance(p, type(None)) else "None" for p in parts)


def _getitem(body: Body, node: fx.Node):
    x, index = node.args
    if not body.tensor(x):
        return f"{body.val(x)}[{body.val(index) if not isinstance(index, slice) else body.val(index)}]"
    if isinstance(index, fx.Node):
        raise Unsupported("indexing with a tensor")
    parts = list(index) if isinstance(index, tuple) else [index]
    r = rank_of(x)
    if r == 4 and all(isinstance(p, slice) or p is Ellipsis for p in parts) and parts.count(Ellipsis) <= 1:
        if Ellipsis in parts:
            k = parts.index(Ellipsis)
            parts = parts[:k] + [slice(None)] * (4 - len(parts) + 1) + parts[k + 1:]
        parts += [slice(None)] * (4 - len(parts))
        phys = [parts[Q4[i]] for i in range(4)]
        while phys and phys[-1] == slice(None):
            phys.pop()
        if not phys:
            body.bind_var(node, body.val(x))
            return None
        return f"{body.val(x)}[{_index_text(body, phys)}]"
    return physical(f"{atomic(logical(body.val(x), r))}[{_index_text(body, parts)}]", rank_of(node))


def _squeeze(body: Body, node: fx.Node, name: str) -> str:
    x = node.args[0]
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    r = rank_of(x)
    fn = "jnp.squeeze" if name == "squeeze" else "jnp.expand_dims"
    if d is None:
        if name != "squeeze":
            raise Unsupported("unsqueeze without dim")
        inner = f"{fn}({logical(body.val(x), r)})"
    else:
        d = norm_dim(d, r if name == "squeeze" else r + 1)
        inner = f"{fn}({logical(body.val(x), r)}, {d})"
    return physical(inner, rank_of(node))


def _squeeze_function(name: str):
    def handle(body: Body, node: fx.Node) -> str:
        return _squeeze(body, node, name)
    return handle


def _expand_as(body: Body, node: fx.Node, _name: str) -> str:
    x, other = node.args[0], node.args[1]
    return f"jnp.broadcast_to({body.operand(x, rank_of(other), node.name)}, {body.val(other)}.shape)"


def _clamp(body: Body, node: fx.Node, _name: str | None = None) -> str:
    a = _bind(node, ["input", "min", "max"], {"min": None, "max": None})
    lo = "None" if a["min"] is None else body.lit(a["min"], f"{node.name}_min")
    hi = "None" if a["max"] is None else body.lit(a["max"], f"{node.name}_max")
    return f"jnp.clip({body.val(a['input'])}, {lo}, {hi})"


def _clamp_function(body: Body, node: fx.Node) -> str:
    return _clamp(body, node)


def _empty(body: Body, node: fx.Node, shape_args, dtype_text: str) -> None:
    r = rank_of(node)
    if isinstance(shape_args, fx.Node):
        s = body.val(shape_args)
        shape = f"tuple({s}[i] for i in (0, 2, 3, 1))" if r == 4 else f"tuple({s})"
    else:
        items = [body.val(v) for v in shape_args]
        shape = tuple_text([items[Q4[i]] for i in range(4)] if r == 4 else items)
    body.pending_empty[node] = (shape, dtype_text)
    return None


def _torch_empty(body: Body, node: fx.Node) -> None:
    dtype = node.kwargs.get("dtype")
    return _empty(body, node, _sizes(node.args), body.val(dtype) if dtype is not None else "jnp.float32")


def _torch_empty_like(body: Body, node: fx.Node) -> None:
    x = node.args[0]
    dtype = node.kwargs.get("dtype")
    body.pending_empty[node] = (f"{body.val(x)}.shape", body.val(dtype) if dtype is not None else f"{body.val(x)}.dtype")
    return None


def _new_empty(body: Body, node: fx.Node, _name: str) -> None:
    dtype = node.kwargs.get("dtype")
    return _empty(body, node, _sizes(node.args[1:] or (node.kwargs.get("size"),)),
                  body.val(dtype) if dtype is not None else f"{body.val(node.args[0])}.dtype")


def _full_value(node: fx.Node, value) -> float:
    if isinstance(value, fx.Node) or not isinstance(value, (int, float)):
        raise Unsupported("a fill value computed in the graph")
    return value


def _torch_full(body: Body, node: fx.Node) -> None:
    """``torch.full(size, p)``: the probabilities of a ``torch.bernoulli`` draw (nothing else)."""
    dtype = node.kwargs.get("dtype")
    _empty(body, node, _sizes((node.args[0],)), body.val(dtype) if dtype is not None else "jnp.float32")
    body.pending_fill[node] = _full_value(node, node.args[1] if len(node.args) > 1 else node.kwargs["fill_value"])


def _torch_full_like(body: Body, node: fx.Node) -> None:
    _torch_empty_like(body, node)
    body.pending_fill[node] = _full_value(node, node.args[1] if len(node.args) > 1 else node.kwargs["fill_value"])


def _new_full(body: Body, node: fx.Node, _name: str) -> None:
    dtype = node.kwargs.get("dtype")
    _empty(body, node, _sizes((node.args[1],)), body.val(dtype) if dtype is not None else f"{body.val(node.args[0])}.dtype")
    body.pending_fill[node] = _full_value(node, node.args[2] if len(node.args) > 2 else node.kwargs["fill_value"])


def _torch_bernoulli(body: Body, node: fx.Node) -> None:
    """``torch.bernoulli(torch.full(size, p))``: a draw of ``size`` with probability ``p``."""
    probs = node.args[0]
    if probs not in body.pending_fill or len(node.args) > 1 or node.kwargs.get("p") is not None:
        raise Unsupported("torch.bernoulli of a tensor not made by torch.full/full_like/new_full")
    return _draw(body, node, probs, body.pending_fill.pop(probs))


def _bernoulli_(body: Body, node: fx.Node, _name: str) -> str:
    target = node.args[0]
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    if target not in body.pending_empty or target in body.pending_fill or isinstance(p, fx.Node):
        raise Unsupported("bernoulli_ on a tensor not made by torch.empty/new_empty/empty_like, or p from the graph")
    return _draw(body, node, target, p)


def _draw(body: Body, node: fx.Node, target: fx.Node, p) -> None:
    shape, dtype = body.pending_empty.pop(target)
    attr = body.fn_attrs.get("bernoulli", LayerCtor("Bernoulli", [], False, True), body.slots)
    name = body.fresh("noise")
    body.lines.append(f"{name} = self.{attr}({shape}, {body.lit(p, f'{node.name}_p')}, {dtype})")
    body.bind_var(target, name)
    body.bind_var(node, name)
    return None


def _type_as(body: Body, node: fx.Node, _name: str) -> str:
    return f"{body.val(node.args[0])}.astype({body.val(node.args[1])}.dtype)"


FUNCTIONS = {
    F.leaky_relu: _activation("leaky_relu", ["input", "negative_slope"], {"negative_slope": 0.01}),
    F.elu: _activation("elu", ["input", "alpha"], {"alpha": 1.0}),
    F.gelu: _activation("gelu", ["input", "approximate"], {"approximate": "none"}),
    F.softmax: _softmax("softmax"), torch.softmax: _softmax("softmax"),
    F.log_softmax: _softmax("log_softmax"), torch.log_softmax: _softmax("log_softmax"),
    F.dropout: _dropout("Dropout"), F.dropout2d: _dropout("Dropout2d"),
    F.max_pool2d: _pool("MaxPool2d", "max_pool", ["kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                                  "return_indices"],
                        {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}),
    F.avg_pool2d: _pool("AvgPool2d", "avg_pool", ["kernel_size", "stride", "padding", "ceil_mode",
                                                  "count_include_pad", "divisor_override"],
                        {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                         "divisor_override": None}),
    F.adaptive_avg_pool2d: _pool("AdaptiveAvgPool2d", "adaptive_avg_pool", ["output_size"], {}),
    F.adaptive_max_pool2d: _pool("AdaptiveMaxPool2d", "adaptive_max_pool", ["output_size", "return_indices"],
                                 {"return_indices": False}),
    F.interpolate: _interpolate,
    torch.cat: _cat, torch.concat: _cat, torch.concatenate: _cat,
    torch.flatten: _flatten_function, torch.reshape: _torch_reshape,
    torch.permute: _permute_function, torch.transpose: _transpose_function,
    torch.chunk: lambda body, node: _chunk(body, node), torch.split: lambda body, node: _split(body, node),
    torch.mean: _reduce_function("mean"), torch.sum: _reduce_function("sum"), torch.amax: _reduce_function("amax"),
    torch.amin: _reduce_function("amin"),
    torch.squeeze: _squeeze_function("squeeze"), torch.unsqueeze: _squeeze_function("unsqueeze"),
    torch.clamp: _clamp_function, torch.clip: _clamp_function,
    operator.getitem: _getitem, getattr: _getattr,
    torch.empty: _torch_empty, torch.empty_like: _torch_empty_like,
    torch.full: _torch_full, torch.full_like: _torch_full_like, torch.bernoulli: _torch_bernoulli,
}

METHODS = {
    **{n: _method_binary for n in ("add", "sub", "mul", "div", "pow", "true_divide", "divide", "multiply", "subtract")},
    **{n: _method_unary for n in ("relu", "sigmoid", "tanh", "exp", "sqrt", "abs", "neg")},
    "softmax": _softmax("softmax"), "log_softmax": _softmax("log_softmax"),
    "view": _view, "reshape": _view, "flatten": _flatten_method, "permute": _permute_method,
    "transpose": _transpose_method, "contiguous": _alias, "chunk": _chunk, "split": _split,
    "mean": _reduce, "sum": _reduce, "amax": _reduce, "amin": _reduce, "size": _size, "dim": _dim,
    "squeeze": _squeeze, "unsqueeze": _squeeze, "expand_as": _expand_as, "clamp": _clamp, "clip": _clamp,
    "new_empty": _new_empty, "new_full": _new_full, "bernoulli": _bernoulli_, "type_as": _type_as,
}


__all__ = ["Body", "Slots", "Slot", "FnAttrs", "LayerCtor", "ChildCtor", "ContainerCtor", "layer_ctor",
           "SUPPORTED", "TOKEN_RE", "REQUIRED", "rank_of", "Unsupported"]
