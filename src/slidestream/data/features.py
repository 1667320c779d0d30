"""Per-slide feature files (``slidestream features``) and the bags MIL trains on.

One HDF5 file per slide, ``DIR/<slide stem>.h5`` (``<stem>-<path hash>.h5`` where two slides of a
cohort share a stem; see :mod:`slidestream.data.feature_folder`):

- ``features``: (N, D) float16 or float32, one row per patch;
- ``coords``: (N, 2) int64 top-left corners ``(l0_x, l0_y)`` in level-0 px;
- attributes: ``encoder``, ``weights`` (source), ``weights_hash`` (SHA-1 of the encoder's
  state dict, 12 hex), ``mpp`` (µm/px of the patches; 0 = native pixels), ``size`` (patch px),
  ``size0`` (level-0 px covered along x, y), ``normalization`` (JSON mean/std),
  ``slide`` (path as given), ``source`` (resolved path), ``reason`` (why a file has no rows,
  e.g. no tissue patches), ``format_version``.

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

from slidestream.data.feature_folder import FeatureFolder, check_settings, settings_of
from slidestream.errors import ConfigError

__all__ = [
    "FORMAT_VERSION",
    "FeatureBags",
    "feature_path",
    "read_features",
    "read_header",
    "write_features",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def feature_path(
    folder: str | os.PathLike[str], slide: str | os.PathLike[str], stem: str | None = None
) -> Path:
    """``folder/<stem>.h5``: ``stem`` (from :func:`~slidestream.sampling.naming.output_stems`)
    or the slide's file stem. To find an existing slide's file use
    :meth:`~slidestream.data.feature_folder.FeatureFolder.find`."""
    return Path(folder) / f"{stem or Path(slide).stem}.h5"


def write_features(
    path: str | os.PathLike[str],
    features: np.ndarray,
    coords: np.ndarray,
    attrs: dict[str, Any],
) -> Path:
    """Write one slide's feature file atomically (temporary file, then rename).

    ``features`` (N, D), ``coords`` (N, 2) level-0 px; ``attrs`` as in the module doc (``source``
    is added from ``slide``, and ``source_rel``: its path relative to the file's folder). An empty slide (N = 0) is written with a ``reason`` attribute.

    Raises:
        ConfigError: rows and coords differ in number, or a feature row is NaN/Inf (naming
            the file and the slide).
    """
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(features) != len(coords):
        raise ConfigError(f"{path}: {len(features)} feature rows but {len(coords)} coords")
    bad = int((~np.isfinite(features).all(axis=-1)).sum()) if np.size(features) else 0
    if bad:
        hint = " (float16 overflow: use --dtype float32)" if features.dtype == np.float16 else ""
        raise ConfigError(
            f"{path}: {bad} of {len(features)} feature rows are NaN/Inf{hint}; check the encoder "
            f"weights and the slide {attrs.get('slide', '')}"
        )
    attrs = dict(attrs)
    if attrs.get("slide") and "source" not in attrs:
        attrs["source"] = str(Path(attrs["slide"]).resolve())
    if attrs.get("source") and "://" not in str(attrs["source"]):
        # the slide seen from the feature folder: still found when both move or are copied
        attrs.setdefault("source_rel", os.path.relpath(attrs["source"], path.parent.resolve()))
    if not len(features):
        attrs.setdefault("reason", "no patches")
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


def _damaged(path: str | os.PathLike[str], what: Any) -> ConfigError:
    return ConfigError(
        f"feature file {path} is damaged ({what}); delete it and re-run slidestream features "
        "for that slide"
    )


def read_header(path: str | os.PathLike[str]) -> tuple[int, int, dict[str, Any]]:
    """(rows N, feature size D, attributes) of a feature file, without reading its data.

    Raises:
        ConfigError: unreadable or truncated file, missing datasets, or shapes that are not
            features (N, D) with coords (N, 2).
    """
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            shape, cshape = f["features"].shape, f["coords"].shape
    except (OSError, KeyError) as exc:
        raise _damaged(path, exc) from exc
    if len(shape) != 2 or cshape not in ((shape[0], 2), (0,)) or (shape[0] and not shape[1]):
        raise _damaged(path, f"features {shape}, coords {cshape}; want (N, D) and (N, 2)")
    return int(shape[0]), int(shape[1]), attrs


def read_features(
    path: str | os.PathLike[str], rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features (N, D), coords (N, 2) level-0 px, attributes) of a feature file; only the
    (increasing) ``rows`` when given, so a huge bag is never read whole to sample it.

    Raises:
        ConfigError: unreadable file, NaN/Inf values or coords that do not match the rows.
    """
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            if rows is None:
                feats, coords = f["features"][()], f["coords"][()]
            else:
                feats, coords = f["features"][rows], f["coords"][rows]
    except (OSError, KeyError, TypeError, IndexError) as exc:
        raise ConfigError(
            f"cannot read feature file {path} ({exc}); re-run slidestream features"
        ) from exc
    if len(feats) != len(coords) or (np.size(feats) and not np.isfinite(feats).all()):
        raise ConfigError(
            f"feature file {path} is inconsistent ({len(feats)} rows, {len(coords)} coords, "
            "or NaN/Inf values); re-run slidestream features for that slide"
        )
    return feats, coords, attrs


def value_sums(
    path: str | os.PathLike[str], chunk: int = 1 << 16
) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-feature sum and sum of squares (D,) float64 and the row count of a feature file,
    read ``chunk`` rows at a time (bounded memory for any bag size).

    Raises:
        ConfigError: unreadable file or NaN/Inf values (naming the file and how many rows).
    """
    import h5py

    try:
        with h5py.File(path, "r") as f:
            data = f["features"]
            n, d = data.shape
            total, sq, bad = np.zeros(d), np.zeros(d), 0
            for start in range(0, n, chunk):
                block = np.asarray(data[start : start + chunk], np.float64)
                ok = np.isfinite(block).all(axis=1)
                bad += int((~ok).sum())
                total, sq = total + block[ok].sum(0), sq + (block[ok] ** 2).sum(0)
    except (OSError, KeyError, ValueError) as exc:
        raise _damaged(path, exc) from exc
    if bad:
        raise ConfigError(
            f"feature file {path} has {bad} of {n} rows with NaN/Inf values; re-run "
            "slidestream features for that slide (--dtype float32 if float16 overflowed)"
        )
    return total, sq, n


class FeatureBags(Dataset):
    """Bags of one cohort's feature files: item ``i`` is ``{"features": (n, D) float32,
    "coords": (n, 2), "target", "index", "slide"}``, at most ``max_instances`` random
    instances when ``train`` (a fresh draw per epoch and item, from ``seed``; only those rows
    are read), all otherwise.

    Every file is checked when the bags are built, before any training: slides without a file
    are listed in ``missing``; empty bags (no tissue patches), unreadable or truncated files
    and files with NaN/Inf values in ``skipped`` (slide → one line naming the file). ``settings``
    are the encoder, weights hash, mpp, patch size and feature size every file shares.

    Raises:
        ConfigError: a file's settings differ from the others' (or from ``reference``, e.g. the
            training bags' settings): one line naming the file and what differs.
    """

    def __init__(
        self,
        entries: list[Any],
        folder: str | os.PathLike[str],
        targets: list[np.ndarray],
        *,
        max_instances: int | None = None,
        train: bool = False,
        seed: int = 0,
        reference: dict[str, Any] | None = None,
    ) -> None:
        self.folder, self.max_instances, self.train, self.seed = (
            Path(folder),
            max_instances,
            train,
            seed,
        )
        self.entries, self.targets, self.files, self.sizes = [], [], [], []
        self.missing: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.attrs: dict[str, Any] = {}
        lookup, found = FeatureFolder(folder), []
        for entry, target in zip(entries, targets, strict=True):
            path, why = lookup.find(entry.path)
            if path is None:
                self.missing[str(entry.path)] = why
                continue
            try:
                n, d, attrs = read_header(path)
            except ConfigError as exc:
                self.skipped[str(entry.path)] = str(exc)
                continue
            if n == 0:
                why = attrs.get("reason") or "no patches"
                self.skipped[str(entry.path)] = f"{path} is an empty bag ({why})"
                continue
            found.append((entry, target, path, n, settings_of(attrs, d), attrs))
        self.settings = check_settings([f[2] for f in found], [f[4] for f in found], reference)
        self._scan(found)
        self.epoch = 0

    def _scan(self, found: list[tuple]) -> None:
        """Read every bag once (chunked): drop those with NaN/Inf, keep the feature sums."""
        self._sums: tuple[Any, Any, int] = (0.0, 0.0, 0)
        for entry, target, path, n, _, attrs in found:
            try:
                total, sq, _ = value_sums(path)
            except ConfigError as exc:
                self.skipped[str(entry.path)] = str(exc)
                continue
            s0, q0, n0 = self._sums
            self._sums = (s0 + total, q0 + sq, n0 + n)
            self.entries.append(entry)
            self.targets.append(np.asarray(target, np.float32))
            self.files.append(path)
            self.sizes.append(n)
            self.attrs = self.attrs or attrs

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def dim(self) -> int:
        """Feature size D shared by the bags (0 without any)."""
        return int(self.settings["dim"]) if self.settings else 0

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and standard deviation (D,) float32 over every instance (finite:
        NaN/Inf bags are left out; zeros and ones without instances)."""
        total, sq, n = self._sums
        if n == 0:
            return torch.zeros(self.dim()), torch.ones(self.dim())
        mean = np.asarray(total) / n
        std = np.sqrt(np.maximum(np.asarray(sq) / n - mean**2, 0.0))
        return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry, n = self.entries[i], self.sizes[i]
        rows = None
        if self.train and self.max_instances and n > self.max_instances:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            rows = np.sort(rng.choice(n, self.max_instances, replace=False))
        try:
            feats, coords, _ = read_features(self.files[i], rows)
        except ConfigError as exc:  # changed on disk since the bags were checked
            return {"error": str(exc), "slide": str(entry.path)}
        if len(feats) == 0:
            return {
                "error": f"{self.files[i]}: no patches in its feature file",
                "slide": str(entry.path),
            }
        return {
            "features": torch.from_numpy(np.asarray(feats, np.float32)),
            "coords": torch.from_numpy(coords),
            "target": torch.from_numpy(self.targets[i]),
            "index": i,
            "slide": str(entry.path),
        }
