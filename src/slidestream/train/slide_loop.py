"""The training loop of ``slidestream train``: epochs, validation, checkpoints, resume, DDP."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidestream.data.functional import IMAGENET_MEAN, IMAGENET_STD, resolve_device
from slidestream.data.slides import SlideImageDataset
from slidestream.errors import ConfigError, SlideStreamError
from slidestream.train.checkpoint import load_checkpoint, save_checkpoint
from slidestream.train.config import config_dict, save_config
from slidestream.train.metrics import classification_metrics, regression_metrics
from slidestream.train.plots import curves_image
from slidestream.train.slide import (
    SlideClassifier,
    average_states,
    build_model,
    distributed,
    is_better,
    load_slide_model,
    loss_fn,
    predictions,
    run_dir,
    slide_datasets,
    step_order,
)
from slidestream.train.slide_config import SlideTrainConfig

__all__ = ["train_slides", "evaluate_slides"]

log = logging.getLogger(__name__)


class _Loop:
    def __init__(self, cfg: SlideTrainConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)  # this rank's own GPU under torchrun
        self.rank, self.world = distributed(self.device)
        if cfg.accumulate % self.world:
            raise ConfigError(
                f"accumulate ({cfg.accumulate}) must be a multiple of the number "
                f"of processes ({self.world}) to keep the effective batch"
            )
        self.run = run_dir(cfg)
        torch.manual_seed(cfg.seed)
        self.train_ds, self.val_ds, self.classes = slide_datasets(cfg)
        self.model = build_model(cfg, self.classes).to(self.device)
        trunk = list(self.model.stream.parameters())
        self.opt = self._optimizer(trunk, list(self.model.fc.parameters()))
        self.epoch, self.best, self.history = 0, -math.inf, []
        self.skipped: dict[str, str] = {}
        self.confusion: list[list[int]] | None = None
        self.tb: Any = None
        if cfg.best_metric.endswith("loss") or cfg.best_metric == "mae":
            self.best = math.inf
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=cfg.amp and self.device.type == "cuda"
        )

    def _optimizer(self, trunk: list[torch.Tensor], head: list[torch.Tensor]) -> Any:
        cfg = self.cfg
        groups = [
            {"params": head, "lr": cfg.lr},
            {"params": trunk, "lr": cfg.lr * (cfg.trunk_lr_factor if cfg.unfreeze_epoch else 1.0)},
        ]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(
                groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _trunk_trainable(self, epoch: int) -> bool:
        cfg = self.cfg
        return cfg.train_all_layers and (not cfg.unfreeze_epoch or epoch >= cfg.unfreeze_epoch)

    def resume(self) -> None:
        last = self.run / "last.pt"
        source = (
            last
            if last.exists()
            else (Path(self.cfg.resume_from) if self.cfg.resume_from else None)
        )
        if source is None:
            return
        ckpt = load_checkpoint(source, map_location=self.device)
        self.model.load_state_dict(ckpt["state_dict"])
        if source == last:
            self.opt.load_state_dict(ckpt["optimizer"])
            self.epoch, self.best = int(ckpt["epoch"]), float(ckpt["best_metric"])
            self.history = list(ckpt.get("history", []))
        log.info("resumed from %s (epoch %d)", source, self.epoch)

    def fit(self) -> None:
        for epoch in range(self.epoch, self.cfg.epochs):
            t0 = time.perf_counter()
            row = {"epoch": epoch + 1, "train_loss": self.train_epoch(epoch)}
            if self.val_ds is not None and (epoch + 1) % self.cfg.val_interval == 0:
                row.update(
                    {
                        f"val_{k}": v
                        for k, v in self.validate(self.model).items()
                        if not isinstance(v, list)
                    }
                )
            row["time_s"] = time.perf_counter() - t0
            self.epoch = epoch + 1
            if self.rank == 0:
                self.log_epoch(row)
            self.barrier()
        if self.rank == 0 and self.cfg.average_window > 0:
            self.average()
        if self.rank == 0:
            self.write_summary()

    def train_epoch(self, epoch: int) -> float:
        from tqdm import tqdm

        cfg, ds = self.cfg, self.train_ds
        ds.set_epoch(epoch)
        trainable = self._trunk_trainable(epoch)
        for p in self.model.stream.parameters():
            p.requires_grad_(trainable)
        targets = [ds.target(s.label) for s in ds.cohort] if cfg.weighted_sampler else None
        order = step_order(len(ds), cfg, epoch, targets)
        per_rank = cfg.accumulate // self.world
        steps = len(order) // cfg.accumulate or 1
        total, seen = 0.0, 0
        bar = tqdm(
            range(steps),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=self.rank != 0,
        )
        for step in bar:
            window = order[step * cfg.accumulate : (step + 1) * cfg.accumulate]
            mine = window[self.rank :: self.world][:per_rank]
            self.opt.zero_grad(set_to_none=True)
            for i in mine:
                item = self.load(ds, int(i))
                if item is not None:
                    total += self.backward_one(item)
                    seen += 1
            self.all_reduce_grads()
            self.scaler.step(self.opt)
            self.scaler.update()
            bar.set_postfix(loss=f"{total / max(seen, 1):.4f}")
        if self.world > 1:  # the epoch's loss over every rank's images, not rank 0's alone
            import torch.distributed as dist

            sums = torch.tensor([total, float(seen)], dtype=torch.float64, device=self.device)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            total, seen = float(sums[0]), int(sums[1])
        return total / max(seen, 1)

    def load(self, ds: SlideImageDataset, i: int) -> dict[str, Any] | None:
        """Item ``i``, or None (logged, listed in summary.json) if its slide cannot be read."""
        try:
            return ds[i]
        except SlideStreamError as exc:
            path = str(ds.cohort.slides[i].path)
            if path not in self.skipped:
                log.warning("skipping %s: %s", path, exc)
            self.skipped[path] = " ".join(str(exc).split())
            return None

    def backward_one(self, item: dict[str, Any]) -> float:
        x = item["image"][None].to(self.device)
        y = item["target"][None].to(self.device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.cfg.amp):
            loss = loss_fn(self.cfg.task, self.model(x), y)
        self.scaler.scale(loss / self.cfg.accumulate).backward()
        return float(loss.detach())

    def all_reduce_grads(self) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in self.model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    @torch.no_grad()
    def validate(self, model: SlideClassifier) -> dict[str, Any]:
        out, targets = infer(model, self.val_ds, self.cfg.task, self.device, self.load)
        metrics = metrics_for(self.cfg.task, targets, out, len(self.classes))
        self.confusion = metrics.get("confusion")
        return metrics

    def log_epoch(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        self.tensorboard(row)
        keys = list(dict.fromkeys(k for r in self.history for k in r))
        with open(self.run / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(self.history)
        metric = row.get(f"val_{self.cfg.best_metric}", row.get(self.cfg.best_metric, math.nan))
        state = self.state()
        save_checkpoint(self.run / "last.pt", state)
        if self.cfg.average_window > 0:
            save_checkpoint(self.run / f"epoch{self.epoch:03d}.pt", state)
        if is_better(self.cfg.best_metric, float(metric), self.best):
            self.best = float(metric)
            save_checkpoint(self.run / "best.pt", {**state, "best_metric": self.best})
        from PIL import Image

        series = {
            k: [r.get(k, math.nan) for r in self.history]
            for k in ("train_loss", f"val_{self.cfg.best_metric}")
            if k in keys
        }
        Image.fromarray(curves_image(series)).save(self.run / "curves.png")
        print(
            " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            ),
            flush=True,
        )

    def tensorboard(self, row: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from slidestream.train.plots import confusion_image

        if self.tb is None:
            self.tb = SummaryWriter(str(self.run / "tensorboard"))
        for k, v in row.items():
            if k != "epoch" and isinstance(v, float) and math.isfinite(v):
                self.tb.add_scalar(k.replace("_", "/", 1), v, int(row["epoch"]))
        if self.confusion is not None and self.classes:
            img = confusion_image(self.confusion, self.classes)
            self.tb.add_image("val/confusion", img, int(row["epoch"]), dataformats="HWC")
        self.tb.flush()

    def write_summary(self) -> None:
        summary = {
            "epochs": self.epoch,
            "best_metric": self.best,
            "best_metric_name": self.cfg.best_metric,
            "skipped_slides": self.skipped,
        }
        (self.run / "summary.json").write_text(json.dumps(summary, indent=1))
        if self.skipped:
            print(
                f"{len(self.skipped)} slides could not be read and were skipped "
                f"(see {self.run / 'summary.json'})",
                flush=True,
            )

    def state(self) -> dict[str, Any]:
        return {
            "kind": "streaming",
            "model": {
                "name": self.cfg.model,
                "stream_until": self.cfg.stream_until,
                "pooling": self.cfg.pooling,
            },
            "state_dict": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "epoch": self.epoch,
            "best_metric": self.best,
            "classes": self.classes,
            "task": self.cfg.task,
            "mpp": _cohort_mpp(self.train_ds),
            "tile_size": self.cfg.tile_size,
            "image_size": self.cfg.image_size,
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "config": config_dict(self.cfg),
            "history": self.history,
        }

    def average(self) -> None:
        """Average the weights of the epochs around the best one into averaged.pt."""
        best = load_checkpoint(self.run / "best.pt")
        k, e = self.cfg.average_window, int(best["epoch"])
        paths = [
            self.run / f"epoch{i:03d}.pt"
            for i in range(e - k, e + k + 1)
            if (self.run / f"epoch{i:03d}.pt").exists()
        ]
        self.model.load_state_dict(average_states(paths))
        extra = {}
        if self.val_ds is not None:
            extra = {k: v for k, v in self.validate(self.model).items() if not isinstance(v, list)}
        save_checkpoint(
            self.run / "averaged.pt",
            {**self.state(), "averaged_epochs": [int(p.stem[5:]) for p in paths], "metrics": extra},
        )


def _cohort_mpp(ds: SlideImageDataset) -> float | None:
    values = {s.mpp for s in ds.cohort if s.mpp}
    return values.pop() if len(values) == 1 else None


@torch.no_grad()
def infer(
    model: SlideClassifier,
    ds: SlideImageDataset,
    task: str,
    device: torch.device,
    load: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and targets of every readable item (``load(ds, i)`` may return None)."""
    model.eval()
    out, targets = [], []
    for i in range(len(ds)):
        item = load(ds, i) if load is not None else ds[i]
        if item is None:
            continue
        out.append(predictions(task, model(item["image"][None].to(device))).cpu().numpy()[0])
        targets.append(item["target"].numpy())
    model.train()
    return np.stack(out), np.stack(targets)


