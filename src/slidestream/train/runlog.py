"""Everything a run folder holds, written in one place and one order.

Per epoch, on rank 0: the best metric is updated first, then ``best.pt`` (when the epoch is the
best), ``last.pt``, ``metrics.csv``, ``summary.json``, ``curves.png`` and TensorBoard. Every
file is replaced atomically (temporary file, then rename), and ``last.pt`` holds the history,
the best metric and the best epoch: after a kill at any point, the next start rewrites
``metrics.csv`` and ``summary.json`` from ``last.pt``, so all four agree.

``last.pt`` alone carries the training state (optimizer, scheduler, GradScaler, RNG, history)
that resume needs; ``best.pt`` (and the ``epochNNN.pt`` kept for weight averaging) hold the
weights, the model spec, the epoch's ``metrics`` and the best-epoch fields only: a third of
``last.pt`` under AdamW, whose state is twice the weights.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slidestream.errors import ConfigError
from slidestream.models.checkpoint import clean_stale_temps, save_checkpoint

__all__ = [
    "TRAINING_STATE",
    "BestRule",
    "RunLog",
    "check_fingerprint",
    "file_digest",
    "portable_path",
    "run_dir",
]

# checkpoint keys only resuming needs: kept in last.pt, left out of best.pt and epochNNN.pt
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng_state", "history")

log = logging.getLogger(__name__)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_digest(path: str | Path, limit: int = 64 << 20) -> str:
    """SHA-1 of a (cohort) file's first ``limit`` bytes and its size: what 'the same data' means
    for a run folder."""
    p = Path(path)
    h = hashlib.sha1()
    try:
        with open(p, "rb") as f:
            h.update(f.read(limit))
        h.update(str(p.stat().st_size).encode())
    except OSError:
        return "missing"
    return h.hexdigest()[:12]


def portable_path(path: str | os.PathLike[str], run: str | os.PathLike[str]) -> str:
    """``path`` as a run folder ``run`` records it: relative to ``run`` (``../../cohort.csv``)
    when it lies inside the folder that holds the runs folder (``run/../..``, e.g. a demo or
    project folder), so that folder can move as one; otherwise absolute."""
    target, base = Path(path).resolve(), Path(run).resolve()
    if base.parent.parent in (target, *target.parents):
        return os.path.relpath(target, base)
    return str(target)


_PATH_KEYS = ("data", "features")  # fingerprint entries that start with a path


def _located(key: str, value: Any, run: Path) -> Any:
    """A fingerprint value with its leading path (``PATH`` or ``PATH (digest)``) made absolute
    against ``run``: old absolute and new relative records of one file compare equal."""
    if key not in _PATH_KEYS or not isinstance(value, str) or not value:
        return value
    path, sep, rest = value.partition(" (")
    return str((run / path).resolve()) + sep + rest


def run_dir(cfg: Any, kind: str = "slides") -> Path:
    """``out/name``; without a name, one derived from data, model and task, so that different
    runs never share a folder and re-running the same command resumes."""
    if cfg.name:
        return Path(cfg.out) / cfg.name
    ident = {
        k: str(getattr(cfg, k, ""))
        for k in (
            "model",
            "task",
            "classes",
            "size",
            "mpp",
            "image_size",
            "stream_until",
            "pooling",
        )
    }
    ident["data"] = portable_path(cfg.data, Path(cfg.out) / "run")
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:6]
    return Path(cfg.out) / f"{kind}-{Path(cfg.data).stem}-{cfg.model.replace('/', '_')}-{digest}"


class BestRule:
    """The one best-epoch rule: the validation metric ``name`` (minimised when it ends in
    ``loss`` or is ``mae``, maximised otherwise); epochs without validation rank by
    ``train_loss``. Ties go to the later epoch (same ranking, longer training); NaN never wins."""

    def __init__(self, name: str) -> None:
        self.name = name

    def key(self, row: dict[str, Any]) -> tuple[str, float]:
        """(metric used, its value) of an epoch's row."""
        val = row.get(f"val_{self.name}")
        if isinstance(val, float | int) and not isinstance(val, bool):
            return f"val_{self.name}", float(val)
        return "train_loss", float(row.get("train_loss", math.nan))

    @staticmethod
    def minimised(metric: str) -> bool:
        return metric.endswith("loss") or metric.endswith("mae")

    def better(self, metric: str, value: float, best: float | None) -> bool:
        if not math.isfinite(value):
            return False
        if best is None or not math.isfinite(best):
            return True
        return value <= best if self.minimised(metric) else value >= best


