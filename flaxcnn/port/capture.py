"""Capture a PyTorch module as torch.fx graphs, one per instance of each custom module class.

Why torch.fx and not ``torch.export``: export lowers the whole model to one flat graph of aten
operations, with module boundaries and attribute names gone (``conv1`` becomes a weight tensor
fed to ``aten.convolution``). fx keeps them: with a tracer that keeps standard ``torch.nn`` layers
and the user's own module classes as calls, each graph holds ``self.conv1(x)``-level operations,
so the port gets one NNX class per torch class with torch's attribute names (and the
``state_dict`` keys map one to one).

Each instance of a custom class (an ``nn.Module`` subclass defined outside ``torch``, not a
container) is a leaf of its parent's graph and traced on its own. fx bakes ``self.training``
into constants, so every graph is traced in training mode and in evaluation mode; fx's
``ShapeProp`` then runs each graph on the instance's inputs (recorded by forward pre-hooks
during one real forward of the model), so every node knows its shape and rank.
"""

from __future__ import annotations

import copy
import os
import re
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from flaxcnn.port.errors import TraceControlFlowError, UnsupportedModelError, UnsupportedNode

MODES = ("train", "eval")
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_TORCH_DIR = os.path.dirname(torch.__file__)
_CONTROL_FLOW = "cannot be used as inputs to control flow"


def torch_layer_type(module: nn.Module) -> type | None:
    """The ``torch.*`` class whose ``forward`` ``module`` runs (a subclass that keeps torch's
    forward is that layer), or None for a module with its own forward."""
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return cls if cls.__module__.startswith("torch.") else None
    return None


def is_custom(module: nn.Module) -> bool:
    """A module the port writes an NNX class for: user code, not a container (a user's subclass of
    nn.Sequential is one: it becomes an nnx.Sequential subclass)."""
    if isinstance(module, nn.Sequential):
        return not type(module).__module__.startswith("torch.")
    return not isinstance(module, CONTAINERS) and torch_layer_type(module) is None


def indexed(module: nn.Module) -> bool:
    """An nn.Sequential whose children are named 0, 1, ... (an nnx.Sequential keeps those keys);
    one built from an OrderedDict is named and becomes an nnx.Dict or a class with attributes."""
    return isinstance(module, nn.Sequential) and all(n == str(i) for i, (n, _) in enumerate(module.named_children()))


class LeafTracer(fx.Tracer):
    """fx tracer that records every non-container submodule as one ``call_module`` node:
    standard layers (translated to flaxcnn's layers), custom classes (traced on their own) and
    unknown torch layers (reported as unsupported). Containers are traced through."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_custom(m) or not isinstance(m, CONTAINERS)


def user_frame(frames) -> str:
    """``file:line: code`` of the innermost frame outside torch itself ("" when none)."""
    for frame in reversed(list(frames)):
        if not os.path.abspath(frame.filename).startswith(_TORCH_DIR):
            code = (frame.line or "").strip()
            return f"{os.path.basename(frame.filename)}:{frame.lineno}" + (f": {code}" if code else "")
    return ""


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in \S+\n(?P<code>(?:    .*)?)')


def node_source(node: fx.Node) -> str:
    """Where in the user's code ``node`` was recorded (from fx's stack trace), or ""."""
    text = node.stack_trace or ""
    frames = [traceback.FrameSummary(m["file"], int(m["line"]), "", line=m["code"].strip() or None)
              for m in _FRAME.finditer(text + "\n")]
    return user_frame(frames)


@dataclass
class Instance:
    """One custom module instance (or the top module) and its graphs per mode."""

    path: str  # dotted torch path from the top module ("" for the top)
    module: nn.Module
    graphs: dict[str, fx.Graph] = field(default_factory=dict)  # "train"/"eval" -> graph with shapes
    called: bool = True  # False: the forward never calls it (no shapes; its NNX __call__ refuses)

    @property
    def class_name(self) -> str:
        return type(self.module).__name__

    def child_path(self, target: str) -> str:
        return f"{self.path}.{target}" if self.path else target


@dataclass
class Capture:
    """Everything the code generator needs: the instances (top first) and the example's output."""

    root: nn.Module  # a private copy of the user's module
    instances: dict[str, Instance]
    input_chw: tuple[int, ...]
    torch_output: torch.Tensor | tuple  # the top module's eval-mode output on the example


