"""The pieces of generated code that are decided per class, not per instance.

A *slot* is one literal a layer or an operation is configured with (channels, strides, dropout
rates, reshape sizes); :mod:`flaxcnn.port.codegen` decides per NNX class whether it stays a
literal (every instance agrees) or becomes a constructor argument. Constructors are kept as
data (:class:`LayerCtor`, :class:`ChildCtor`, :class:`ContainerCtor`) until then.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from flaxcnn.port.layers import ALWAYS, POSITIONAL, layer_spec

REQUIRED = object()  # a slot without a default (always written)
TOKEN = "\x00{}\x00"
TOKEN_RE = re.compile("\x00(\\d+)\x00")


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
    arg_slots: list[int] = field(default_factory=list)  # the parent's slots holding its arguments


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



__all__ = ["REQUIRED", "TOKEN", "TOKEN_RE", "Slot", "Slots", "LayerCtor", "ChildCtor", "ContainerCtor",
           "layer_ctor", "FnAttrs"]
