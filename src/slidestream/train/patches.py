"""Patch classifier training from an HDF5 patch database or straight from slides (PatchStream).

One run folder per ``name``: ``config.yaml`` (resolved), ``metrics.csv`` (one row per epoch),
``last.pt`` and ``best.pt`` (atomic, resumable), TensorBoard events with scalars and a confusion
matrix image, ``val_grid_epoch<N>.png`` (validation patches with true/predicted class) and
``curves.png``. Re-running with the same ``name`` resumes from ``last.pt``.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from slidestream.data import PatchLoader, PatchStream, default_augmentation, normalize
from slidestream.data.functional import IMAGENET_MEAN, IMAGENET_STD, resolve_device
from slidestream.data.hdf5 import PatchDatabase
from slidestream.data.preview import patch_grid
from slidestream.errors import ConfigError, NoPatchesError
from slidestream.models.classifiers import create_classifier
from slidestream.sampling import RandomPatchSampler, load_cohort
from slidestream.train.checkpoint import load_checkpoint, save_checkpoint
from slidestream.train.config import config_dict, save_config
from slidestream.train.metrics import classification_metrics
from slidestream.train.patch_config import PatchTrainConfig
from slidestream.train.plots import confusion_image, curves_image

__all__ = ["PatchTrainConfig", "train_patches"]

log = logging.getLogger(__name__)


@dataclass
class _Data:
    train: Dataset
    val: Dataset | None
    classes: list[str]
    counts: list[int]
    size: int
    mpp: float | None
    streamed: bool


def _is_db(path: str) -> bool:
    return Path(path).suffix.lower() in (".h5", ".hdf5")


def _load_data(cfg: PatchTrainConfig) -> _Data:
    aug = None if cfg.augmentation == "none" else default_augmentation(cfg.augmentation)
    val_path = cfg.val_data
    if _is_db(cfg.data):
        train = PatchDatabase(cfg.data, transform=aug)
        if val_path is None and ".train." in Path(cfg.data).name:
            sibling = Path(cfg.data).with_name(Path(cfg.data).name.replace(".train.", ".val."))
            val_path = str(sibling) if sibling.exists() else None
        val = PatchDatabase(val_path) if val_path else None
        if val is not None and val.classes != train.classes:
            raise ConfigError(f"{val_path} has classes {val.classes}, {cfg.data} {train.classes}")
        if not train.classes:
            raise ConfigError(
                f"{cfg.data} has no classes: build it from a cohort CSV with a "
                f"label column, --labels annotations, or --tiles class folders"
            )
        if not len(train):
            raise NoPatchesError(
                f"{cfg.data} holds no patches: rebuild it (slidestream patches names the slides "
                f"that gave none), e.g. with a lower --min-tissue, after checking tissue masks"
            )
        counts = [train.class_counts.get(c, 0) for c in train.classes]
        return _Data(
            train, val, train.classes, counts, train.patch_size, train.params.get("mpp"), False
        )
    cohort = load_cohort(cfg.data)
    sampler = RandomPatchSampler(cfg.size, cfg.mpp)
    balance = "balanced" if cfg.balanced_sampling else None
    # a few patches per visit, so that every batch mixes several slides (and classes)
    train = PatchStream(
        cohort, sampler, transform=aug, balance=balance, seed=cfg.seed, patches_per_visit=4
    )
    val = None
    if val_path:
        val = PatchStream(
            load_cohort(val_path),
            RandomPatchSampler(cfg.size, cfg.mpp, replacement=False),
            patches_per_slide=64,
            seed=cfg.seed + 1,
        )
        val.classes = train.classes
    if not train.classes:
        raise ConfigError(f"{cfg.data} has no label column values to train on")
    counts = [sum(s.label == c for s in cohort) for c in train.classes]
    return _Data(train, val, train.classes, counts, cfg.size, cfg.mpp, True)


def _loaders(cfg: PatchTrainConfig, data: _Data) -> tuple[DataLoader, DataLoader | None]:
    common = {
        "batch_size": cfg.batch_size,
        "num_workers": cfg.workers,
        "persistent_workers": cfg.workers > 0,
        "worker_init_fn": lambda _: torch.set_num_threads(1),
    }
    gen = torch.Generator().manual_seed(cfg.seed)
    if data.streamed:  # batches in reused shared-memory buffers, one torch thread per worker
        stream_common = {k: v for k, v in common.items() if k != "worker_init_fn"}
        val_kw = {**stream_common, "persistent_workers": False}
        val = PatchLoader(data.val, **val_kw) if data.val is not None else None
        return PatchLoader(data.train, **stream_common), val
    if cfg.balanced_sampling:
        labels = np.asarray(data.train.labels)
        w = 1.0 / np.maximum(np.bincount(labels, minlength=len(data.classes)), 1)[labels]
        sampler = WeightedRandomSampler(torch.as_tensor(w), len(labels), generator=gen)
        train = DataLoader(data.train, sampler=sampler, **common)
    else:
        train = DataLoader(data.train, shuffle=True, generator=gen, drop_last=True, **common)
    val = DataLoader(data.val, **{**common, "persistent_workers": False}) if data.val else None
    return train, val


def train_patches(cfg: PatchTrainConfig) -> Path:
    """Train (or resume) a patch classifier; returns the run folder."""
    run = Path(cfg.out) / cfg.name
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(cfg.seed)
    data = _load_data(cfg)
    device = resolve_device(cfg.device)
    model = create_classifier(cfg.model, len(data.classes), cfg.weights).to(device)
    opt = (
        torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adamw"
        else torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    )
    train_loader, val_loader = _loaders(cfg, data)
    steps = cfg.steps_per_epoch or (200 if data.streamed else len(train_loader))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        (
            lambda s: (
                0.5 * (1 + math.cos(math.pi * min(s, steps * cfg.epochs) / (steps * cfg.epochs)))
            )
        )
        if cfg.schedule == "cosine"
        else (lambda s: 1.0),
    )
    weight = None
    if cfg.class_weighting == "balanced":
        c = torch.tensor(data.counts, dtype=torch.float32).clamp(min=1)
        weight = (c.sum() / (len(c) * c)).to(device)
    state = _Trainer(cfg, run, data, model, opt, sched, weight, device, steps)
    state.resume()
    state.fit(train_loader, val_loader)
    return run


class _Trainer:
    def __init__(
        self,
        cfg: PatchTrainConfig,
        run: Path,
        data: _Data,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        sched: Any,
        weight: torch.Tensor | None,
        device: torch.device,
        steps: int,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.cfg, self.run, self.data, self.model = cfg, run, data, model
        self.opt, self.sched, self.weight, self.device, self.steps = (
            opt,
            sched,
            weight,
            device,
            steps,
        )
        self.epoch, self.best = 0, -math.inf
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
        self.tb = SummaryWriter(str(run / "tensorboard"))
        self.history: list[dict[str, float]] = []

    def resume(self) -> None:
        last = self.run / "last.pt"
        if not last.exists():
            return
        ckpt = load_checkpoint(last, map_location=self.device)
        self.model.load_state_dict(ckpt["state_dict"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.epoch, self.best = int(ckpt["epoch"]), float(ckpt["best_metric"])
        self.history = list(ckpt.get("history", []))
        log.info("resuming %s from epoch %d", self.run, self.epoch)

    def fit(self, train_loader: DataLoader, val_loader: DataLoader | None) -> None:
        from tqdm import tqdm

        it = iter(train_loader)
        for epoch in range(self.epoch, self.cfg.epochs):
            if hasattr(self.data.train, "set_epoch"):
                self.data.train.set_epoch(epoch)
            self.model.train()
            t0, total, n = time.perf_counter(), 0.0, 0
            bar = tqdm(range(self.steps), desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False)
            for _ in bar:
                batch = next(it, None)
                if batch is None:
                    it = iter(train_loader)
                    batch = next(it, None)
                    if batch is None:
                        raise NoPatchesError(
                            f"no training batch from {self.cfg.data}: it holds no patches (or "
                            f"fewer than one batch); for a cohort, check the slides' tissue "
                            f"masks, min_tissue and mpp"
                        )
                loss = self._step(batch)
                total, n = total + loss, n + 1
                bar.set_postfix(loss=f"{total / n:.4f}")
            row = {
                "epoch": epoch + 1,
                "train_loss": total / max(n, 1),
                "lr": self.opt.param_groups[0]["lr"],
                "time_s": time.perf_counter() - t0,
            }
            if val_loader is not None and (epoch + 1) % self.cfg.val_interval == 0:
                row.update(self._validate(val_loader, epoch + 1))
            self.epoch = epoch + 1
            self._log(row)

    def _step(self, batch: dict[str, Any]) -> float:
        x = normalize(batch["image"], device=self.device)
        y = batch["label"].to(self.device)
        amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        with torch.autocast(self.device.type, dtype=amp_dtype, enabled=self.cfg.amp):
            loss = torch.nn.functional.cross_entropy(self.model(x), y, weight=self.weight)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return float(loss.detach())

    @torch.no_grad()
    def _validate(self, loader: DataLoader, epoch: int) -> dict[str, float]:
        self.model.eval()
        probs, labels, images = [], [], []
        for batch in loader:
            out = self.model(normalize(batch["image"], device=self.device)).float()
            probs.append(torch.softmax(out, 1).cpu())
            labels.append(batch["label"])
            if sum(len(i) for i in images) < 32:
                images.append(batch["image"])
        p, y = torch.cat(probs).numpy(), torch.cat(labels).numpy()
        m = classification_metrics(y, p, len(self.data.classes))
        self.tb.add_image(
            "val/confusion",
            confusion_image(m["confusion"], self.data.classes),
            epoch,
            dataformats="HWC",
        )
        self._grid(torch.cat(images)[:32], y[:32], p[:32], epoch)
        return {f"val_{k}": v for k, v in m.items() if k != "confusion"}

    def _grid(self, images: torch.Tensor, y: np.ndarray, p: np.ndarray, epoch: int) -> None:
        from PIL import Image

        cls = self.data.classes
        caps = [
            f"true {cls[t][:10]}\npred {cls[int(q.argmax())][:10]} {q.max():.2f}"
            for t, q in zip(y, p, strict=True)
        ]
        grid = patch_grid([i.permute(1, 2, 0).numpy() for i in images], caps, columns=8, tile=96)
        Image.fromarray(grid).save(self.run / f"val_grid_epoch{epoch}.png")

    def _log(self, row: dict[str, float]) -> None:
        self.history.append(row)
        for k, v in row.items():
            if k != "epoch" and isinstance(v, float) and math.isfinite(v):
                self.tb.add_scalar(k.replace("_", "/", 1), v, int(row["epoch"]))
        path = self.run / "metrics.csv"
        keys = list(dict.fromkeys(k for r in self.history for k in r))
        with open(path, "w", newline="") as f:  # rewritten whole: resume-safe
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(self.history)
        metric = row.get(f"val_{self.cfg.best_metric}", -row["train_loss"])
        is_best = math.isfinite(metric) and metric >= self.best  # ties: the later epoch
        self.best = max(self.best, metric) if math.isfinite(metric) else self.best
        state = self._state()
        save_checkpoint(self.run / "last.pt", state)
        if is_best:
            save_checkpoint(self.run / "best.pt", state)
        from PIL import Image

        series = {
            k: [r.get(k, float("nan")) for r in self.history]
            for k in ("train_loss", f"val_{self.cfg.best_metric}")
            if k in keys
        }
        Image.fromarray(curves_image(series)).save(self.run / "curves.png")
        self.tb.flush()

    def _state(self) -> dict[str, Any]:
        return {
            "kind": "patch",
            "model": {"name": self.cfg.model, "num_classes": len(self.data.classes)},
            "state_dict": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "epoch": self.epoch,
            "best_metric": self.best,
            "classes": self.data.classes,
            "mpp": self.data.mpp,
            "patch_size": self.data.size,
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "config": config_dict(self.cfg),
            "history": self.history,
        }
