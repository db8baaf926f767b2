"""What each torch operation becomes in NNX code, and the layout rules it follows.

Layout: inside a port, a 4-D activation is NHWC (flaxcnn's convention, see
:mod:`flaxcnn.models.nn`); every other rank is in torch's layout. fx's shapes are torch's, so
each operation that names dims translates them for 4-D tensors (torch dim ``d`` is NHWC axis
``(0, 3, 1, 2)[d]``): cat, mean/sum, chunk/split, softmax, slicing, permute/transpose, shape
reads. Reshapes from or to 4-D go through NCHW (transpose, reshape, transpose back), as a
reshape's element order is torch's. Broadcasting a 4-D tensor with a lower-rank one aligns the
lower-rank one to torch's (N, C, H, W) first.

Handlers take ``(body, node)`` (functions) or ``(body, node, method name)`` (Tensor methods),
``body`` being the :class:`flaxcnn.port.body.Body` that walks the graph, and return the
expression of the node's value (or None after binding it themselves); literals they are
configured with go through ``body.lit`` (slots, :mod:`flaxcnn.port.code`).
"""

from __future__ import annotations

import builtins
import keyword
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.node import _get_qualified_name
from torch.fx.passes.shape_prop import TensorMetadata

from flaxcnn.port.code import REQUIRED, LayerCtor
from flaxcnn.port.layers import compact, supported_layers

P4 = (0, 3, 1, 2)  # torch dim -> NHWC axis of a 4-D tensor
Q4 = (0, 2, 3, 1)  # NHWC axis -> torch dim
RESERVED = {"self", "jnp", "jax", "nnx", "N", "F", "dtype", "rngs"} | set(keyword.kwlist) | set(dir(builtins))

DTYPES = {torch.float32: "jnp.float32", torch.float64: "jnp.float64", torch.float16: "jnp.float16",
          torch.bfloat16: "jnp.bfloat16", torch.int32: "jnp.int32", torch.int64: "jnp.int64", torch.bool: "jnp.bool_"}


class Unsupported(Exception):
    """A node without a translation (the message names the operation)."""


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


def qualified(target) -> str:
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


