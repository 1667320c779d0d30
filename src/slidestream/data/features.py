"""Per-slide feature files (``slidestream features``) and the bags MIL trains on.

One HDF5 file per slide, ``DIR/<slide stem>.h5``:

- ``features``: (N, D) float16 or float32, one row per patch;
- ``coords``: (N, 2) int64 top-left corners ``(l0_x, l0_y)`` in level-0 px;
- attributes: ``encoder``, ``weights`` (source), ``weights_hash`` (SHA-1 of the encoder's
  state dict, 12 hex), ``mpp`` (µm/px of the patches; 0 = native pixels), ``size`` (patch px),
  ``size0`` (level-0 px covered along x, y), ``normalization`` (JSON mean/std),
  ``slide`` (path), ``format_version``.

Files are written to a temporary name in the same folder and renamed when complete, so a file
that exists is whole: that is what resuming relies on.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from slidestream.errors import ConfigError

__all__ = ["FORMAT_VERSION", "FeatureBags", "feature_path", "read_features", "write_features"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def feature_path(folder: str | os.PathLike[str], slide: str | os.PathLike[str]) -> Path:
    """Where the features of ``slide`` live in ``folder``: ``<stem>.h5``."""
    return Path(folder) / f"{Path(slide).stem}.h5"


def write_features(
    path: str | os.PathLike[str],
    features: np.ndarray,
    coords: np.ndarray,
    attrs: dict[str, Any],
) -> Path:
    """Write one slide's feature file atomically (temporary file, then rename)."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(features) != len(coords):
        raise ConfigError(f"{path}: {len(features)} feature rows but {len(coords)} coords")
    bad = int((~np.isfinite(features).all(axis=-1)).sum()) if np.size(features) else 0
    if bad:
        raise ConfigError(
            f"{path}: {bad} of {len(features)} feature rows are NaN/Inf; check the encoder "
            f"weights and the slide {attrs.get('slide', '')}"
        )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
            for key, value in {**attrs, "format_version": FORMAT_VERSION}.items():
                f.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_features(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features (N, D), coords (N, 2) level-0 px, attributes) of a feature file."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            feats, coords = f["features"][()], f["coords"][()]
    except (OSError, KeyError) as exc:
        raise ConfigError(
            f"cannot read feature file {path} ({exc}); re-run slidestream features"
        ) from exc
    if len(feats) != len(coords) or (np.size(feats) and not np.isfinite(feats).all()):
        raise ConfigError(
            f"feature file {path} is inconsistent ({len(feats)} rows, {len(coords)} coords, "
            "or NaN/Inf values); re-run slidestream features for that slide"
        )
    return feats, coords, attrs


class FeatureBags(Dataset):
    """Bags of one cohort's feature files: item ``i`` is ``{"features": (n, D) float32,
    "coords": (n, 2), "target", "index", "slide"}``, at most ``max_instances`` random
    instances when ``train`` (a fresh draw per epoch and item, from ``seed``), all otherwise.
    Slides without a feature file are left out and listed in ``missing``."""

    def __init__(
        self,
        entries: list[Any],
        folder: str | os.PathLike[str],
        targets: list[np.ndarray],
        *,
        max_instances: int | None = None,
        train: bool = False,
        seed: int = 0,
    ) -> None:
        self.folder, self.max_instances, self.train, self.seed = (
            Path(folder),
            max_instances,
            train,
            seed,
        )
        self.entries, self.targets, self.missing = [], [], {}
        for entry, target in zip(entries, targets, strict=True):
            path = feature_path(folder, entry.path)
            if path.is_file():
                self.entries.append(entry)
                self.targets.append(np.asarray(target, np.float32))
            else:
                self.missing[str(entry.path)] = f"no feature file {path}; run slidestream features"
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def dim(self) -> int:
        """Feature size D (from the first file)."""
        return int(read_features(feature_path(self.folder, self.entries[0].path))[0].shape[1])

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and standard deviation (D,) float32 over every instance."""
        total, sq, n = 0.0, 0.0, 0
        for entry in self.entries:
            feats = read_features(feature_path(self.folder, entry.path))[0].astype(np.float64)
            total, sq, n = total + feats.sum(0), sq + (feats**2).sum(0), n + len(feats)
        mean = np.asarray(total) / max(n, 1)
        std = np.sqrt(np.maximum(np.asarray(sq) / max(n, 1) - mean**2, 0.0))
        return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self.entries[i]
        feats, coords, _ = read_features(feature_path(self.folder, entry.path))
        if len(feats) == 0:
            return {
                "error": f"{entry.path}: no patches in its feature file",
                "slide": str(entry.path),
            }
        if self.train and self.max_instances and len(feats) > self.max_instances:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            keep = np.sort(rng.choice(len(feats), self.max_instances, replace=False))
            feats, coords = feats[keep], coords[keep]
        return {
            "features": torch.from_numpy(np.asarray(feats, np.float32)),
            "coords": torch.from_numpy(coords),
            "target": torch.from_numpy(self.targets[i]),
            "index": i,
            "slide": str(entry.path),
        }
