"""Settings of the patch-classifier trainer (kept free of heavy imports for the CLI)."""

from __future__ import annotations

from dataclasses import dataclass

from slidestream.errors import ConfigError

__all__ = ["PatchTrainConfig"]


@dataclass
class PatchTrainConfig:
    """Settings of ``slidestream train-patches`` (every field is also a ``--flag``)."""

    data: str = ""  # DB.train.h5, or a cohort CSV (streamed with PatchStream)
    val_data: str | None = None  # DB.val.h5 or CSV; default: the sibling .val.h5 of data
    model: str = "densenet121"
    weights: str | None = None  # torchvision weights name, state-dict file, or none
    size: int = 256  # patch size for streamed data (databases carry their own)
    mpp: float = 0.5  # µm/px for streamed data
    epochs: int = 10
    steps_per_epoch: int | None = None  # default: one pass over the database; 200 for streams
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9
    schedule: str = "cosine"  # cosine | none
    amp: bool | None = None  # mixed precision; none: on for CUDA (bf16, or fp16 + GradScaler)
    channels_last: bool | None = None  # channels-last model and batches; none: on for CUDA
    class_weighting: str = "none"  # none | balanced
    balanced_sampling: bool = False
    augmentation: str = "light"  # light | strong | none
    workers: int = 2
    seed: int = 0
    out: str = "runs"
    name: str | None = None  # run folder under out; none: named from data and model
    resume_from: str | None = None  # start from this checkpoint's weights (a new run)
    val_interval: int = 1
    best_metric: str = "accuracy"
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("data is required: a patch database (.h5) or a cohort CSV")
        checks = {
            "optimizer": ("adamw", "sgd"),
            "schedule": ("cosine", "none"),
            "class_weighting": ("none", "balanced"),
            "augmentation": ("light", "strong", "none"),
        }
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs and batch_size must be >= 1 and lr > 0")
