"""Settings of ``slidestream train-mil`` (MIL on feature files); every field is a flag."""

from __future__ import annotations

from dataclasses import dataclass

from slidestream.errors import ConfigError
from slidestream.train.schedule import check_schedule

__all__ = ["MILTrainConfig"]


@dataclass
class MILTrainConfig:
    """Slide-level MIL on frozen patch features (``slidestream features``) with slide labels."""

    data: str = ""  # cohort CSV (slide,label[,patient,split]) of the slides the features are of
    features: str = ""  # folder of <slide stem>.h5 feature files
    val_data: str | None = None  # CSV of validation slides; default: rows with split=val
    split: str | None = None  # without split column or val_data: e.g. train=0.8,val=0.2 by patient
    task: str = "binary"  # binary | multiclass | multilabel | regression
    classes: str | None = None  # comma-separated class order; default: sorted labels
    model: str = "abmil"  # abmil (gated attention) | mean | max | transmil
    hidden: int = 256  # instance embedding size
    dropout: float = 0.25  # dropout after the instance projection (0-1)
    layers: int = 2  # transformer blocks of transmil
    standardize: bool = True  # per-feature mean/std of the training instances, kept in the model
    max_instances: int | None = 4096  # random instances per training bag (none: all)
    class_weighting: str = "none"  # none | balanced (binary/multiclass loss weights)
    epochs: int = 20  # passes over the training bags
    lr: float = 2e-4  # learning rate
    weight_decay: float = 1e-4  # L2 weight decay (decoupled for adamw)
    optimizer: str = "adamw"  # adamw | sgd
    schedule: str = "constant"  # constant | cosine (to 0) | step (×0.1 at 50%, 75%)
    warmup_epochs: float = 0.0  # epochs of linear lr warm-up before the schedule
    momentum: float = 0.9  # SGD momentum
    accumulate: int = 1  # bags per optimizer step
    amp: bool | None = None  # mixed precision; none: on for CUDA
    val_interval: int = 1  # validate every N epochs
    best_metric: str = "auc"  # validation metric for best.pt (loss, mae are minimised)
    resume_from: str | None = None  # start from this checkpoint's weights (a new run)
    workers: int = 0  # DataLoader processes reading feature files
    seed: int = 0  # seeds init, bag order and instance sampling
    out: str = "runs"  # folder holding run folders
    name: str | None = None  # run folder under out; none: named from data, model and task
    device: str = "auto"  # auto (CUDA if available) | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        if not self.data or not self.features:
            raise ConfigError(
                "data (cohort CSV) and features (folder from slidestream features) are required"
            )
        checks = {
            "task": ("binary", "multiclass", "multilabel", "regression"),
            "model": ("abmil", "mean", "max", "transmil"),
            "class_weighting": ("none", "balanced"),
            "optimizer": ("adamw", "sgd"),
        }
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.epochs < 1 or self.accumulate < 1 or self.lr <= 0 or self.hidden < 1:
            raise ConfigError("epochs, accumulate and hidden must be >= 1 and lr > 0")
        check_schedule(self.schedule, self.warmup_epochs, self.epochs)
        if self.max_instances is not None and self.max_instances < 1:
            raise ConfigError(f"max_instances must be >= 1 or none, got {self.max_instances}")
        if not 0 <= self.dropout < 1 or self.workers < 0:
            raise ConfigError("dropout must be in [0, 1) and workers >= 0")