UNARY = {  # torch function / Tensor method name -> NNX expression template
    "sigmoid": "jax.nn.sigmoid({})", "tanh": "jnp.tanh({})", "silu": "jax.nn.silu({})",
    "exp": "jnp.exp({})", "sqrt": "jnp.sqrt({})", "abs": "jnp.abs({})", "neg": "-{}",
}
UNARY_FUNCTIONS = {
    F.sigmoid: "sigmoid", torch.sigmoid: "sigmoid", F.tanh: "tanh",
    torch.tanh: "tanh", F.silu: "silu",
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


# --- handlers: (body, node[, method name]) -> expression ---------------------------------------
# ``Body`` in their annotations is flaxcnn.port.body.Body (not imported: body imports this module)


def _method_binary(body: Body, node: fx.Node, name: str) -> str:
    aliases = {"true_divide": "div", "divide": "div", "multiply": "mul", "subtract": "sub"}
    return body.binary(node, aliases.get(name, name))


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


def _kinked(nnx_name: str, attr: str):
    """``F.relu(x)`` / ``torch.relu(x)`` / ``x.relu()`` -> ``self.relu(x)`` (and ``F.relu6``,
    ``F.hardswish``, ``F.hardsigmoid`` likewise): one ``N.<nnx_name>()`` per class (``<attr>_fn``
    where a torch child already has the name), so every piecewise activation of a port is a
    layer with the verification seam of :class:`flaxcnn.models.nn.KinkedActivation` (its ``tap``)."""

    def handle(body: Body, node: fx.Node, _name: str | None = None) -> str:
        children = {n for n, _ in body.inst.module.named_children()}
        name = attr if attr not in children else f"{attr}_fn"
        body.fn_attrs.ctors.setdefault(name, LayerCtor(nnx_name, [], False, False))
        return f"self.{name}({body.val(node.args[0] if node.args else node.kwargs['input'])})"
    return handle


_relu = _kinked("ReLU", "relu")


def _leaky_relu(body: Body, node: fx.Node) -> str:
    """``F.leaky_relu(x, slope)`` -> ``self.leaky_relu_fn<k>(x)``, a ``N.LeakyReLU(slope)`` layer
    (the verification seam, as for :func:`_kinked`)."""
    a = _bind(node, ["input", "negative_slope"], {"negative_slope": 0.01})
    if isinstance(a["negative_slope"], fx.Node):
        raise Unsupported("negative_slope computed in the graph")
    slots = body.slots
    args = [(None, len(slots.items))]
    slots.token(float(a["negative_slope"]), f"{node.name}_negative_slope", REQUIRED)
    attr = body.fn_attrs.get("leaky_relu", LayerCtor("LeakyReLU", args, False, False), slots)
    return f"self.{attr}({body.val(a['input'])})"


def _pool(nnx_name: str, kind: str, names: list[str], defaults: dict, positional: int = 1):
    def handle(body: Body, node: fx.Node) -> str:
        a = _bind(node, ["input"] + names, defaults)
        slots = body.slots
        args = []
        for k, n in enumerate(names):
            value = a[n]
            if isinstance(value, fx.Node):
                if "value" not in value.meta or n in ("return_indices", "ceil_mode"):
                    raise Unsupported(f"{n} computed in the graph")
                value = value.meta["value"]  # a size of the (static) traced shapes, e.g. x.size()[2:]
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
    if r_in == 4 and r_out != 4 and tuple(tensor_meta(x).shape[2:]) == (1, 1):
        # (N, 1, 1, C) holds its elements in (N, C, 1, 1)'s order: no transpose (global pool, flatten)
        return f"{body.val(x)}.reshape({shape_text})"
    return physical(f"{atomic(logical(body.val(x), r_in))}.reshape({shape_text})", r_out)


def _shape_arg(body: Body, node: fx.Node, sizes) -> str:
    if isinstance(sizes, fx.Node):
        return body.val(sizes)
    return tuple_text(body.lit(s, f"{node.name}_{k}") if not isinstance(s, fx.Node) else body.val(s)
                      for k, s in enumerate(sizes))


def _view(body: Body, node: fx.Node, _name: str) -> str:
    sizes = _sizes(node.args[1:] or node.kwargs.get("shape", ()))
    return _reshape_to(body, node, node.args[0], _shape_arg(body, node, sizes))


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
    dtype_text = body.val(dtype) if dtype is not None else f"{body.val(x)}.dtype"
    body.pending_empty[node] = (f"{body.val(x)}.shape", dtype_text)
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
    dtype_text = body.val(dtype) if dtype is not None else f"{body.val(node.args[0])}.dtype"
    _empty(body, node, _sizes((node.args[1],)), dtype_text)
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
    F.relu: _relu, torch.relu: _relu, F.relu6: _kinked("ReLU6", "relu6"),
    F.hardswish: _kinked("Hardswish", "hardswish"), F.hardsigmoid: _kinked("Hardsigmoid", "hardsigmoid"),
    F.leaky_relu: _leaky_relu,
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
    "relu": _relu,
    **{n: _method_unary for n in ("sigmoid", "tanh", "exp", "sqrt", "abs", "neg")},
    "softmax": _softmax("softmax"), "log_softmax": _softmax("log_softmax"),
    "view": _view, "reshape": _view, "flatten": _flatten_method, "permute": _permute_method,
    "transpose": _transpose_method, "contiguous": _alias, "chunk": _chunk, "split": _split,
    "mean": _reduce, "sum": _reduce, "amax": _reduce, "amin": _reduce, "size": _size, "dim": _dim,
    "squeeze": _squeeze, "unsqueeze": _squeeze, "expand_as": _expand_as, "clamp": _clamp, "clip": _clamp,
    "new_empty": _new_empty, "new_full": _new_full, "bernoulli": _bernoulli_, "type_as": _type_as,
}


__all__ = ["SUPPORTED", "FUNCTIONS", "METHODS", "Multi", "Unsupported", "rank_of", "tensor_meta"]