def metrics_for(task: str, targets: np.ndarray, out: np.ndarray, n_cls: int) -> dict[str, Any]:
    if task == "regression":
        return regression_metrics(targets, out[:, 0])
    if task == "multilabel":
        from sklearn.metrics import roc_auc_score

        ok = [j for j in range(out.shape[1]) if len(np.unique(targets[:, j])) == 2]
        auc = (
            float(np.mean([roc_auc_score(targets[:, j], out[:, j]) for j in ok]))
            if ok
            else math.nan
        )
        return {"auc": auc, "accuracy": float(((out > 0.5) == targets).mean())}
    return classification_metrics(targets.astype(int), out, max(2, n_cls))


def train_slides(cfg: SlideTrainConfig) -> Path:
    """Train (or resume) a streamed slide classifier; returns the run folder."""
    loop = _Loop(cfg)
    if loop.rank == 0:
        loop.run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, loop.run / "config.yaml")
    loop.barrier()
    loop.resume()
    loop.fit()
    return loop.run


def evaluate_slides(checkpoint: str | Path, data: str | Path, out: str | Path) -> Path:
    """``--only-eval``: write predictions.csv (slide, label, probabilities or value)."""
    ckpt = load_checkpoint(checkpoint)
    model, cfg = load_slide_model(ckpt)
    device = resolve_device()
    from slidestream.sampling import load_cohort

    cohort = load_cohort(str(data))
    size = (cfg.image_size, cfg.image_size) if cfg.image_size else None
    ds = SlideImageDataset(cohort, cfg.task, list(ckpt["classes"]), image_size=size, labelled=False)
    pred, _ = infer(model.to(device), ds, cfg.task, device)
    path = Path(out) / "predictions.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = [f"p_{c}" for c in ckpt["classes"]] if cfg.task != "regression" else ["value"]
    if cfg.task == "binary" and len(cols) != pred.shape[1]:
        cols = [f"p_{i}" for i in range(pred.shape[1])]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "label", *cols])
        for entry, p in zip(cohort, pred, strict=True):
            w.writerow([str(entry.path), entry.label or "", *[f"{v:.5f}" for v in p]])
    return path
