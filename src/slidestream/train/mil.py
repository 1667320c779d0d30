"""Slide-level multiple-instance learning on frozen patch features (``slidestream train-mil``).

:class:`MILTask` is MIL's side of the one training loop (:func:`~slidestream.train.loop.fit`):
each micro-batch is one bag (a slide's feature file, at most ``max_instances`` random patches
while training), an optimizer step is ``accumulate`` bags; the model is a
:class:`~slidestream.models.mil.MILModel` (gated attention by default). Splits come from the
cohort's ``split`` column, a validation CSV, or ``split=train=0.8,val=0.2`` drawn by patient;
metrics, checkpoints, resume and the run folder are the loop's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from slidestream.data.features import FeatureBags
from slidestream.errors import ConfigError
from slidestream.models.mil import MILModel, MILSpec
from slidestream.models.slide import outputs_for, predictions
from slidestream.sampling import Cohort, SlideEntry, load_cohort, parse_split, split_by_patient
from slidestream.train.config import config_dict
from slidestream.train.loop import fit, settings_of
from slidestream.train.runlog import file_digest, portable_path, run_dir
from slidestream.train.slide import loss_fn, metrics_for
from slidestream.train.task import Task

__all__ = ["MILTask", "mil_splits", "train_mil"]

log = logging.getLogger(__name__)


def mil_splits(cfg: Any) -> tuple[list[SlideEntry], list[SlideEntry]]:
    """(training, validation) slides: split column, ``val_data``, or ``split`` by patient."""
    cohort = load_cohort(cfg.data)
    if cohort.problems:
        log.warning("left out of training: %s", "; ".join(cohort.problems))
    if cfg.val_data:
        train, val = cohort.slides, load_cohort(cfg.val_data).slides
        if any(s.split for s in cohort):
            train = cohort.split("train").slides
    elif any(s.split for s in cohort):
        train, val = cohort.split("train").slides, cohort.split("val").slides
    elif cfg.split:
        parts = split_by_patient(cohort.slides, parse_split(cfg.split), cfg.seed)
        train, val = parts.get("train", []), parts.get("val", [])
    else:
        train, val = cohort.slides, []
    shared = {s.patient_id for s in train} & {s.patient_id for s in val if s.patient}
    if shared:
        log.warning("patients in both training and validation: %s", sorted(shared)[:5])
    if not train:
        raise ConfigError(f"no training slides in {cfg.data}; give split=train rows")
    return train, val


def resolve_classes(cfg: Any, train: list[SlideEntry]) -> list[str]:
    if cfg.task == "regression":
        return []
    if cfg.classes:
        return [c.strip() for c in cfg.classes.split(",") if c.strip()]
    if cfg.task == "multilabel":
        return sorted({p.strip() for s in train for p in (s.label or "").split(";") if p.strip()})
    return Cohort(train).classes


def target_of(task: str, classes: list[str], entry: SlideEntry) -> np.ndarray:
    """The float32 target of a slide's label (class index, multi-hot vector or value)."""
    label, where = entry.label, f"{entry.path.name} (line {entry.line})"
    if not label:
        raise ConfigError(f"{where} has no label; every training slide needs one")
    if task == "regression":
        try:
            value = float(label)
        except ValueError:
            value = float("nan")
        if not np.isfinite(value):
            raise ConfigError(f"{where}: regression needs finite numbers, got {label!r}")
        return np.float32(value).reshape(1)
    names = [p.strip() for p in label.split(";")] if task == "multilabel" else [label]
    bad = [n for n in names if n not in classes]
    if bad:
        raise ConfigError(f"{where}: labels {bad} are not among the classes {classes}")
    if task == "multilabel":
        vec = np.zeros(len(classes), np.float32)
        vec[[classes.index(n) for n in names]] = 1
        return vec
    return np.float32(classes.index(label)).reshape(1)


def _names(reasons: dict[str, str], limit: int = 5) -> str:
    more = f" and {len(reasons) - limit} more" if len(reasons) > limit else ""
    return "; ".join(list(reasons.values())[:limit]) + more


