"""Errors of ``flaxcnn port``: what in the user's model cannot be ported, and where."""

from __future__ import annotations

from dataclasses import dataclass

from flaxcnn.errors import ConfigError


@dataclass(frozen=True)
class UnsupportedNode:
    """One operation of the traced model that has no NNX translation."""

    module_path: str  # the torch module whose forward holds it ("" for the top module)
    op: str  # e.g. "call_function torch.fft.fft", "call_module torch.nn.LSTM"
    source: str  # "file.py:12: code", or "" when fx recorded no stack

    def format(self) -> str:
        where = self.module_path or "<top>"
        return f"{where}: {self.op}" + (f" ({self.source})" if self.source else "")


class UnsupportedModelError(ConfigError):
    """The model uses operations outside the port's supported set; lists every one of them."""

    def __init__(self, model_name: str, nodes: list[UnsupportedNode], supported: str):
        self.nodes = list(nodes)
        lines = [f"{model_name} cannot be ported: {len(self.nodes)} unsupported operation(s):"]
        lines += ["  " + n.format() for n in self.nodes]
        lines.append("Supported: " + supported)
        super().__init__("\n".join(lines))


class TraceControlFlowError(ConfigError):
    """The forward branches or loops on a traced value (a tensor's contents, or a shape fx
    cannot see as a constant): torch.fx records one path only, so no faithful graph exists."""

    def __init__(self, class_name: str, source: str, detail: str):
        self.class_name, self.source = class_name, source
        super().__init__(
            f"{class_name}.forward has data-dependent control flow"
            + (f" at {source}" if source else "")
            + f": {detail}. The port traces the forward once with torch.fx, which cannot record "
            "an `if`/`while` on a tensor value; rewrite it without the branch (e.g. torch.where) "
            "or make the condition a Python constant of the module."
        )
