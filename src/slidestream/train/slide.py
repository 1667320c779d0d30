"""Whole-slide training end to end with slide labels, on the exact streaming engine.

The trunk of a torchvision CNN runs tile by tile (:class:`~slidestream.streaming.StreamingModule`)
over whole prepared slides; global max or mean pooling and a linear layer make the call. Batches
are single images with gradient accumulation; under ``torchrun`` each rank streams its share of
every optimizer step's images and gradients are summed across ranks once per step, so training
equals single-process training with the same effective batch.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from slidestream.data import CoarseElastic, HEDJitter, RandomFlipRot90
from slidestream.data.functional import IMAGENET_MEAN, IMAGENET_STD
from slidestream.data.slides import SlideImageDataset
from slidestream.errors import ConfigError
from slidestream.models import split_model
from slidestream.sampling import Cohort, load_cohort
from slidestream.streaming import StreamingModule
from slidestream.train.slide_config import SlideTrainConfig

__all__ = ["SlideClassifier", "build_model", "load_slide_model", "slide_datasets", "step_order"]

log = logging.getLogger(__name__)


class SlideClassifier(nn.Module):
    """Streamed trunk → global pooling → linear. Input: (N, 3, H, W) uint8 or float in [0, 255]."""

    def __init__(
        self, trunk: nn.Module, channels: int, outputs: int, *, tile_size: int, pooling: str = "max"
    ) -> None:
        super().__init__()
        self.stream = StreamingModule(
            trunk,
            tile_size,
            background=255.0,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            input_scale=1.0 / 255.0,
        )
        self.pooling = pooling
        self.fc = nn.Linear(channels, outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stream(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = f.amax(dim=(2, 3)) if self.pooling == "max" else f.mean(dim=(2, 3))
        return self.fc(pooled)


def outputs_for(task: str, classes: list[str]) -> int:
    return (
        1
        if task == "regression"
        else max(2, len(classes))
        if task != "multilabel"
        else len(classes)
    )


def build_model(cfg: SlideTrainConfig, classes: list[str]) -> SlideClassifier:
    """The streamed model described by ``cfg`` (weights as ``cfg.weights`` says)."""
    # from random init, residual branches start at zero: the frozen (eval-mode) BatchNorms do
    # not renormalise, and an unnormalised deep trunk diverges under the first updates
    trunk, _ = split_model(
        cfg.model, cfg.stream_until, cfg.weights, zero_init_residual=cfg.weights is None
    )
    with torch.no_grad():
        channels = trunk.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
    trunk.train()
    return SlideClassifier(
        trunk,
        channels,
        outputs_for(cfg.task, classes),
        tile_size=cfg.tile_size,
        pooling=cfg.pooling,
    )


def load_slide_model(ckpt: dict[str, Any]) -> tuple[SlideClassifier, SlideTrainConfig]:
    """Rebuild a streamed model from a ``kind="streaming"`` checkpoint (random init, then the
    checkpoint's weights)."""
    if ckpt.get("kind") != "streaming":
        raise ConfigError(f"not a streaming checkpoint (kind {ckpt.get('kind')!r})")
    fields = SlideTrainConfig.__dataclass_fields__
    cfg = SlideTrainConfig(**{k: v for k, v in ckpt["config"].items() if k in fields})
    cfg.weights = None
    model = build_model(cfg, list(ckpt["classes"]))
    model.load_state_dict(ckpt["state_dict"])
    return model, cfg


def resolve_classes(cfg: SlideTrainConfig, cohort: Cohort) -> list[str]:
    if cfg.task == "regression":
        return []
    if cfg.classes:
        return [c.strip() for c in cfg.classes.split(",") if c.strip()]
    if cfg.task == "multilabel":
        return sorted({p.strip() for s in cohort for p in (s.label or "").split(";") if p.strip()})
    return cohort.classes


def slide_datasets(
    cfg: SlideTrainConfig,
) -> tuple[SlideImageDataset, SlideImageDataset | None, list[str]]:
    """Training and validation datasets (labels checked up front, bad rows named)."""
    cohort = load_cohort(cfg.data)
    if cohort.problems:
        log.warning("left out of training: %s", "; ".join(cohort.problems))
    train_c = cohort.split("train") if any(s.split for s in cohort) else cohort
    val_c = (
        load_cohort(cfg.val_data)
        if cfg.val_data
        else (cohort.split("val") if any(s.split == "val" for s in cohort) else None)
    )
    if cfg.train_set_size:
        train_c.slides = train_c.slides[: cfg.train_set_size]
    if not len(train_c):
        raise ConfigError(f"no training slides in {cfg.data}")
    classes = resolve_classes(cfg, train_c)
    size = (cfg.image_size, cfg.image_size) if cfg.image_size else None
    aug = None
    if cfg.augmentation:
        ops: list[torch.nn.Module] = [RandomFlipRot90(), HEDJitter()]
        if cfg.elastic > 0:
            ops.append(v2.RandomApply([CoarseElastic(sigma=8.0, spacing=256)], p=cfg.elastic))
        aug = torch.nn.Sequential(*ops)
    train = SlideImageDataset(
        train_c, cfg.task, classes, image_size=size, train=True, transform=aug, seed=cfg.seed
    )
    val = SlideImageDataset(val_c, cfg.task, classes, image_size=size) if val_c else None
    return train, val, classes


def step_order(
    n: int,
    cfg: SlideTrainConfig,
    epoch: int,
    targets: list[Any] | None = None,
) -> np.ndarray:
    """Image order of one epoch (seeded by epoch): ``epoch_multiply`` passes, shuffled, or drawn
    inversely to class frequency with ``weighted_sampler``."""
    rng = np.random.default_rng([cfg.seed, epoch])
    total = n * cfg.epoch_multiply
    if cfg.weighted_sampler and targets is not None:
        labels = np.asarray([int(t) for t in targets])
        w = 1.0 / np.bincount(labels)[labels]
        return rng.choice(n, total, p=w / w.sum())
    return np.concatenate([rng.permutation(n) for _ in range(cfg.epoch_multiply)])


def loss_fn(task: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task in ("binary", "multiclass"):
        return nn.functional.cross_entropy(logits, target.long().view(-1))
    if task == "multilabel":
        return nn.functional.binary_cross_entropy_with_logits(logits, target.float())
    return nn.functional.smooth_l1_loss(logits.view(-1), target.float().view(-1))


def predictions(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Probabilities (classification) or values (regression) from logits."""
    if task in ("binary", "multiclass"):
        return torch.softmax(logits.float(), 1)
    if task == "multilabel":
        return torch.sigmoid(logits.float())
    return logits.float().view(-1, 1)


def distributed(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, world size) under torchrun, initialising the process group once: NCCL when the
    ranks train on CUDA ``device``s, Gloo otherwise (``--device cpu`` on a GPU machine too)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world


def run_dir(cfg: SlideTrainConfig) -> Path:
    return Path(cfg.out) / cfg.name


def average_states(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the float tensors of several checkpoints' state dicts."""
    from slidestream.train.checkpoint import load_checkpoint

    states = [load_checkpoint(p)["state_dict"] for p in paths]
    out = {}
    for k, v in states[0].items():
        out[k] = (
            torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
            if v.is_floating_point()
            else v
        )
    return out


def is_better(metric: str, value: float, best: float) -> bool:
    if not math.isfinite(value):
        return False
    # ties go to the later epoch: equal ranking metrics, but longer training
    return value <= best if metric.endswith("loss") or metric == "mae" else value >= best
