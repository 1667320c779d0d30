"""``slidestream train``: streamed slide training on the one loop, weight averaging, only-eval."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slidestream.data.functional import resolve_device
from slidestream.data.slides import SlideImageDataset
from slidestream.models.checkpoint import load_checkpoint, save_checkpoint
from slidestream.models.slide import load_slide_model
from slidestream.train.loop import fit, settings_of
from slidestream.train.runlog import run_dir
from slidestream.train.slide import SlideTask, infer
from slidestream.train.slide_config import SlideTrainConfig

__all__ = ["average_states", "evaluate_slides", "train_slides"]

log = logging.getLogger(__name__)


def train_slides(
    cfg: SlideTrainConfig, on_epoch: Callable[[dict[str, Any]], None] | None = None
) -> Path:
    """Train (or resume) a streamed slide classifier; returns the run folder.

    Raises ConfigError for bad settings or labels, or a run folder that holds another run.
    """
    run = run_dir(cfg, "slides")
    task = SlideTask(cfg)
    fit(task, settings_of(cfg, run), on_epoch)
    if task.rank == 0 and cfg.average_window > 0:
        average(task, run, cfg)
    return run


def average(task: SlideTask, run: Path, cfg: SlideTrainConfig) -> Path:
    """Average the weights of the epochs best ± ``average_window`` into ``averaged.pt`` (with
    the validation metrics of the averaged model)."""
    best = load_checkpoint(run / "best.pt")
    k, e = cfg.average_window, int(best["epoch"])
    paths = [run / f"epoch{i:03d}.pt" for i in range(e - k, e + k + 1)]
    paths = [p for p in paths if p.exists()]
    task.model.load_state_dict(average_states(paths))
    metrics = {}
    if task.val_ds is not None:
        metrics = {key: v for key, v in task.evaluate(0, 1).items() if isinstance(v, float | int)}
    state = {**best, "state_dict": task.model.state_dict()}
    state.update(averaged_epochs=[int(p.stem[5:]) for p in paths], metrics=metrics)
    return save_checkpoint(run / "averaged.pt", state)


def average_states(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the float tensors of several checkpoints' state dicts."""
    states = [load_checkpoint(p)["state_dict"] for p in paths]
    out = {}
    for k, v in states[0].items():
        out[k] = (
            torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
            if v.is_floating_point()
            else v
        )
    return out


def evaluate_slides(checkpoint: str | Path, data: str | Path, out: str | Path) -> Path:
    """``--only-eval``: write predictions.csv (slide, label, probabilities or value)."""
    ckpt = load_checkpoint(checkpoint)
    model, spec = load_slide_model(ckpt)
    device = resolve_device()
    from slidestream.sampling import load_cohort

    cohort = load_cohort(str(data))
    known = SlideTrainConfig.__dataclass_fields__
    saved = {k: v for k, v in ckpt.get("config", {}).items() if k in known}
    cfg = SlideTrainConfig(**{**saved, "data": str(data), "workers": 0})
    size = (cfg.image_size, cfg.image_size) if cfg.image_size else None
    ds = SlideImageDataset(cohort, spec.task, spec.classes, image_size=size, labelled=False)
    rows = {i: p for i, p, _ in infer(model.to(device), ds, cfg, device)}
    path = Path(out) / "predictions.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    width = len(next(iter(rows.values()))) if rows else 0
    cols = [f"p_{c}" for c in spec.classes] if spec.task != "regression" else ["value"]
    if len(cols) != width:
        cols = [f"p_{i}" for i in range(width)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "label", *cols])
        for i, entry in enumerate(cohort):
            values = [f"{v:.5f}" for v in rows[i]] if i in rows else [""] * width
            w.writerow([str(entry.path), entry.label or "", *values])
    return path