def trace(module: nn.Module, name: str) -> fx.Graph:
    """fx graph of ``module.forward``; control flow on a traced value raises a clear error."""
    try:
        return LeafTracer().trace(module)
    except Exception as error:  # noqa: BLE001 - fx raises TraceError, TypeError, ... from user code
        where = user_frame(traceback.extract_tb(error.__traceback__))
        if _CONTROL_FLOW in str(error) or "symbolically traced variables" in str(error):
            raise TraceControlFlowError(type(module).__name__, where,
                                        "an if/while/bool() on a traced tensor or shape") from None
        raise UnsupportedModelError(
            type(module).__name__,
            [UnsupportedNode(name, f"torch.fx cannot trace it ({type(error).__name__}: {error})", where)],
            "models whose forward torch.fx can trace symbolically") from None


class ShapeValueProp(ShapeProp):
    """fx's ShapeProp, also keeping the Python ints and sizes the graph computes (``x.size()[2:]``)
    in ``node.meta["value"]``: the shapes of a port are static, so an option computed from them
    (a pooling window of the whole map) is a constant of the port."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, (int, torch.Size)) or (
                isinstance(result, (tuple, list)) and all(isinstance(v, int) for v in result)):
            n.meta["value"] = tuple(result) if isinstance(result, (torch.Size, list)) else result
        return result


def _record_inputs(model: nn.Module, customs: dict[str, nn.Module], example: torch.Tensor
                   ) -> tuple[dict[str, tuple[tuple, dict]], object]:
    """(args, kwargs) of each custom instance's first call, and the model's output, in one forward."""
    seen: dict[str, tuple[tuple, dict]] = {}
    hooks = []
    for path, module in customs.items():
        def hook(_module, args, kwargs, path=path):
            seen.setdefault(path, (args, kwargs))
        hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        output = model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen, output


def _positional(graph: fx.Graph, args: tuple, kwargs: dict, name: str) -> list:
    """The call's arguments in the graph's placeholder order (defaults filled in)."""
    values = list(args)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders[len(values):]:
        if node.target in kwargs:
            values.append(kwargs[node.target])
        elif node.args:
            values.append(node.args[0])
        else:
            raise UnsupportedModelError(name, [UnsupportedNode("", f"argument {node.target!r} not given", "")],
                                        "forwards whose arguments are all given")
    return values


def capture(model: nn.Module, example: np.ndarray | torch.Tensor) -> Capture:
    """Trace ``model`` (not modified: a copy is traced) in both modes on the NCHW ``example``."""
    x = torch.as_tensor(np.asarray(example) if not isinstance(example, torch.Tensor) else example)
    param = next(iter(model.parameters()), None)
    x = x.to(param.dtype if param is not None else torch.float32)
    root = copy.deepcopy(model)
    customs = {path: m for path, m in root.named_modules() if path and is_custom(m)}
    instances = {"": Instance("", root), **{p: Instance(p, m) for p, m in customs.items()}}
    output = None
    with torch.random.fork_rng(), torch.no_grad():
        for mode in MODES:
            root.train(mode == "train")
            inputs, out = _record_inputs(root, customs, x)
            inputs[""] = ((x,), {})
            if mode == "eval":
                output = out
            for path, inst in instances.items():
                graph = trace(inst.module, path)
                inst.called = path in inputs
                if inst.called:
                    args, kwargs = inputs[path]
                    ShapeValueProp(fx.GraphModule(inst.module, graph)).propagate(
                        *_positional(graph, args, kwargs, inst.class_name))
                inst.graphs[mode] = graph
    root.eval()
    return Capture(root, instances, tuple(int(d) for d in x.shape[1:]), output)


__all__ = ["Capture", "Instance", "capture", "is_custom", "indexed", "torch_layer_type", "node_source", "trace",
           "MODES"]
