"""Training settings, their lab defaults, and named presets that reproduce the labs' runs.

Each setting is one field of :class:`TrainConfig`, and the field says everything about it: its
type and default (per data-set domain where the labs differ), its choices, its command-line help
and the check that refuses a bad value. The command line (:mod:`flaxcnn.cli`), validation,
``flaxcnn presets`` and the ``--resume`` merge are all generated from the fields, so a new
setting is one new field.

A preset is one line of overrides (the big_vision idea): ``flaxcnn train --preset lab8-wd``
reproduces lab 8's weight-decay run and ``flaxcnn presets`` prints exactly what each one sets.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from flaxcnn.errors import ConfigError
from flaxcnn.train.augment import AugmentSettings

PATHS = ("auto", "step", "scan")
SCHEDULES = ("constant", "cosine")
SPLITS = ("lab", "speaker", "official")
INITS = ("torch", "flax")
STRATEGIES = ("auto", "sequential", "vmap")  # flaxcnn sweep --strategy (flaxcnn.train.sweep)
#: how the help names the domains where a default differs
DOMAIN_LABELS = {"cifar": "lab 8", "speech": "speech"}


# ----------------------------------------------------------------------------- what a field says

@dataclass(frozen=True)
class Rule:
    """A check on one value: ``test(value)``, else "``--flag`` must be ``text``, got value"."""

    test: Callable[[Any], bool]
    text: str


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer_at_least(minimum: int) -> Rule:
    return Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
                f"an integer >= {minimum}")


def at_least(minimum: float) -> Rule:
    return Rule(lambda v: _number(v) and v >= minimum, f">= {minimum:g}")


POSITIVE = Rule(lambda v: _number(v) and v > 0, "a positive number")
FRACTION = Rule(lambda v: _number(v) and 0 <= v < 1, "in [0, 1)")


@dataclass(frozen=True)
class Setting:
    """What a :class:`TrainConfig` field means outside Python."""

    help: str
    #: its command-line flag: "" for ``--field-name``; None when it is not a command-line option
    flag: str | None = ""
    #: the only values allowed (the parser refuses others, and so does :meth:`TrainConfig.validate`)
    choices: tuple[str, ...] = ()
    #: names listed in the help, from a registry that validates them itself (models, data sets)
    names: Callable[[], Iterable[str]] | None = None
    rule: Rule | None = None
    #: the default per data-set domain, used while the field is None (the labs differ)
    lab: dict[str, Any] | None = None
    #: "saved": ``--resume`` keeps the run's own value; "given": this command's value;
    #: "given_if_set": this command's value when it gives one, else the run's
    on_resume: Literal["saved", "given", "given_if_set"] = "saved"
    group: str | None = None  # argparse group (see GROUPS)
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None  # the parser's ``type`` (default: the field's type)
    label: str | None = None  # how errors name it when it has no flag


GROUPS = {"augmentation": "augmentation (training batches only, on device, from --seed; default: none)"}


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A :class:`TrainConfig` field with its :class:`Setting`."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"setting": Setting(help, **meta)}, **factory)


def parse_classes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--classes takes comma-separated CIFAR-10 label ids, e.g. 3,5; got {text!r}") from None


def _model_names() -> Iterable[str]:
    from flaxcnn.models.registry import MODELS

    return MODELS


def _dataset_names() -> Iterable[str]:
    from flaxcnn.data import DATASETS

    return DATASETS


def _preset_names() -> Iterable[str]:
    return PRESETS


# ----------------------------------------------------------------------------- the settings

@dataclass
class TrainConfig:
    model: str | None = setting(None, "network", names=_model_names, lab={"cifar": "net", "speech": "convnet"})
    dataset: str = setting("cifar2", "data set", names=_dataset_names)
    out: str = setting("runs/net-cifar2", "run directory", flag=None, on_resume="given")
    data_dir: str | None = setting(None, "data folder; CIFAR without it: a tfds copy if prepared, else the "
                                         "shipped sample")
    classes: tuple[int, ...] | None = setting(None, "CIFAR-10 label ids to train on, e.g. 3,5 (default 0,2)",
                                              parse=parse_classes)
    split: str = setting("lab", "speech split", choices=SPLITS)
    val_fraction: float = setting(0.0, "CIFAR: hold out this fraction of train as validation", rule=FRACTION)
    epochs: int | None = setting(None, "epochs", rule=integer_at_least(1), lab={"cifar": 100, "speech": 150},
                                 on_resume="given_if_set")
    batch_size: int | None = setting(None, "batch size", rule=integer_at_least(1), lab={"cifar": 64, "speech": 256})
    # speech: 1e-3, the top of the lab's LR-finder range
    lr: float | None = setting(None, "learning rate", rule=POSITIVE, lab={"cifar": 1e-2, "speech": 1e-3})
    schedule: str = setting("constant", "learning-rate schedule (cosine decays to 0 over the run)",
                            choices=SCHEDULES)
    momentum: float | None = setting(None, "SGD momentum", rule=FRACTION, lab={"cifar": 0.0, "speech": 0.9})
    weight_decay: float = setting(0.0, "torch SGD weight_decay", rule=at_least(0))
    l2: float = setting(0.0, "lab 8's explicit penalty lambda * sum of parameter L2 norms", rule=at_least(0))
    seed: int = setting(0, "seed of the weights, the epoch order, dropout and augmentation", rule=at_least(0))
    init: str = setting("torch", "weight init: torch's U(+-1/sqrt(fan_in)) or flax's lecun_normal", choices=INITS)
    shuffle: bool = setting(True, "keep the training order fixed (the speech lab's DataLoader does not shuffle)",
                            flag="--no-shuffle")
    path: str = setting("auto", "training loop path (auto: by the platform, see flaxcnn.train.steps)",
                        choices=PATHS)
    conv_policy: str = setting("default", "which implementation runs each CPU convolution and pool: default "
                                          "(flaxcnn's C++ kernels where they apply, XLA elsewhere), xla (XLA "
                                          "only), or a policy file written by `flaxcnn tune`")
    eval_batch_size: int = setting(1000, "evaluation batch size", flag=None, rule=at_least(1),
                                   label="eval batch size")
    checkpoint_every: int = setting(1, "save the latest checkpoint every N epochs", rule=at_least(1))
    devices: int | None = setting(None, "data parallel over this many local devices per process; the whole "
                                        "batch is split over them (default: all local devices)",
                                  rule=integer_at_least(1), on_resume="given")
    num_classes: int | None = setting(None, "number of outputs (default: the data set's classes)", flag=None)
    preset: str | None = setting(None, "a named lab run (see `flaxcnn presets`); explicit options override it",
                                 names=_preset_names)
    # Training-time augmentation, on device (flaxcnn.train.augment); all off by default and in
    # the lab presets. Spectrogram transforms apply to speech only; AugmentSettings checks them.
    time_shift: int = setting(0, "speech: shift clips by up to this many frames", group="augmentation",
                              metavar="FRAMES")
    time_masks: int = setting(0, "speech: SpecAugment time masks per clip", group="augmentation", metavar="N")
    time_mask_width: int = setting(0, "speech: widest time mask", group="augmentation", metavar="FRAMES")
    freq_masks: int = setting(0, "speech: SpecAugment frequency masks per clip", group="augmentation",
                              metavar="N")
    freq_mask_width: int = setting(0, "speech: widest frequency mask", group="augmentation", metavar="FILTERS")
    gain_db: float = setting(0.0, "speech: random gain in +-DB per clip", group="augmentation", metavar="DB")
    mixup: float = setting(0.0, "mixup with Beta(ALPHA, ALPHA) weights (0: off)", group="augmentation",
                           metavar="ALPHA")
    extra: dict[str, Any] = setting(dict, "free-form notes kept with the run", flag=None)

    def resolved(self, domain: str | None = None) -> "TrainConfig":
        """Fill the lab defaults that depend on the data set's domain and validate everything."""
        domain = domain or _domain(self.dataset)
        cfg = dataclasses.replace(self, **{f.name: s.lab[domain] for f, s in settings()
                                           if s.lab and getattr(self, f.name) is None})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for f, _ in settings():
            check_setting(f.name, getattr(self, f.name))
        self.check_model_fits_dataset()
        self.check_augmentation()
        self.check_classes()

    def check_classes(self) -> None:
        """Refuse bad ``classes`` before any file is written (the data loader would, only later)."""
        if self.classes is None:
            return
        if _domain(self.dataset) != "cifar":
            raise ConfigError("--classes applies to CIFAR data sets only")
        from flaxcnn.data.cifar import check_classes

        check_classes(self.classes)

    def augment_settings(self) -> AugmentSettings:
        """The augmentation fields as one :class:`~flaxcnn.train.augment.AugmentSettings`."""
        return AugmentSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AugmentSettings)})

    def check_augmentation(self) -> None:
        settings = self.augment_settings()
        settings.validate()
        if settings.spectrogram and _domain(self.dataset) != "speech":
            raise ConfigError("--time-shift, --time-masks, --freq-masks and --gain-db augment speech features "
                              f"only; dataset {self.dataset!r} is images (--mixup applies to both)")

    def check_model_fits_dataset(self) -> None:
        from flaxcnn.models.registry import MODELS, get_model

        domain = _domain(self.dataset)
        spec = get_model(self.model if self.model is not None else lab_default("model", domain))
        if spec.domain is not None and spec.domain != domain:  # a model from a file: checked against the data
            fitting = ", ".join(n for n, s in MODELS.items() if s.domain == domain)
            raise ConfigError(f"model {spec.name!r} is a {spec.domain} model and cannot train on "
                              f"{self.dataset!r}; {domain} models: {fitting}")

    def for_resume(self, saved: "TrainConfig") -> "TrainConfig":
        """The settings of a resumed run: ``saved``'s, except where a field's ``on_resume`` takes
        this (the command's) value."""
        given = {f.name: getattr(self, f.name) for f, s in settings()
                 if s.on_resume == "given" or (s.on_resume == "given_if_set" and getattr(self, f.name) is not None)}
        return dataclasses.replace(saved, **given)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["classes"] = list(self.classes) if self.classes is not None else None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        if data.get("classes") is not None:
            data["classes"] = tuple(data["classes"])
        return cls(**data)


