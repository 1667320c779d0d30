"""Whole-slide training end to end with slide labels, on the exact streaming engine.

:class:`SlideTask` is the streamed slide classifier's side of the one training loop
(:func:`~slidestream.train.loop.fit`): items come through a ``torch.utils.data.DataLoader``
whose ``workers`` read only the window each step uses from the prepared slide, with its tissue
mask, while the GPU trains; the mask is expanded and whole-image augmentation (flips/rot90, HED
jitter, elastic) applied on the GPU after upload (in the workers when training on the CPU),
one seeded draw per image. Batches are single images with gradient accumulation; under
``torchrun`` each rank reads and streams its share of every optimizer step's images.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from slidestream.data import CoarseElastic, HEDJitter, RandomFlipRot90
from slidestream.data.functional import IMAGENET_MEAN, IMAGENET_STD
from slidestream.data.slides import SlideImageDataset, SlideSampler, finish_image
from slidestream.errors import ConfigError
from slidestream.models.slide import SlideSpec, build_slide_model, predictions
from slidestream.sampling import Cohort, load_cohort
from slidestream.train.config import config_dict
from slidestream.train.metrics import classification_metrics, regression_metrics
from slidestream.train.runlog import file_digest, portable_path
from slidestream.train.slide_config import SlideTrainConfig
from slidestream.train.task import Task

__all__ = ["SlideTask", "loss_fn", "metrics_for", "slide_datasets"]

log = logging.getLogger(__name__)


def resolve_classes(cfg: SlideTrainConfig, cohort: Cohort) -> list[str]:
    if cfg.task == "regression":
        return []
    if cfg.classes:
        return [c.strip() for c in cfg.classes.split(",") if c.strip()]
    if cfg.task == "multilabel":
        return sorted({p.strip() for s in cohort for p in (s.label or "").split(";") if p.strip()})
    return cohort.classes


def augmentation(cfg: SlideTrainConfig) -> nn.Module | None:
    """Whole-image augmentation of ``cfg``: flips/rot90 and HED jitter, elastic with
    probability ``cfg.elastic``; None when off."""
    if not cfg.augmentation:
        return None
    ops: list[nn.Module] = [RandomFlipRot90(), HEDJitter()]
    if cfg.elastic > 0:
        ops.append(v2.RandomApply([CoarseElastic(sigma=8.0, spacing=256)], p=cfg.elastic))
    return nn.Sequential(*ops)


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
    train = SlideImageDataset(
        train_c,
        cfg.task,
        classes,
        image_size=size,
        train=True,
        transform=augmentation(cfg),
        seed=cfg.seed,
    )
    val = SlideImageDataset(val_c, cfg.task, classes, image_size=size) if val_c else None
    return train, val, classes


def loss_fn(task: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (binary/multiclass), BCE with logits (multilabel), smooth L1 (regression)."""
    if task in ("binary", "multiclass"):
        return nn.functional.cross_entropy(logits.float(), target.long().view(-1))
    if task == "multilabel":
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), target.float())
    return nn.functional.smooth_l1_loss(logits.float().view(-1), target.float().view(-1))


def metrics_for(task: str, targets: np.ndarray, out: np.ndarray, n_cls: int) -> dict[str, Any]:
    """Validation metrics of predictions ``out`` (N, outputs) against ``targets``."""
    if task == "regression":
        return regression_metrics(targets, out[:, 0])
    if task == "multilabel":
        from sklearn.metrics import roc_auc_score

        ok = [j for j in range(out.shape[1]) if len(np.unique(targets[:, j])) == 2]
        auc = (
            float(np.mean([roc_auc_score(targets[:, j], out[:, j]) for j in ok])) if ok else np.nan
        )
        return {"auc": float(auc), "accuracy": float(((out > 0.5) == targets).mean())}
    return classification_metrics(targets.astype(int), out, max(2, n_cls))


def _loader(
    ds: SlideImageDataset, sampler: Any, cfg: SlideTrainConfig, cuda: bool, persistent: bool
) -> DataLoader:
    from slidestream.data.loader import OneThread

    workers = cfg.workers
    return DataLoader(
        ds,
        batch_size=None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=cfg.prefetch if workers > 0 else None,
        worker_init_fn=OneThread() if workers > 0 else None,
    )


