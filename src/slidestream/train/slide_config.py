"""Settings of ``slidestream train`` (streamed whole-slide training); every field is a flag."""

from __future__ import annotations

from dataclasses import dataclass

from slidestream.errors import ConfigError
from slidestream.train.schedule import check_schedule

__all__ = ["SlideTrainConfig"]


@dataclass
class SlideTrainConfig:
    """Whole-slide classification/regression trained end to end with slide labels."""

    data: str = ""  # prepared.csv (slide,label[,patient,split]) from slidestream prepare
    val_data: str | None = None  # CSV of validation slides; default: rows with split=val
    task: str = "binary"  # binary | multiclass | multilabel | regression
    classes: str | None = None  # comma-separated class order; default: sorted labels
    model: str = "resnet34"  # torchvision CNN: resnet18/34/50, densenet121, convnext_tiny, …
    stream_until: str | None = None  # last trunk stage streamed (default: last conv stage)
    weights: str | None = None  # torchvision weights name, state-dict file, or none
    pooling: str = "max"  # global max or mean pooling of the streamed feature map
    image_size: int | None = 2048  # square crop/pad (random for training); none: whole slide
    tile_size: str | int = "auto"  # streaming tile, input px; auto: probed (CUDA), 1024 (CPU)
    memory_budget: float | None = None  # GB for --tile-size auto; default: 85% of free memory
    stages: str | None = None  # cut the streaming after these trunk stages, e.g. layer2
    epochs: int = 10  # passes of training (see epoch_multiply)
    lr: float = 1e-4  # learning rate of the head (and of the trunk, see trunk_lr_factor)
    optimizer: str = "sgd"  # sgd (momentum) | adamw
    schedule: str = "constant"  # constant | cosine (to 0) | step (×0.1 at 50%, 75%)
    warmup_epochs: float = 0.0  # epochs of linear lr warm-up before the schedule
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-5  # L2 weight decay (decoupled for adamw)
    accumulate: int = 1  # images per optimizer step (effective batch size)
    weighted_sampler: bool = False  # sample slides inversely to their class frequency
    train_all_layers: bool = True  # False: train the head only
    unfreeze_epoch: int = 0  # > 0: trunk frozen until this epoch, then trained at trunk_lr
    trunk_lr_factor: float = 0.1  # trunk lr = lr × this once unfrozen (with unfreeze_epoch)
    amp: bool | None = None  # mixed precision; none: on for CUDA (bf16, or fp16 + GradScaler)
    channels_last: bool | None = None  # channels-last trunk and crops; none: on for CUDA
    check_streaming: bool = True  # first-use check of trunks with non-torch.nn modules
    epoch_multiply: int = 1  # passes over the training slides per epoch
    train_set_size: int | None = None  # use only the first N training slides
    val_interval: int = 1  # validate every N epochs
    augmentation: bool = True  # flips, 90° rotations, HED jitter, one draw per whole image
    elastic: float = 0.0  # probability of an elastic deformation of the whole image (8 px)
    best_metric: str = "auc"  # validation metric for best.pt (loss is minimised)
    average_window: int = 0  # > 0: average weights of epochs best±window into averaged.pt
    resume_from: str | None = None  # a checkpoint of another run to start from
    workers: int = 2  # DataLoader processes reading, masking (and on CPU augmenting) slides
    prefetch: int = 2  # images each worker reads ahead
    ddp_timeout: float = 10.0  # minutes a DDP collective waits for a silent rank
    seed: int = 0  # seeds model init, image order, crops and augmentation
    out: str = "runs"  # folder holding run folders
    name: str | None = None  # run folder under out; none: named from data, model and task
    device: str = "auto"  # auto (CUDA if available) | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("data is required: the prepared.csv written by slidestream prepare")
        checks = {
            "task": ("binary", "multiclass", "multilabel", "regression"),
            "pooling": ("max", "mean"),
            "optimizer": ("sgd", "adamw"),
        }
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if not 0 <= self.elastic <= 1:
            raise ConfigError(f"elastic is a probability in [0, 1], got {self.elastic}")
        if self.epochs < 1 or self.accumulate < 1 or self.lr <= 0:
            raise ConfigError("epochs and accumulate must be >= 1 and lr > 0")
        check_schedule(self.schedule, self.warmup_epochs, self.epochs)
        tile = str(self.tile_size).strip().lower()
        if tile != "auto" and not (tile.isdigit() and int(tile) >= 32):
            raise ConfigError(f"tile_size must be auto or a number of px >= 32, got {tile!r}")
        self.tile_size = tile if tile == "auto" else int(tile)
        if self.workers < 0 or self.prefetch < 1 or self.ddp_timeout <= 0:
            raise ConfigError("workers must be >= 0, prefetch >= 1 and ddp_timeout > 0")

    @property
    def stage_list(self) -> list[str]:
        return [s.strip() for s in (self.stages or "").split(",") if s.strip()]
