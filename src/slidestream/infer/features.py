"""Patch features of whole slides with a frozen encoder (``slidestream features``).

For each slide: tissue detection, a :class:`~slidestream.sampling.GridPatchSampler` grid of
``size`` px patches at ``mpp`` µm/px inside tissue, read by DataLoader workers while the encoder
runs batched on the device (autocast on CUDA), and one HDF5 file per slide written atomically
(see :mod:`slidestream.data.features`). Slides whose file exists with the same encoder, weights,
mpp and size are skipped (resume); a file made with other settings stops the run. The cohort is
split into shards ``i/n`` (every n-th slide from i: cluster array jobs, or the torchrun rank), so
no slide is done twice; unreadable slides are listed, not fatal.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from slidestream.data.feature_folder import FeatureFolder
from slidestream.data.features import feature_path, read_header, write_features
from slidestream.data.functional import IMAGENET_MEAN, IMAGENET_STD, normalize, resolve_device
from slidestream.errors import ConfigError, SlideStreamError
from slidestream.io import Slide, open_slide
from slidestream.models.mil import create_encoder
from slidestream.sampling import Cohort, GridPatchSampler, PatchLocation
from slidestream.sampling.naming import output_stems, path_hash
from slidestream.sampling.shards import parse_shard as parse_shard
from slidestream.tissue import detect_tissue

__all__ = ["FeatureExtractor", "FeatureReport", "extract_cohort", "parse_shard", "weights_hash"]

log = logging.getLogger(__name__)


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-1 (12 hex) of a model's state dict: names, shapes and values."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


class _Patches(Dataset):
    """Grid patches of one slide as uint8 (3, H, W), stain-normalised when ``stain`` is given;
    each worker opens its own handle."""

    def __init__(
        self, slide: Slide, sampler: GridPatchSampler, xy: np.ndarray, stain: Any = None
    ) -> None:
        self.slide, self.sampler, self.xy, self.stain = slide, sampler, xy, stain

    def __len__(self) -> int:
        return len(self.xy)

    def __getitem__(self, i: int) -> torch.Tensor:
        x, y = (int(v) for v in self.xy[i])
        pixels = self.sampler.read(self.slide, PatchLocation(x, y, 1.0))
        if self.stain is not None:
            pixels = self.stain(pixels)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


@dataclass
class FeatureReport:
    """What one shard did: slides written (of which ``empty``: no tissue patches), skipped
    (already done) and failed (path → error)."""

    written: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)  # written without rows: no tissue patches
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    patches: int = 0
    seconds: float = 0.0

    @property
    def patches_per_s(self) -> float:
        return self.patches / max(self.seconds, 1e-9)


class FeatureExtractor:
    """A frozen encoder ready to turn slides into feature files.

    ``mpp`` µm/px (None: native pixels; ``"encoder"``: the encoder's own, 0.5 unless
    :data:`~slidestream.models.encoders.ENCODERS` says otherwise) and ``size`` px (None: the
    encoder's input size, else 224) define the patches; ``min_tissue`` the tissue fraction a
    patch needs; ``dtype`` ``float16`` or ``float32`` for the stored features. Patches are
    normalised with the encoder's mean/std (ImageNet unless its registry entry differs); the
    settings, normalisation and output feature go into :attr:`attrs` (stain normalisation:
    :meth:`set_stain`). The encoder is built
    under seed 0, so a random-init encoder has the same weights (and weights hash) in every
    run: resuming and prediction recompute the same features.
    """

    def __init__(
        self,
        encoder: str,
        *,
        weights: str | None = None,
        mpp: float | None | str = "encoder",
        size: int | None = None,
        min_tissue: float = 0.5,
        batch_size: int = 64,
        workers: int = 2,
        dtype: str = "float16",
        device: str = "auto",
        backend: str = "auto",
    ) -> None:
        from slidestream.models.encoders import ENCODERS

        if dtype not in ("float16", "float32"):
            raise ConfigError(f"--dtype must be float16 or float32, got {dtype!r}")
        if batch_size < 1 or workers < 0:
            raise ConfigError("batch_size must be >= 1 and workers >= 0")
        spec = ENCODERS.get(encoder)
        if isinstance(mpp, str):
            if mpp != "encoder":
                raise ConfigError(f"mpp must be a number, None or 'encoder', got {mpp!r}")
            mpp = spec.mpp if spec else 0.5
        size = size or (spec.size if spec else 224)
        self.mean = spec.mean if spec else IMAGENET_MEAN
        self.std = spec.std if spec else IMAGENET_STD
        self.sampler = GridPatchSampler(size, mpp, min_tissue=min_tissue)
        self.device = resolve_device(device)
        with torch.random.fork_rng(devices=[]):  # random init is the same in every run
            torch.manual_seed(0)
            self.model = create_encoder(encoder, weights).to(self.device)
        self.batch_size, self.workers, self.dtype, self.backend = (
            batch_size,
            workers,
            dtype,
            backend,
        )
        self.stain: Any = None
        self.attrs: dict[str, Any] = {
            "encoder": encoder,
            "weights": str(weights) if weights else "none",
            "weights_hash": weights_hash(self.model),
            "mpp": float(mpp or 0.0),
            "size": size,
            "min_tissue": min_tissue,
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "output": spec.output if spec else "pooled",
            "stain": "none",
        }

    def set_stain(self, stain: Any) -> None:
        """Stain-normalise every patch with ``stain`` (a
        :class:`~slidestream.data.stain.StainNormalizer`, or None for none); its ``method:hash``
        goes into :attr:`attrs` as ``stain`` and the target as ``stain_target`` JSON."""
        from dataclasses import asdict

        self.stain = stain
        self.attrs["stain"] = stain.target.tag if stain is not None else "none"
        if stain is not None:
            self.attrs["stain_target"] = json.dumps(asdict(stain.target))
        else:
            self.attrs.pop("stain_target", None)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], **kwargs: Any) -> FeatureExtractor:
        """The extractor that made a feature file with these ``attrs`` (encoder, weights, mpp,
        size, min_tissue, stain target); ``kwargs`` (device, batch_size, ...) as in the
        constructor. Raises ConfigError when the rebuilt encoder's weights hash differs."""
        from slidestream.data.stain import StainNormalizer, StainTarget

        weights = None if attrs.get("weights") in (None, "none") else attrs["weights"]
        ex = cls(
            attrs["encoder"],
            weights=weights,
            mpp=attrs.get("mpp") or None,
            size=int(attrs["size"]),
            min_tissue=float(attrs.get("min_tissue", 0.5)),
            **kwargs,
        )
        if attrs.get("stain_target"):
            ex.set_stain(StainNormalizer(StainTarget.from_dict(json.loads(attrs["stain_target"]))))
        theirs = attrs.get("weights_hash")
        if theirs and ex.attrs["weights_hash"] != theirs:
            raise ConfigError(
                f"the encoder {attrs['encoder']} here has weights {ex.attrs['weights_hash']}, "
                f"the feature files {theirs}; pass slidestream predict --features DIR with the slides' "
                "feature files"
            )
        return ex

    @torch.no_grad()
    def encode(self, slide: Slide, xy: np.ndarray) -> np.ndarray:
        """(N, D) float32 features of the patches at ``xy`` (level-0 px) of ``slide``."""
        cuda = self.device.type == "cuda"
        loader = DataLoader(
            _Patches(slide, self.sampler, xy, self.stain),
            batch_size=self.batch_size,
            num_workers=self.workers,
            pin_memory=cuda,
        )
        amp = (
            torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        )
        out = []
        for batch in loader:
            with amp:
                feats = self.model(normalize(batch, self.mean, self.std, device=self.device))
            out.append(feats.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def is_done(self, path: Path) -> bool:
        """True when ``path`` holds features with these settings; ConfigError for others."""
        if not path.is_file():
            return False
        _, _, attrs = read_header(path)
        keys = ("encoder", "weights_hash", "mpp", "size", "stain")
        theirs = {k: attrs.get(k, "none" if k == "stain" else None) for k in keys}
        if any(theirs[k] != self.attrs[k] for k in keys):
            raise ConfigError(
                f"{path} holds features made with {theirs}; use another --out for these settings"
            )
        return True

    def slide(
        self,
        path: str | os.PathLike[str],
        out: Path,
        slide_mpp: float | None = None,
        target: Path | None = None,
    ) -> int:
        """Write the feature file of one slide (``target``, default ``out/<stem>.h5``);
        returns its number of patches (0: an empty file with a ``reason``)."""
        slide = open_slide(path, backend=self.backend, mpp=slide_mpp)
        mask = detect_tissue(slide, cache_dir=out / "masks")
        locs = self.sampler.locations(slide, mask)
        xy = locs[:, :2].astype(np.int64)
        feats = self.encode(slide, xy)
        attrs = {
            **self.attrs,
            "slide": str(path),
            "size0": list(self.sampler.geometry(slide).size0),
        }
        if not len(xy):
            attrs["reason"] = f"no patch with tissue fraction >= {self.attrs['min_tissue']}"
        write_features(target or feature_path(out, path), feats.astype(self.dtype), xy, attrs)
        return len(xy)


def _target(
    folder: FeatureFolder, out: Path, stem: str, entry: Any, extractor: FeatureExtractor
) -> tuple[Path, int | None]:
    """(where the slide's features go, rows of the finished file there or None to compute).
    An existing file of this slide is kept (or redone when damaged); a name taken by another
    slide's file gets the path hash."""
    found, _ = folder.find(entry.path)
    if found is not None:
        try:
            rows = read_header(found)[0]
        except ConfigError as exc:
            log.warning("%s; computing it again", exc)
            return found, None
        return found, rows if extractor.is_done(found) else None
    target = out / f"{stem}.h5"
    if target.stem in folder.stems:  # another slide's file (found would be this slide's)
        target = out / f"{entry.path.stem}-{path_hash(entry.path)}.h5"
    return target, None


def _one(
    extractor: FeatureExtractor,
    entry: Any,
    out: Path,
    target: Path,
    done: int | None,
    report: FeatureReport,
) -> tuple[int, str, str]:
    """Features of one slide into ``target`` unless ``done`` (the finished file's rows):
    (patches computed, status, note)."""
    key = str(entry.path)
    if done is not None:
        report.skipped.append(key)
        return 0, "skipped", "done in an earlier run"
    try:
        count = extractor.slide(entry.path, out, entry.mpp, target)
    except SlideStreamError as exc:
        report.failed[key] = str(exc)
        log.warning("features of %s failed: %s", entry.path, exc)
        return 0, "failed", str(exc)
    report.written.append(key)
    if count:
        return count, "written", ""
    report.empty.append(key)
    return 0, "empty", "empty bag: no tissue patches"


def _write_index(out: Path, shard: tuple[int, int], rows: list[list[Any]]) -> None:
    i, n = shard
    with open(out / f"index.{i}of{n}.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "file", "patches", "status", "note"])
        w.writerows(rows)


def extract_cohort(
    cohort: Cohort,
    out: str | os.PathLike[str],
    extractor: FeatureExtractor,
    shard: tuple[int, int] = (0, 1),
    on_slide: Callable[[str, int], None] | None = None,
) -> FeatureReport:
    """Feature files of shard ``i/n`` of ``cohort`` (every n-th slide from i) in ``out``;
    ``on_slide(path, patches)`` after each slide (0 patches: skipped, failed or empty).

    Files are named ``<stem>.h5``, or ``<stem>-<path hash>.h5`` where slides of the cohort
    share a stem (:func:`~slidestream.sampling.naming.output_stems`, computed over the whole
    cohort so every shard agrees); ``out/index.<i>of<n>.csv`` maps each slide of the shard to
    its file (slide, file, patches in the file, status written/skipped/empty/failed, note).
    Slides without tissue patches get an empty file with a ``reason`` (``report.empty``).

    Raises ConfigError when ``out`` holds features of other settings; unreadable slides are
    listed in the report (and in ``out/failed.<i>of<n>.txt``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stems = dict(zip(cohort.slides, output_stems([e.path for e in cohort]), strict=True))
    folder = FeatureFolder(out)
    i, n = shard
    report, t0, index = FeatureReport(), time.perf_counter(), []
    for entry in cohort.slides[i::n]:
        target, done = _target(folder, out, stems[entry], entry, extractor)
        count, status, note = _one(extractor, entry, out, target, done, report)
        folder.add(target)
        rows = count if done is None else done
        index.append([str(entry.path), target.name, rows, status, note])
        report.patches += count
        if on_slide is not None:
            on_slide(str(entry.path), count)
    report.seconds = time.perf_counter() - t0
    _write_index(out, shard, index)
    failed = out / f"failed.{i}of{n}.txt"
    if report.failed:
        failed.write_text("".join(f"{p}\t{e}\n" for p, e in report.failed.items()))
    else:
        failed.unlink(missing_ok=True)
    return report