def report_left_out(ds: FeatureBags, which: str, total: int) -> None:
    """One warning per kind of left-out bag, with its count and the first files."""
    empty = {k: v for k, v in ds.skipped.items() if "empty bag" in v}
    bad = {k: v for k, v in ds.skipped.items() if k not in empty}
    for reasons, what in (
        (ds.missing, "without a feature file"),
        (empty, "with an empty bag (no tissue patches)"),
        (bad, "with an unreadable or NaN/Inf feature file"),
    ):
        if reasons:
            log.warning(
                "left out %d of %d %s slides %s: %s",
                len(reasons),
                total,
                which,
                what,
                _names(reasons),
            )


def no_bags_message(ds: FeatureBags, folder: str, total: int) -> str:
    """The one-line error when no training slide has a usable bag."""
    empty = sum("empty bag" in v for v in ds.skipped.values())
    if empty == total:
        return (
            f"every one of the {total} training bags in {folder} is empty (no tissue patches); "
            "check the slides, or re-run slidestream features with a lower --min-tissue"
        )
    if len(ds.missing) == total:
        return (
            f"no feature files of the training slides in {folder} (e.g. "
            f"{next(iter(ds.missing.values()))}); run slidestream features on this cohort"
        )
    return (
        f"no usable feature files of the {total} training slides in {folder}: "
        f"{len(ds.missing)} missing, {empty} empty, {len(ds.skipped) - empty} unreadable or "
        f"NaN/Inf (e.g. {_names({**ds.skipped, **ds.missing}, 1)})"
    )


def check_classes(task: str, classes: list[str], ds: FeatureBags) -> None:
    """Refuse a classification run whose usable training bags hold fewer than two classes;
    warn about named classes without a training bag."""
    if task not in ("binary", "multiclass"):
        return
    present = sorted({int(t[0]) for t in ds.targets})
    if len(present) < 2:
        only = classes[present[0]] if present else "none"
        raise ConfigError(
            f"the {len(ds)} usable training bags all have the label {only!r}; {task} training "
            "needs at least two classes (check the labels, or the slides left out above)"
        )
    absent = [c for j, c in enumerate(classes) if j not in present]
    if absent:
        log.warning("no training bag of the classes %s", absent)


