"""Patch classifier training from an HDF5 patch database or straight from slides (PatchStream).

One run folder per ``name``: ``config.yaml`` (resolved), ``metrics.csv`` (one row per epoch),
``last.pt`` and ``best.pt`` (atomic, resumable), TensorBoard events with scalars and a confusion
matrix image, ``val_grid_epoch<N>.png`` (validation patches with true/predicted class) and
``curves.png``. Re-running with the same ``name`` resumes from ``last.pt``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from slidestream.data import PatchLoader, PatchStream, default_augmentation, normalize
from slidestream.data.functional import IMAGENET_MEAN, IMAGENET_STD
from slidestream.data.hdf5 import PatchDatabase
from slidestream.data.loader import OneThread
from slidestream.data.preview import patch_grid
from slidestream.errors import ConfigError, NoPatchesError
from slidestream.models.classifiers import create_classifier
from slidestream.sampling import RandomPatchSampler, load_cohort
from slidestream.train.config import config_dict
from slidestream.train.loop import fit, settings_of
from slidestream.train.metrics import classification_metrics
from slidestream.train.patch_config import PatchTrainConfig
from slidestream.train.runlog import file_digest, portable_path, run_dir
from slidestream.train.task import Task

__all__ = ["PatchTask", "PatchTrainConfig", "train_patches"]

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
    stain: dict[str, Any] | None = None  # the stain target the patches are normalised to


def _is_db(path: str) -> bool:
    return Path(path).suffix.lower() in (".h5", ".hdf5")


def _stain(cfg: PatchTrainConfig, aug: Any) -> tuple[Any, Any, dict[str, Any] | None]:
    """(train transform, val transform, stain target dict) with ``cfg.stain_norm`` first."""
    from dataclasses import asdict

    from torchvision.transforms import v2

    from slidestream.data.stain import load_stain_target
    from slidestream.data.transforms import StainNormalize

    mpp = PatchDatabase(cfg.data).params.get("mpp") if _is_db(cfg.data) else cfg.mpp
    norm = load_stain_target(cfg.stain_norm, cfg.stain_target, mpp=mpp)
    if norm is None:
        return aug, None, None
    first = StainNormalize(norm.target)
    return v2.Compose([first, aug]) if aug else first, first, asdict(norm.target)


def _load_data(cfg: PatchTrainConfig) -> _Data:
    aug = None if cfg.augmentation == "none" else default_augmentation(cfg.augmentation)
    aug, val_tf, stain = _stain(cfg, aug)
    val_path = cfg.val_data
    if _is_db(cfg.data):
        train = PatchDatabase(cfg.data, transform=aug)
        if val_path is None and ".train." in Path(cfg.data).name:
            sibling = Path(cfg.data).with_name(Path(cfg.data).name.replace(".train.", ".val."))
            val_path = str(sibling) if sibling.exists() else None
        val = PatchDatabase(val_path, transform=val_tf) if val_path else None
        if val is not None and val.classes != train.classes:
            raise ConfigError(f"{val_path} has classes {val.classes}, {cfg.data} {train.classes}")
        if not train.classes:
            raise ConfigError(
                f"{cfg.data} has no classes: build it with slidestream patches from a cohort "
                f"CSV with a label column, --labels annotations, or --tiles class folders"
            )
        if not len(train):
            raise NoPatchesError(
                f"{cfg.data} holds no patches: rebuild it with slidestream patches --min-tissue "
                f"set lower, after checking the tissue masks (it names the slides that gave "
                f"none)"
            )
        counts = [train.class_counts.get(c, 0) for c in train.classes]
        stored = dict(train.params.get("stain") or {})  # normalised when the database was built
        stored.pop("tag", None)
        return _Data(
            train, val, train.classes, counts, train.patch_size, train.params.get("mpp"), False,
            stain or stored or None,
        )  # fmt: skip
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
            transform=val_tf,
        )
        val.classes = train.classes
    if not train.classes:
        raise ConfigError(f"{cfg.data} has no label column values to train on")
    counts = [sum(s.label == c for s in cohort) for c in train.classes]
    return _Data(train, val, train.classes, counts, cfg.size, cfg.mpp, True, stain)


def _loaders(
    cfg: PatchTrainConfig, data: _Data, pin: bool = False
) -> tuple[DataLoader, DataLoader | None]:
    common = {
        "batch_size": cfg.batch_size,
        "num_workers": cfg.workers,
        "persistent_workers": cfg.workers > 0,
        "pin_memory": pin,
        "worker_init_fn": OneThread(),
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


class PatchTask(Task):
    """Patch classification (``slidestream train-patches``) on the one training loop."""

    kind = "patch"

    def __init__(self, cfg: PatchTrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.data = _load_data(cfg)
        self.classes = self.data.classes
        self._it: Any = None

    def setup(self, device: torch.device, rank: int, world: int, channels_last: bool) -> None:
        cfg = self.cfg
        self.device, self.channels_last = device, channels_last
        self.model = create_classifier(cfg.model, len(self.classes), cfg.weights).to(device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.train_loader, self.val_loader = _loaders(cfg, self.data, pin=device.type == "cuda")
        self._steps = cfg.steps_per_epoch or (200 if self.data.streamed else len(self.train_loader))
        self.weight = None
        if cfg.class_weighting == "balanced":
            c = torch.tensor(self.data.counts, dtype=torch.float32).clamp(min=1)
            self.weight = (c.sum() / (len(c) * c)).to(device)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.model.parameters()), "lr": self.cfg.lr}]

    def start_epoch(self, epoch: int) -> None:
        """Each epoch starts a new pass, shuffled by (seed, epoch): a resumed run sees the
        same batches as an uninterrupted one."""
        if hasattr(self.data.train, "set_epoch"):
            self.data.train.set_epoch(epoch)
        loader = self.train_loader
        for gen in (getattr(loader, "generator", None), getattr(loader.sampler, "generator", None)):
            if gen is not None:
                gen.manual_seed(self.cfg.seed * 100_003 + epoch)
        self._it = None

    def steps_per_epoch(self) -> int:
        return self._steps

    def steps(self, epoch: int) -> Iterator[list[Any]]:
        for _ in range(self._steps):
            yield _Lazy(self)

    def next_batch(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self.train_loader)
        batch = next(self._it, None)
        if batch is None:  # a pass ended before the epoch's steps did: start another
            self._it = iter(self.train_loader)
            batch = next(self._it, None)
        if batch is None:
            raise NoPatchesError(
                f"no training batch from {self.cfg.data}: it holds no patches (or fewer than "
                "one batch); for a cohort, check the slides' tissue masks, min_tissue and mpp"
            )
        return batch

    def loss(self, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, int]:
        x = normalize(batch["image"], device=device, channels_last=self.channels_last)
        y = batch["label"].to(device, non_blocking=True)
        logits = self.model(x)
        return torch.nn.functional.cross_entropy(logits.float(), y, weight=self.weight), len(y)

    def has_validation(self) -> bool:
        return self.val_loader is not None

    @torch.no_grad()
    def evaluate(self, rank: int, world: int) -> dict[str, Any]:
        self.model.eval()
        probs, labels, images = [], [], []
        for batch in self.val_loader:
            x = normalize(batch["image"], device=self.device, channels_last=self.channels_last)
            probs.append(torch.softmax(self.model(x).float(), 1).cpu())
            labels.append(batch["label"])
            if sum(len(i) for i in images) < 32:
                images.append(batch["image"])
        self.model.train()
        p, y = torch.cat(probs).numpy(), torch.cat(labels).numpy()
        self._grid = (torch.cat(images)[:32], y[:32], p[:32])
        return {**classification_metrics(y, p, len(self.classes)), "_eval": {"y": y, "probs": p}}

    def epoch_images(self, epoch: int, rows: list[dict[str, Any]]) -> None:
        grid = getattr(self, "_grid", None)
        if grid is None:
            return
        from PIL import Image

        images, y, p = grid
        cls = self.classes
        caps = [
            f"true {cls[t][:10]}\npred {cls[int(q.argmax())][:10]} {q.max():.2f}"
            for t, q in zip(y, p, strict=True)
        ]
        tiles = patch_grid([i.permute(1, 2, 0).numpy() for i in images], caps, columns=8, tile=96)
        Image.fromarray(tiles).save(
            Path(self.cfg.out) / self._run_name / f"val_grid_epoch{epoch}.png"
        )
        self._grid = None

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": {"name": self.cfg.model, "num_classes": len(self.classes)},
            "classes": self.classes,
            "mpp": self.data.mpp,
            "patch_size": self.data.size,
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "stain": self.data.stain,  # predict normalises tiles to this target too
            # a database carries its own patch size and mpp; the config's are for streams
            "config": {**config_dict(self.cfg), "size": self.data.size, "mpp": self.data.mpp},
        }

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.cfg.model,
            "classes": self.classes,
            "task": "multiclass",
            "patch_size": self.data.size,
            "mpp": self.data.mpp,
            "data": f"{portable_path(self.cfg.data, self.run)} ({_data_identity(self.cfg.data)})",
        }


class _Lazy:
    """One optimizer step of a patch run: a single batch, fetched when the loop asks."""

    def __init__(self, task: PatchTask) -> None:
        self.task = task

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield self.task.next_batch()


def _data_identity(path: str) -> str:
    """A database: its patch and class counts (cheap, changes when it is rebuilt); a cohort
    file: a digest of its bytes."""
    if _is_db(path):
        db = PatchDatabase(path)
        return f"{len(db)} patches, {db.class_counts}"
    return file_digest(path)


def train_patches(
    cfg: PatchTrainConfig, on_epoch: Callable[[dict[str, Any]], None] | None = None
) -> Path:
    """Train (or resume) a patch classifier; returns the run folder.

    Raises ConfigError for bad settings or data, or a run folder that holds another run.
    """
    run = run_dir(cfg, "patches")
    task = PatchTask(cfg)
    task._run_name = run.name
    done = fit(task, settings_of(cfg, run), on_epoch)
    if task.data.stain is not None:  # also in the checkpoints, for predict
        from slidestream.data.stain import StainTarget

        StainTarget.from_dict(task.data.stain).to_json(Path(done) / "stain.json")
    return done
