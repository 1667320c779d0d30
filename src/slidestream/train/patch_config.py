"""Settings of the patch-classifier trainer (kept free of heavy imports for the CLI)."""

from __future__ import annotations

from dataclasses import dataclass

from slidestream.errors import ConfigError
from slidestream.train.schedule import check_schedule

__all__ = ["PatchTrainConfig"]


@dataclass
class PatchTrainConfig:
    """Settings of ``slidestream train-patches`` (every field is also a ``--flag``)."""

    data: str = ""  # DB.train.h5, or a cohort CSV (streamed with PatchStream)
    val_data: str | None = None  # DB.val.h5 or CSV; default: the sibling .val.h5 of data
    model: str = "densenet121"  # any torchvision classifier, or timm/<name> with timm
    weights: str | None = None  # torchvision weights name, state-dict file, or none
    size: int = 256  # patch size for streamed data (databases carry their own)
    mpp: float = 0.5  # µm/px for streamed data
    epochs: int = 10  # epochs of steps_per_epoch steps
    steps_per_epoch: int | None = None  # steps/epoch; none: a database pass, 200 (streams)
    batch_size: int = 32  # patches per optimizer step
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 1e-4  # L2 weight decay (decoupled for adamw)
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9  # SGD momentum
    schedule: str = "cosine"  # constant | cosine (to 0) | step (×0.1 at 50%, 75%)
    warmup_epochs: float = 0.0  # epochs of linear lr warm-up before the schedule
    amp: bool | None = None  # mixed precision; none: on for CUDA (bf16, or fp16 + GradScaler)
    channels_last: bool | None = None  # channels-last model and batches; none: on for CUDA
    class_weighting: str = "none"  # none | balanced (loss weights 1 / class frequency)
    balanced_sampling: bool = False  # draw patches (or slides, streamed) class-balanced
    augmentation: str = "light"  # light (flips/rot90, HED) | strong (+colour, blur, elastic) | none
    stain_norm: str | None = None  # macenko | reinhard | vahadane, to stain_target
    stain_target: str | None = None  # image, slide or stain.json; saved as stain.json in the run
    workers: int = 2  # DataLoader processes
    seed: int = 0  # seeds model init, sampling and augmentation
    out: str = "runs"  # folder holding run folders
    name: str | None = None  # run folder under out; none: named from data and model
    resume_from: str | None = None  # start from this checkpoint's weights (a new run)
    val_interval: int = 1  # validate every N epochs
    best_metric: str = "accuracy"  # accuracy | balanced_accuracy | auc | kappa_quadratic
    device: str = "auto"  # auto (CUDA if available) | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("data is required: a patch database (.h5) or a cohort CSV")
        checks = {
            "optimizer": ("adamw", "sgd"),
            "class_weighting": ("none", "balanced"),
            "augmentation": ("light", "strong", "none"),
            "stain_norm": (None, "macenko", "reinhard", "vahadane"),
        }
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs and batch_size must be >= 1 and lr > 0")
        check_schedule(self.schedule, self.warmup_epochs, self.epochs)
