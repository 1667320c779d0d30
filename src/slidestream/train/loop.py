"""The one training loop of slidestream: patch classifiers and streamed slide models alike.

:func:`fit` runs a :class:`~slidestream.train.task.Task` for ``settings.epochs``: mixed
precision (bf16 autocast where the GPU supports it, fp16 with a GradScaler otherwise, bf16 on
the CPU), gradient accumulation over a step's micro-batches, one flattened all-reduce per step
under torchrun, data wait and step time measured apart (so a starved GPU shows), validation,
the one best-epoch rule, crash-safe checkpoints and resume. The task's DataLoader workers read
and prepare the next batches while the model computes.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from slidestream.colors import write_colors
from slidestream.data.functional import resolve_device
from slidestream.errors import ConfigError
from slidestream.models.checkpoint import load_checkpoint
from slidestream.train.config import write_run_config
from slidestream.train.ddp import all_reduce_grads, barrier, distributed, sum_values
from slidestream.train.runlog import BestRule, RunLog, check_fingerprint
from slidestream.train.task import Settings, Task

__all__ = ["Settings", "amp_dtype", "fit", "settings_of"]

log = logging.getLogger(__name__)


def amp_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """Autocast dtype for ``device``: None (off), bfloat16, or float16 on GPUs without bf16.
    ``amp=None`` means on for CUDA, off for the CPU."""
    enabled = device.type == "cuda" if amp is None else amp
    if not enabled:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def settings_of(cfg: Any, run: Path) -> Settings:
    """The loop settings of a trainer config (fields both configs share)."""
    return Settings(
        run=run,
        epochs=cfg.epochs,
        device=cfg.device,
        amp=cfg.amp,
        channels_last=getattr(cfg, "channels_last", None),
        seed=cfg.seed,
        val_interval=cfg.val_interval,
        best_metric=cfg.best_metric,
        resume_from=getattr(cfg, "resume_from", None),
        average_window=getattr(cfg, "average_window", 0),
        ddp_timeout_min=getattr(cfg, "ddp_timeout", 10.0),
    )


class _Loop:
    def __init__(
        self, task: Task, s: Settings, on_epoch: Callable[[dict], None] | None = None
    ) -> None:
        self.task, self.s = task, s
        self.run = Path(s.run)
        self.device = resolve_device(s.device)  # this rank's own GPU under torchrun
        self.rank, self.world = distributed(self.device, s.ddp_timeout_min)
        self.dtype = amp_dtype(self.device, s.amp)
        cuda = self.device.type == "cuda"
        channels_last = cuda if s.channels_last is None else s.channels_last
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed shapes: fastest kernels, found once
        torch.manual_seed(s.seed)
        task.run = self.run  # fingerprints record paths relative to it
        task.setup(self.device, self.rank, self.world, channels_last)
        self.opt = task.make_optimizer(task.param_groups())
        self.sched = task.make_scheduler(self.opt, task.steps_per_epoch())
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.epoch = 0
        self.step_lr = float(self.opt.param_groups[0]["lr"])
        self.log = RunLog(self.run, BestRule(s.best_metric), on_epoch if self.rank == 0 else None)

    # --- resume ------------------------------------------------------------------------------
    def resume(self) -> None:
        last = self.run / "last.pt"
        fingerprint = self.task.fingerprint()
        if last.exists():
            ckpt = load_checkpoint(last, map_location=self.device)
            check_fingerprint(self.run, ckpt.get("fingerprint"), fingerprint)
            self._load_weights(ckpt, last)
            self.opt.load_state_dict(ckpt["optimizer"])
            if self.sched is not None and ckpt.get("scheduler"):
                self.sched.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            if ckpt.get("rng_state") is not None:  # dropout, augmentation: as if never stopped
                torch.set_rng_state(ckpt["rng_state"].cpu())
            self.epoch = int(ckpt["epoch"])
            if self.rank == 0:
                self.log.restore(ckpt)
            log.info("resumed %s at epoch %d", self.run, self.epoch)
        elif self.s.resume_from:
            ckpt = load_checkpoint(self.s.resume_from, map_location=self.device)
            self._load_weights(ckpt, Path(self.s.resume_from))
            log.info("weights from %s", self.s.resume_from)

    def _load_weights(self, ckpt: dict[str, Any], path: Path) -> None:
        if ckpt.get("kind") != self.task.kind:
            raise ConfigError(f"{path} is a {ckpt.get('kind')} checkpoint, not {self.task.kind}")
        try:
            self.task.model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:160]
            raise ConfigError(
                f"{path} does not fit this model ({first}); pass the model and classes it was "
                "trained with, or a new --name"
            ) from exc

    # --- training ----------------------------------------------------------------------------
    def fit(self) -> None:
        if not self.task.has_validation() and self.rank == 0 and self.epoch < self.s.epochs:
            log.warning(
                "no validation data: metrics are training metrics only, and best.pt is the "
                "epoch with the lowest train_loss (pass --val-data, or a split column with val)"
            )
        for epoch in range(self.epoch, self.s.epochs):
            row = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            if self.task.has_validation() and (epoch + 1) % self.s.val_interval == 0:
                with self.autocast():
                    metrics = self.task.evaluate(self.rank, self.world)
                row.update(
                    {f"val_{k}": v for k, v in metrics.items() if isinstance(v, float | int)}
                )
                evaluation = metrics.get("_eval")
                if evaluation is not None:
                    evaluation = {
                        **evaluation,
                        "confusion": metrics.get("confusion"),
                        "classes": self.task.classes,
                    }
            else:
                evaluation = None
            self.epoch = epoch + 1
            if self.rank == 0:
                self.log.epoch(
                    row,
                    self.state,
                    self.summary(),
                    evaluation,
                    keep_epoch=self.s.average_window > 0,
                    final=self.epoch == self.s.epochs,
                )
                self.task.epoch_images(self.epoch, self.log.history)
            barrier(self.world, f"after epoch {self.epoch}")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        from tqdm import tqdm

        task = self.task
        task.start_epoch(epoch)
        task.model.train()
        steps = task.steps_per_epoch()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{self.s.epochs}",
            leave=False,
            disable=True if self.rank != 0 or not self.s.progress else None,
        )
        total = images = 0.0
        wait = compute = 0.0
        t_start = time.perf_counter()
        for step in task.steps(epoch):
            loss, n, w, c = self.step(step)
            total, images, wait, compute = total + loss, images + n, wait + w, compute + c
            bar.update(1)
            bar.set_postfix(
                loss=f"{total / max(images, 1):.4f}",
                **{f"{task.unit}_s": f"{images / max(wait + compute, 1e-9):.1f}"},
                wait=f"{wait / max(wait + compute, 1e-9):.0%}",
            )
        bar.close()
        wall = time.perf_counter() - t_start
        total, images, wait, compute = sum_values(
            [total, images, wait, compute], self.device, self.world
        )
        peak = (
            torch.cuda.max_memory_allocated(self.device) / 2**30
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        )
        unit = task.unit  # images, or bags for MIL
        return {
            "train_loss": total / max(images, 1),
            "lr": self.step_lr,  # of the epoch's last step (first parameter group)
            unit: int(images),
            f"{unit}_per_s": images / max(wall, 1e-9),
            "data_wait_s": wait / self.world,
            "step_s": compute / self.world,
            "time_s": wall,
            "peak_mem_gb": round(peak, 3),
        }

    def autocast(self) -> Any:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, step: Any) -> tuple[float, int, float, float]:
        """One optimizer step over the step's micro-batches: (summed loss × images, images,
        seconds waiting for data, seconds computing)."""
        self.opt.zero_grad(set_to_none=True)
        total, images, wait, compute = 0.0, 0, 0.0, 0.0
        autocast = self.autocast()
        it = iter(step)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            t1 = time.perf_counter()
            wait += t1 - t0
            if batch is None:
                break
            if isinstance(batch, dict) and "error" in batch:
                self._skip(batch)
                continue
            with autocast:
                loss, n = self.task.loss(batch, self.device)
            self.scaler.scale(loss * self.task.loss_scale(n)).backward()
            total, images = total + float(loss.detach()) * n, images + n
            compute += time.perf_counter() - t1
        t1 = time.perf_counter()
        all_reduce_grads(self.task.model, self.world)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step_lr = float(self.opt.param_groups[0]["lr"])
        if self.sched is not None:
            self.sched.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return total, images, wait, compute + time.perf_counter() - t1

    def _skip(self, batch: dict[str, Any]) -> None:
        slide = str(batch.get("slide", "?"))
        if slide not in self.task.skipped:
            log.warning("skipping %s", batch["error"])
        self.task.skipped[slide] = str(batch["error"])

    # --- checkpoint contents -----------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            **self.task.state(),
            "state_dict": self.task.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched is not None else {},
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "epoch": self.epoch,
            "rng_state": torch.get_rng_state(),
            "fingerprint": self.task.fingerprint(),
        }

    def summary(self) -> dict[str, Any]:
        return {"skipped_slides": dict(self.task.skipped), "run": self.run.name}


def fit(
    task: Task, settings: Settings, on_epoch: Callable[[dict[str, Any]], None] | None = None
) -> Path:
    """Train ``task`` (resuming its run folder when it holds ``last.pt`` for the same model
    and data); returns the run folder. ``on_epoch(row)`` sees each epoch's metrics on rank 0.

    Raises:
        ConfigError: the run folder holds another run (model, classes, task or data differ),
            or a checkpoint does not fit the model.
    """
    loop = _Loop(task, settings, on_epoch)
    try:
        loop.resume()
        if loop.rank == 0:  # after the resume check: a refused run leaves the folder alone
            write_run_config(loop.run, task.state().get("config", {}))
            write_colors(loop.run, task.classes)
        loop.fit()
    finally:
        loop.log.close()
    return loop.run
