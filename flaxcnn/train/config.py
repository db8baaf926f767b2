"""Training settings, their lab defaults, and named presets that reproduce the labs' runs.

A preset is one line of overrides (the big_vision idea): ``flaxcnn train --preset lab8-wd``
reproduces lab 8's weight-decay run and ``flaxcnn presets`` prints exactly what each one sets.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flaxcnn.errors import ConfigError

if TYPE_CHECKING:
    from flaxcnn.train.augment import AugmentSettings

PATHS = ("auto", "step", "scan")
CONV_IMPLS = ("auto", "kernels", "xla")  # flaxcnn.models.dispatch.MODES
SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    model: str = "net"
    dataset: str = "cifar2"
    out: str = "runs/net-cifar2"
    data_dir: str | None = None
    classes: tuple[int, ...] | None = None
    split: str = "lab"  # speech: lab | speaker | official
    val_fraction: float = 0.0  # CIFAR: hold out this much of train as validation
    epochs: int | None = None  # lab defaults: 100 (lab 8), 150 (speech)
    batch_size: int | None = None  # 64 (lab 8), 256 (speech)
    lr: float | None = None  # 1e-2 (lab 8); speech 1e-3, the top of the lab's LR-finder range
    schedule: str = "constant"  # constant | cosine (decays to 0 over the run)
    momentum: float | None = None  # 0 (lab 8 plain SGD), 0.9 (speech lab)
    weight_decay: float = 0.0  # torch SGD weight_decay semantics
    l2: float = 0.0  # lab 8's explicit penalty: l2 * sum of each parameter tensor's L2 norm
    seed: int = 0
    init: str = "torch"  # torch's U(+-1/sqrt(fan_in)) or flax's lecun_normal
    shuffle: bool = True  # lab 8 shuffles; the speech lab's DataLoader does not (use False to match)
    path: str = "auto"  # auto | step | scan (see flaxcnn.train.steps)
    conv_impl: str = "auto"  # CPU convolutions/pools: auto (measured) | kernels | xla (flaxcnn.models.dispatch)
    eval_batch_size: int = 1000
    checkpoint_every: int = 1
    devices: int | None = None  # data parallel over this many local devices per process (None: all)
    num_classes: int | None = None  # default: the data set's number of classes
    preset: str | None = None
    # Training-time augmentation, on device (flaxcnn.train.augment); all off by default and in
    # the lab presets. Spectrogram transforms apply to speech only.
    time_shift: int = 0  # max frames a clip moves either way
    time_masks: int = 0  # SpecAugment time masks per clip ...
    time_mask_width: int = 0  # ... each up to this many frames
    freq_masks: int = 0  # SpecAugment frequency masks per clip ...
    freq_mask_width: int = 0  # ... each up to this many mel filters
    gain_db: float = 0.0  # random gain in +-gain_db dB per clip
    mixup: float = 0.0  # mixup Beta(alpha, alpha); 0 = off
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self, domain: str) -> "TrainConfig":
        """Fill the lab defaults that depend on the data set's domain and validate everything."""
        lab8 = domain == "cifar"
        cfg = dataclasses.replace(
            self,
            epochs=self.epochs if self.epochs is not None else (100 if lab8 else 150),
            batch_size=self.batch_size if self.batch_size is not None else (64 if lab8 else 256),
            momentum=self.momentum if self.momentum is not None else (0.0 if lab8 else 0.9),
            lr=self.lr if self.lr is not None else (1e-2 if lab8 else 1e-3),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.epochs is None or (isinstance(self.epochs, int) and self.epochs >= 1),
             f"--epochs must be an integer >= 1, got {self.epochs}")
        need(self.batch_size is None or (isinstance(self.batch_size, int) and self.batch_size >= 1),
             f"--batch-size must be an integer >= 1, got {self.batch_size}")
        need(self.lr is None or (math.isfinite(self.lr) and self.lr > 0),
             f"--lr must be a positive number, got {self.lr}")
        need(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(self.momentum is None or (math.isfinite(self.momentum) and 0 <= self.momentum < 1),
             f"--momentum must be in [0, 1), got {self.momentum}")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(math.isfinite(self.l2) and self.l2 >= 0, f"--l2 must be >= 0, got {self.l2}")
        need(0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        need(self.path in PATHS, f"--path must be one of {', '.join(PATHS)}, got {self.path!r}")
        need(self.conv_impl in CONV_IMPLS,
             f"--conv-impl must be one of {', '.join(CONV_IMPLS)}, got {self.conv_impl!r}")
        need(self.init in ("torch", "flax"), f"--init must be torch or flax, got {self.init!r}")
        need(self.eval_batch_size >= 1, f"eval batch size must be >= 1, got {self.eval_batch_size}")
        need(self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        need(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        need(self.devices is None or (isinstance(self.devices, int) and not isinstance(self.devices, bool)
                                      and self.devices >= 1),
             f"--devices must be an integer >= 1, got {self.devices}")
        self.check_model_fits_dataset()
        self.check_augmentation()

    def augment_settings(self) -> AugmentSettings:
        """The augmentation fields as one :class:`~flaxcnn.train.augment.AugmentSettings`."""
        from flaxcnn.train.augment import AugmentSettings

        return AugmentSettings(time_shift=self.time_shift, time_masks=self.time_masks,
                               time_mask_width=self.time_mask_width, freq_masks=self.freq_masks,
                               freq_mask_width=self.freq_mask_width, gain_db=self.gain_db, mixup=self.mixup)

    def check_augmentation(self) -> None:
        from flaxcnn.data import dataset_domain

        settings = self.augment_settings()
        settings.validate()
        if settings.spectrogram and dataset_domain(self.dataset) != "speech":
            raise ConfigError("--time-shift, --time-masks, --freq-masks and --gain-db augment speech features "
                              f"only; dataset {self.dataset!r} is images (--mixup applies to both)")

    def check_model_fits_dataset(self) -> None:
        from flaxcnn.data import dataset_domain
        from flaxcnn.models.registry import MODELS, get_model

        spec, domain = get_model(self.model), dataset_domain(self.dataset)
        if spec.domain != domain:
            fitting = ", ".join(n for n, s in MODELS.items() if s.domain == domain)
            raise ConfigError(f"model {spec.name!r} is a {spec.domain} model and cannot train on "
                              f"{self.dataset!r}; {domain} models: {fitting}")

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
    "speech-speechnet": ("the speech lab's exercise: SpeechNet on speakers unseen in training",
                         dict(model="speechnet", dataset="speech", split="speaker", lr=2e-2, momentum=0.9,
                              batch_size=64, epochs=40, weight_decay=5e-4, schedule="cosine")),
    "speech-exercise": ("the speech exercise, chosen by speaker-grouped cross-validation (README): SpeechResNet, "
                        "light time shift and SpecAugment masks; `flaxcnn cv --preset speech-exercise --final` "
                        "trains the final model on every clip",
                        dict(model="speechresnet", dataset="speech", split="speaker", lr=2e-2, momentum=0.9,
                             batch_size=64, epochs=30, weight_decay=5e-4, schedule="cosine", time_shift=8,
                             time_masks=1, time_mask_width=8, freq_masks=1, freq_mask_width=3)),
}


def apply_preset(config: TrainConfig, name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(config, preset=name, **PRESETS[name][1])