class MILTask(Task):
    """MIL on feature files (``slidestream train-mil``)."""

    kind = "mil"
    unit = "bags"

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        train, val = mil_splits(cfg)
        self.classes = resolve_classes(cfg, train)

        def bags(entries: list[SlideEntry], training: bool) -> FeatureBags:
            targets = [target_of(cfg.task, self.classes, e) for e in entries]
            ds = FeatureBags(
                entries,
                cfg.features,
                targets,
                train=training,
                seed=cfg.seed,
                max_instances=cfg.max_instances,
                reference=None if training else self.train_ds.settings,
            )
            report_left_out(ds, "training" if training else "validation", len(entries))
            self.skipped.update({**ds.missing, **ds.skipped})
            return ds

        self.train_ds = bags(train, True)
        if not len(self.train_ds):
            raise ConfigError(no_bags_message(self.train_ds, cfg.features, len(train)))
        check_classes(cfg.task, self.classes, self.train_ds)
        self.val_ds = bags(val, False) if val else None
        self.spec = MILSpec(
            in_dim=self.train_ds.dim(),
            outputs=outputs_for(cfg.task, self.classes),
            aggregator=cfg.model,
            hidden=cfg.hidden,
            dropout=cfg.dropout,
            layers=cfg.layers,
            task=cfg.task,
            classes=self.classes,
        )

    def setup(self, device: torch.device, rank: int, world: int, channels_last: bool) -> None:
        self.device, self.rank, self.world = device, rank, world
        self.model = MILModel(self.spec)
        if self.cfg.standardize:
            self.model.set_standardization(*self.train_ds.statistics())
        self.model.to(device)
        weight = self._class_weights()
        self.weight = weight.to(device) if weight is not None else None

    def _class_weights(self) -> torch.Tensor | None:
        if self.cfg.class_weighting == "none" or self.cfg.task not in ("binary", "multiclass"):
            return None
        labels = np.array([int(t[0]) for t in self.train_ds.targets])
        counts = np.bincount(labels, minlength=self.spec.outputs).astype(np.float64)
        weights = len(labels) / (len(counts) * np.maximum(counts, 1))
        return torch.tensor(weights, dtype=torch.float32)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.model.parameters()), "lr": self.cfg.lr}]

    # --- training ----------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        """This rank's bags of ``epoch``: one seeded permutation, every world-th from rank."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        n = len(self.train_ds)
        order = torch.randperm(n, generator=g).tolist()
        step = self.cfg.accumulate * self.world
        order = order[: max(step, n - n % step)] if n >= step else (order * step)[:step]
        return order[self.rank :: self.world]

    def start_epoch(self, epoch: int) -> None:
        self.train_ds.set_epoch(epoch)
        self.epoch = epoch

    def steps_per_epoch(self) -> int:
        return len(self._order(0)) // self.cfg.accumulate

    def steps(self, epoch: int) -> Iterator[Iterator[dict[str, Any]]]:
        order = self._order(epoch)
        loader = DataLoader(
            self.train_ds, batch_size=None, sampler=order, num_workers=self.cfg.workers
        )
        it, k = iter(loader), self.cfg.accumulate
        for _ in range(len(order) // k):
            yield (next(it) for _ in range(k))

    def loss(self, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, int]:
        logits = self.model(batch["features"].to(device, non_blocking=True))
        target = batch["target"].to(device)[None]
        if self.weight is not None:
            loss = nn.functional.cross_entropy(logits.float(), target.long().view(-1), self.weight)
        else:
            loss = loss_fn(self.cfg.task, logits, target)
        return loss, 1

    def loss_scale(self, images: int) -> float:
        return 1.0 / self.cfg.accumulate

    # --- evaluation --------------------------------------------------------------------------
    def has_validation(self) -> bool:
        return self.val_ds is not None and len(self.val_ds) > 0

    @torch.no_grad()
    def predict(self, ds: FeatureBags, rank: int = 0, world: int = 1) -> list[tuple]:
        """(index, prediction, target) of every world-th bag of ``ds`` from ``rank``."""
        self.model.eval()
        rows = []
        for i in range(rank, len(ds), world):
            item = ds[i]
            if "error" in item:
                self.skipped[item["slide"]] = item["error"]
                continue
            out = predictions(self.cfg.task, self.model(item["features"].to(self.device)))
            rows.append((i, out.cpu().numpy()[0], item["target"].numpy()))
        self.model.train()
        return rows

    def evaluate(self, rank: int, world: int) -> dict[str, Any]:
        from slidestream.train.ddp import all_gather

        rows = sorted(
            r for part in all_gather(self.predict(self.val_ds, rank, world), world) for r in part
        )
        if not rows:
            return {}
        out = np.stack([r[1] for r in rows])
        targets = np.stack([r[2] for r in rows])
        if self.cfg.task in ("binary", "multiclass"):
            targets = targets.reshape(-1).astype(int)
        metrics = metrics_for(self.cfg.task, targets, out, len(self.classes))
        if self.cfg.task in ("binary", "multiclass"):
            metrics["_eval"] = {"y": targets, "probs": out}
        return metrics

    # --- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.spec.as_dict(),
            "classes": self.classes,
            "task": self.cfg.task,
            "features": self._feature_attrs(),
            "config": config_dict(self.cfg),
        }

    def _feature_attrs(self) -> dict[str, Any]:
        """Encoder settings of the feature files (so prediction can compute the same)."""
        attrs = self.train_ds.attrs
        keep = ("encoder", "weights", "weights_hash", "mpp", "size", "min_tissue", "normalization")
        return {k: attrs[k] for k in keep if k in attrs}

    def fingerprint(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "kind": self.kind,
            "model": cfg.model,
            "hidden": cfg.hidden,
            "task": cfg.task,
            "classes": self.classes,
            "data": f"{portable_path(cfg.data, self.run)} ({file_digest(cfg.data)})",
            "features": portable_path(cfg.features, self.run),
        }


def train_mil(cfg: Any, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Train (or resume) a MIL model on feature files; returns the run folder.

    Raises ConfigError for bad settings or labels, missing feature files for every training
    slide, or a run folder that holds another run.
    """
    run = run_dir(cfg, "mil")
    task = MILTask(cfg)
    fit(task, settings_of(cfg, run), on_epoch)
    return run
