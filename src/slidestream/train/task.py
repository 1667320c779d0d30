"""What the one training loop (:func:`slidestream.train.loop.fit`) needs from a trainer.

A :class:`Task` says what a batch is, the loss, how to evaluate and what a checkpoint records;
the loop owns everything else: device, mixed precision, accumulation, DDP, timing, resume,
the best-epoch rule, checkpoints and logging.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Settings", "Task"]


@dataclass
class Settings:
    """The loop's settings, common to every trainer (each trainer's config fills them).

    ``amp``: None = automatic (on for CUDA: bf16 where supported, else fp16 with a
    GradScaler; off on the CPU). ``channels_last``: None = on for CUDA. ``best_metric``: a
    validation metric name (``auc``, ``loss``, ``mae``…; names ending in ``loss`` and ``mae``
    are minimised); epochs without validation rank by ``train_loss``. ``ddp_timeout_min``:
    minutes a collective waits for a silent rank before the run stops with its name.
    """

    run: Any  # Path of the run folder
    epochs: int = 10
    device: str = "auto"
    amp: bool | None = None
    channels_last: bool | None = None
    seed: int = 0
    val_interval: int = 1
    best_metric: str = "auc"
    resume_from: str | None = None
    average_window: int = 0
    ddp_timeout_min: float = 10.0
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """One kind of training: the model, its data, its loss and its metrics.

    Attributes set by :meth:`setup`: ``model`` (an ``nn.Module`` on the device), ``classes``.
    ``skipped`` maps unreadable slides to their error (listed in ``summary.json``).
    """

    kind: str = ""
    run: Any = None  # the run folder (a Path), set by the loop before setup
    unit: str = "images"  # what a training item is, in metrics.csv and the console (MIL: bags)
    cfg: Any  # the trainer's config dataclass
    model: nn.Module
    classes: list[str]

    def __init__(self) -> None:
        self.skipped: dict[str, str] = {}

    @abstractmethod
    def setup(self, device: torch.device, rank: int, world: int, channels_last: bool) -> None:
        """Build data, model (on ``device``) and loaders for this rank."""

    @abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups (``params`` and ``lr`` at least)."""

    def make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The optimizer over ``groups``, from the task's config (``self.cfg``): ``optimizer``
        ``sgd`` (with ``momentum``) or ``adamw``, ``lr`` and ``weight_decay``."""
        cfg = self.cfg
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(
                groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def make_scheduler(self, opt: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
        """The per-step LR schedule of the config's ``schedule`` (constant, cosine or step)
        after ``warmup_epochs`` of linear warm-up (see :func:`slidestream.train.schedule.
        lr_factor`); None for a constant lr without warm-up."""
        from slidestream.train.schedule import lr_factor

        schedule = getattr(self.cfg, "schedule", "constant")
        warmup = round(getattr(self.cfg, "warmup_epochs", 0) * steps_per_epoch)
        if schedule in ("constant", "none") and warmup == 0:
            return None
        total = steps_per_epoch * self.cfg.epochs
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, total, warmup, schedule)
        )

    def start_epoch(self, epoch: int) -> None:  # noqa: B027
        """Called before each training epoch (0-based): seeds, freezing."""

    @abstractmethod
    def steps(self, epoch: int) -> Iterator[list[Any]]:
        """The optimizer steps of ``epoch``: each a list of micro-batches, fetched lazily
        (the loop times the fetches as data wait). A micro-batch with an ``error`` key is
        skipped and counted."""

    @abstractmethod
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (for the progress bar and schedules)."""

    @abstractmethod
    def loss(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, int]:
        """Forward one micro-batch (under the loop's autocast): (mean loss, images in it)."""

    def loss_scale(self, images: int) -> float:
        """Factor on a micro-batch's mean loss before backward (accumulation: 1 / images per
        step; default 1)."""
        return 1.0

    @abstractmethod
    def evaluate(self, rank: int, world: int) -> dict[str, Any]:
        """Validation metrics (floats; ``confusion`` may be a matrix), or {} without data."""

    def has_validation(self) -> bool:
        return False

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """What a checkpoint records besides weights, optimizer and history (``kind``,
        ``model``, ``classes``, mpp, sizes, normalisation, ``config``)."""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """What a run folder may only be resumed with: model, classes, task, data."""

    def epoch_images(self, epoch: int, rows: list[dict[str, Any]]) -> None:  # noqa: B027
        """Write per-epoch pictures (validation grids) into the run folder."""