def _domain(dataset: str) -> str:
    from flaxcnn.data import dataset_domain

    return dataset_domain(dataset)


# ----------------------------------------------------------------------------- reading the fields

@functools.cache
def settings() -> tuple[tuple[dataclasses.Field, Setting], ...]:
    """Every field of :class:`TrainConfig` with its :class:`Setting`, in declaration order."""
    return tuple((f, f.metadata["setting"]) for f in dataclasses.fields(TrainConfig))


@functools.cache
def _by_name() -> dict[str, tuple[dataclasses.Field, Setting]]:
    return {f.name: (f, s) for f, s in settings()}


def _setting(name: str) -> Setting:
    return _by_name()[name][1]


def lab_default(name: str, domain: str) -> Any:
    """Field ``name``'s default for a data-set domain (``"cifar"`` or ``"speech"``)."""
    return _setting(name).lab[domain]


def value_type(name: str) -> type:
    """The type of a field's values, without its None (``int | None`` -> ``int``)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


def flag_of(name: str) -> str | None:
    """The command-line flag of a field (``lr`` -> ``--lr``), or None."""
    flag = _setting(name).flag
    return f"--{name.replace('_', '-')}" if flag == "" else flag


def check_setting(name: str, value: Any) -> None:
    """ConfigError unless ``value`` is allowed for field ``name`` (None is, where it is the default)."""
    f, s = _by_name()[name]
    if value is None and f.default is None:
        return
    label = flag_of(name) or s.label or name
    if s.choices and value not in s.choices:
        raise ConfigError(f"{label} must be one of {', '.join(s.choices)}, got {value!r}")
    if s.rule is not None and not s.rule.test(value):
        raise ConfigError(f"{label} must be {s.rule.text}, got {value}")


def help_text(name: str) -> str:
    """A field's command-line help: what it is, the names it takes, its default (per domain where
    the labs differ: ``default 100 for lab 8, 150 for speech``)."""
    f, s = _by_name()[name]
    notes = [f"one of: {', '.join(s.names())}"] if s.names else []
    if s.lab:
        notes.append("default " + ", ".join(f"{s.lab[domain]} for {DOMAIN_LABELS[domain]}" for domain in s.lab))
    elif not isinstance(f.default, bool) and f.default not in (None, 0, ""):
        notes.append(f"default {f.default}")
    return f"{s.help} ({'; '.join(notes)})" if notes else s.help


def as_options(overrides: dict[str, Any]) -> str:
    """Field values as the command-line options that set them (what ``flaxcnn presets`` prints)."""
    words: list[str] = []
    for name, value in overrides.items():
        f = _by_name()[name][0]
        if value_type(name) is bool:
            words += [flag_of(name)] if value != f.default else []
        else:
            words += [flag_of(name), ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return " ".join(words)


#: name -> (description, overrides). Each reproduces one run of the labs.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "lab8-net": ("lab 8: Net on CIFAR-2, SGD lr 1e-2, batch 64, 100 epochs",
                 dict(model="net", dataset="cifar2", lr=1e-2, batch_size=64, epochs=100, momentum=0.0)),
    "lab8-width": ("lab 8: NetWidth(32)", dict(model="net-width", dataset="cifar2", lr=1e-2, batch_size=64,
                                              epochs=100, momentum=0.0)),
    "lab8-depth": ("lab 8: NetDepth(32) (pool after conv2 restored)",
                   dict(model="net-depth", dataset="cifar2", lr=1e-2, batch_size=64, epochs=100, momentum=0.0)),
    "lab8-l2": ("lab 8: Net with the explicit L2 penalty, lambda 0.001 (sum of parameter L2 norms)",
                dict(model="net", dataset="cifar2", lr=1e-2, batch_size=64, epochs=100, momentum=0.0, l2=1e-3)),
    "lab8-wd": ("lab 8: Net with SGD weight_decay 0.001",
                dict(model="net", dataset="cifar2", lr=1e-2, batch_size=64, epochs=100, momentum=0.0,
                     weight_decay=1e-3)),
    "lab8-dropout": ("lab 8: NetDropout(32)", dict(model="net-dropout", dataset="cifar2", lr=1e-2, batch_size=64,
                                                  epochs=100, momentum=0.0)),
    "lab8-batchnorm": ("lab 8: NetBatchNorm(32)", dict(model="net-batchnorm", dataset="cifar2", lr=1e-2,
                                                      batch_size=64, epochs=100, momentum=0.0)),
    "speech-convnet": ("speech lab: ConvNet, SGD momentum 0.9, batch 256, 150 epochs, the lab's split, lr 1e-3 "
                       "(the lab trains with its LR finder's suggestion from a 1e-8..1e-3 sweep: add --lr-find)",
                       dict(model="convnet", dataset="speech", split="lab", lr=1e-3, momentum=0.9, batch_size=256,
                            epochs=150)),
    "speech-baseline": ("SpeechNet (25k parameters) on speakers unseen in training: the small-model baseline "
                        "that speech-exercise is measured against",
                         dict(model="speechnet", dataset="speech", split="speaker", lr=2e-2, momentum=0.9,
                              batch_size=64, epochs=40, weight_decay=5e-4, schedule="cosine")),
    "speech-exercise": ("the speech exercise, chosen by speaker-grouped cross-validation (README): SpeechResNet, "
                        "light time shift and SpecAugment masks; `flaxcnn cv --preset speech-exercise --final` "
                        "trains the final model on every clip",
                        dict(model="speechresnet", dataset="speech", split="speaker", lr=2e-2, momentum=0.9,
                             batch_size=64, epochs=60, weight_decay=5e-4, schedule="cosine", time_shift=8,
                             time_masks=1, time_mask_width=8, freq_masks=1, freq_mask_width=3)),
}


def apply_preset(config: TrainConfig, name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(config, preset=name, **PRESETS[name][1])