def check_fingerprint(run: Path, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Refuse to resume ``run`` with other data or another model, naming the difference."""
    if not saved:
        return
    diff = [
        k
        for k in sorted(set(saved) | set(now))
        if _located(k, saved.get(k), run) != _located(k, now.get(k), run)
    ]
    if diff:
        k = diff[0]
        raise ConfigError(
            f"{run} holds a run with {k} {saved.get(k)!r}, not {now.get(k)!r}: pass a new "
            f"--name to start a new run, or --resume-from {run / 'last.pt'} to start from its "
            "weights"
        )


class RunLog:
    """The run folder's files and the console/TensorBoard view of each epoch (rank 0)."""

    def __init__(
        self,
        run: Path,
        best: BestRule,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.run, self.rule, self.on_epoch = run, best, on_epoch
        self.history: list[dict[str, Any]] = []
        self.best: float | None = None
        self.best_epoch = 0
        self.best_name = ""
        self._tb: Any = None
        run.mkdir(parents=True, exist_ok=True)
        removed = clean_stale_temps(run)
        if removed:
            log.info("removed %d temporary files of an interrupted run in %s", removed, run)

    # --- resume ------------------------------------------------------------------------------
    def restore(self, ckpt: dict[str, Any]) -> None:
        """Take history and best from ``last.pt`` and rewrite the files that may lag behind."""
        self.history = list(ckpt.get("history", []))
        best = ckpt.get("best_metric")
        self.best = float(best) if best is not None and math.isfinite(float(best)) else None
        self.best_epoch = int(ckpt.get("best_epoch", 0))
        self.best_name = str(ckpt.get("best_metric_name", ""))
        self._write_tables({})

    def loop_state(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "best_metric": self.best if self.best is not None else math.nan,
            "best_epoch": self.best_epoch,
            "best_metric_name": self.best_name,
        }

    # --- one epoch ---------------------------------------------------------------------------
    def epoch(
        self,
        row: dict[str, Any],
        state: Callable[[], dict[str, Any]],
        summary: dict[str, Any],
        evaluation: dict[str, Any] | None = None,
        keep_epoch: bool = False,
        final: bool = False,
    ) -> bool:
        """Record epoch ``row`` and write the run folder in crash-safe order; returns whether
        it is the best epoch so far. ``evaluation``: ``y`` (N,) labels, ``probs`` (N, C),
        ``classes`` and ``confusion`` of this epoch's validation, for the charts."""
        metric, value = self.rule.key(row)
        if metric == self.best_name:
            is_best = self.rule.better(metric, value, self.best)
        else:  # validated epochs outrank unvalidated ones, never the other way round
            is_best = not self.best_name.startswith("val_") and self.rule.better(
                metric, value, None
            )
        self.history.append(row)
        if is_best:
            self.best, self.best_epoch, self.best_name = value, int(row["epoch"]), metric
        ckpt = {**state(), **self.loop_state()}
        model = {k: v for k, v in ckpt.items() if k not in TRAINING_STATE}
        model["metrics"] = {k: v for k, v in row.items() if isinstance(v, float | int)}
        if is_best:
            save_checkpoint(self.run / "best.pt", model)
        save_checkpoint(self.run / "last.pt", ckpt)
        if keep_epoch:
            save_checkpoint(self.run / f"epoch{int(row['epoch']):03d}.pt", model)
        self._write_tables(summary)
        self._pictures(row, evaluation, final)
        if self.on_epoch is not None:
            self.on_epoch(row)
        log.info(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
        return is_best

    def _write_tables(self, summary: dict[str, Any]) -> None:
        keys = list(dict.fromkeys(k for r in self.history for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, keys)
        w.writeheader()
        w.writerows(self.history)
        if self.history:
            _write_atomic(self.run / "metrics.csv", buf.getvalue())
        old = self.run / "summary.json"
        if not summary and old.exists():
            try:
                summary = json.loads(old.read_text())
            except (OSError, ValueError):
                summary = {}
        full = {
            **summary,
            "epochs": len(self.history),
            "best_epoch": self.best_epoch,
            "best_metric": self.best,
            "best_metric_name": self.best_name,
        }
        _write_atomic(self.run / "summary.json", json.dumps(full, indent=1))

    def _pictures(
        self, row: dict[str, Any], evaluation: dict[str, Any] | None, final: bool
    ) -> None:
        """curves.png from the history; after a validation, roc/pr/confusion (and for two
        classes calibration) .png; all of them into TensorBoard as images; with ``final``
        (the last epoch) also as .svg."""
        from slidestream import charts

        keys = ["train_loss", f"val_{self.rule.name}", "val_loss", "lr", "images_per_s"]
        keys += ["bags_per_s", "data_wait_s"]
        figures = {"curves": charts.curves_figure(self.history, list(dict.fromkeys(keys)))}
        if evaluation:
            y, probs, classes = evaluation["y"], evaluation["probs"], evaluation["classes"]
            figures["roc"] = charts.roc_figure(y, probs, classes)
            figures["pr"] = charts.pr_figure(y, probs, classes)
            figures["confusion"] = charts.confusion_figure(evaluation["confusion"], classes)
            if probs.shape[1] == 2:
                figures["calibration"] = charts.calibration_figure(y, probs[:, 1])
        tb = self.tensorboard()
        step = int(row["epoch"])
        for k, v in row.items():
            if k != "epoch" and isinstance(v, float | int) and math.isfinite(float(v)):
                tb.add_scalar(k.replace("_", "/", 1), float(v), step)
        from PIL import Image

        for name, fig in figures.items():
            pixels = charts.to_array(fig)  # one Agg draw serves the PNG and TensorBoard
            Image.fromarray(pixels).save(self.run / f"{name}.png")
            tb.add_image(f"charts/{name}", pixels, step, dataformats="HWC")
            if final:  # vector copies once, at the end of training
                charts.save(fig, self.run / f"{name}.svg", formats=("svg",))
        tb.flush()

    def tensorboard(self) -> Any:
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run / "tensorboard"))
        return self._tb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