class SlideTask(Task):
    """Streamed whole-slide classification/regression with slide labels (``slidestream train``)."""

    kind = "streaming"

    def __init__(self, cfg: SlideTrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.train_ds, self.val_ds, self.classes = slide_datasets(cfg)
        self.spec = SlideSpec(
            name=cfg.model,
            task=cfg.task,
            classes=self.classes,
            stream_until=cfg.stream_until,
            pooling=cfg.pooling,
            tile_size=cfg.tile_size if isinstance(cfg.tile_size, int) else 1024,
            stages=cfg.stage_list,
        )

    # --- set-up ------------------------------------------------------------------------------
    def setup(self, device: torch.device, rank: int, world: int, channels_last: bool) -> None:
        cfg, cuda = self.cfg, device.type == "cuda"
        self.device, self.rank, self.world = device, rank, world
        self.model = build_slide_model(
            self.spec,
            cfg.weights,
            channels_last=channels_last,
            check_first_use=cfg.check_streaming,
        )
        self.model.to(device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if cfg.tile_size == "auto":
            self._auto_tile(device)
        # augmentation where it is cheapest: the GPU after upload, else the loader workers
        self.train_ds.finish_in_worker = not cuda
        if self.val_ds is not None:
            self.val_ds.finish_in_worker = not cuda
        labels = None
        if cfg.weighted_sampler:
            labels = [int(self.train_ds.target(s.label)) for s in self.train_ds.cohort]
        self.sampler = SlideSampler(
            len(self.train_ds),
            accumulate=cfg.accumulate,
            rank=rank,
            world=world,
            seed=cfg.seed,
            passes=cfg.epoch_multiply,
            labels=labels,
        )
        self.loader = _loader(self.train_ds, self.sampler, cfg, cuda, persistent=True)

    def _auto_tile(self, device: torch.device) -> None:
        from slidestream.train.loop import amp_dtype
        from slidestream.train.tuning import auto_tile_size

        cfg = self.cfg
        size = cfg.image_size or max(max(self._slide_dims(e.path)) for e in self.train_ds.cohort)
        tile = auto_tile_size(
            self.model,
            (size, size),
            device,
            budget_gb=cfg.memory_budget,
            dtype=amp_dtype(device, cfg.amp),
        )
        self.spec.tile_size = tile
        log.info("tile size %d px (auto, %s)", tile, device)

    @staticmethod
    def _slide_dims(path: Path) -> tuple[int, int]:
        from slidestream.io import open_slide

        with open_slide(path) as s:
            return s.dimensions

    def param_groups(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        trunk_lr = cfg.lr * (cfg.trunk_lr_factor if cfg.unfreeze_epoch else 1.0)
        return [
            {"params": list(self.model.fc.parameters()), "lr": cfg.lr},
            {"params": list(self.model.trunk.parameters()), "lr": trunk_lr},
        ]

    # --- training ----------------------------------------------------------------------------
    def start_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        trainable = cfg.train_all_layers and (not cfg.unfreeze_epoch or epoch >= cfg.unfreeze_epoch)
        for p in self.model.trunk.parameters():
            p.requires_grad_(trainable)
        self.sampler.set_epoch(epoch)
        self.train_ds.set_epoch(epoch)

    def steps_per_epoch(self) -> int:
        return len(self.sampler.steps())

    def steps(self, epoch: int) -> Iterator[Iterator[dict[str, Any]]]:
        it = iter(self.loader)
        for step in self.sampler.steps(epoch):
            yield (next(it) for _ in step)

    def loss(self, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, int]:
        transform = None if self.train_ds.finish_in_worker else self.train_ds.transform
        image = finish_image(batch, transform, device)[None]
        target = batch["target"][None].to(device, non_blocking=True)
        return loss_fn(self.cfg.task, self.model(image), target), 1

    def loss_scale(self, images: int) -> float:
        return 1.0 / self.cfg.accumulate

    # --- evaluation --------------------------------------------------------------------------
    def has_validation(self) -> bool:
        return self.val_ds is not None

    def evaluate(self, rank: int, world: int) -> dict[str, Any]:
        from slidestream.train.ddp import all_gather

        mine = infer(self.model, self.val_ds, self.cfg, self.device, rank, world, self.skipped)
        rows = sorted(r for part in all_gather(mine, world) for r in part)
        if not rows:
            return {}
        out = np.stack([r[1] for r in rows])
        targets = np.stack([r[2] for r in rows])
        metrics = metrics_for(self.cfg.task, targets, out, len(self.classes))
        if self.cfg.task in ("binary", "multiclass"):
            metrics["_eval"] = {"y": targets.astype(int).reshape(-1), "probs": out}
        return metrics

    # --- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        values = {s.mpp for s in self.train_ds.cohort if s.mpp}
        return {
            "kind": self.kind,
            "model": self.spec.as_dict(),
            "classes": self.classes,
            "task": self.cfg.task,
            "mpp": values.pop() if len(values) == 1 else None,
            "tile_size": self.spec.tile_size,
            "image_size": self.cfg.image_size,
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "config": {**config_dict(self.cfg), "tile_size": self.spec.tile_size},
        }

    def fingerprint(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "kind": self.kind,
            "model": cfg.model,
            "stream_until": cfg.stream_until,
            "pooling": cfg.pooling,
            "task": cfg.task,
            "classes": self.classes,
            "data": f"{portable_path(cfg.data, self.run)} ({file_digest(cfg.data)})",
        }


@torch.no_grad()
def infer(
    model: nn.Module,
    ds: SlideImageDataset,
    cfg: Any,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    skipped: dict[str, str] | None = None,
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(index, prediction, target) of this rank's share of ``ds`` (every ``world``-th item),
    read by DataLoader workers; unreadable slides are left out (and listed in ``skipped``)."""
    model.eval()
    cuda = device.type == "cuda"
    loader = _loader(ds, range(rank, len(ds), world), cfg, cuda, persistent=False)
    rows = []
    for item in loader:
        if "error" in item:
            if skipped is not None:
                skipped[str(item["slide"])] = str(item["error"])
            log.warning("skipping %s", item["error"])
            continue
        image = finish_image(item, None, device)[None]
        out = predictions(cfg.task, model(image)).cpu().numpy()[0]
        rows.append((int(item["index"]), out, item["target"].numpy()))
    model.train()
    return rows
