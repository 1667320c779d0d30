"""Whole-slide prediction with a patch classifier: grid tiles over tissue, read by DataLoader
workers while the model runs, written as tiles CSV, heatmap (NPY + PNG), GeoJSON and a call."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from slidestream.colors import hex_color
from slidestream.data.functional import normalize, resolve_device
from slidestream.errors import ConfigError, SlideReadError
from slidestream.infer.export import contours_geojson, tiles_geojson, write_geojson, write_tiles_csv
from slidestream.infer.heatmap import heatmap_overlay
from slidestream.infer.viewer import write_viewer
from slidestream.io import Slide, open_slide
from slidestream.models.checkpoint import load_checkpoint
from slidestream.models.classifiers import create_classifier
from slidestream.sampling import GridPatchSampler, PatchLocation
from slidestream.tissue import detect_tissue

__all__ = ["PatchPredictor", "SlidePrediction", "aggregate"]

log = logging.getLogger(__name__)


@dataclass
class SlidePrediction:
    """Slide-level result: the call, class probabilities, how many tiles voted, how many tiles
    were left out because their pixels could not be decoded, and the outputs' file stem."""

    slide: str
    call: str
    probs: list[float]
    tiles: int
    damaged: int = 0
    stem: str = ""
    heatmap_class: str = ""  # the class whose probability the heatmap and GeoJSON show


class _Tiles(Dataset):
    """Grid tiles of one slide; each worker opens its own handle (Slide pickles lazily)."""

    def __init__(self, slide: Slide, sampler: GridPatchSampler, xy: np.ndarray) -> None:
        self.slide, self.sampler, self.xy = slide, sampler, xy

    def __len__(self) -> int:
        return len(self.xy)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        """The tile as (3, H, W) uint8, and False (with a white tile) if it cannot be decoded."""
        x, y = (int(v) for v in self.xy[i])
        try:
            pixels = self.sampler.read(self.slide, PatchLocation(x, y, 1.0))
        except SlideReadError as exc:
            log.info("%s: tile at (%d, %d) left out: %s", self.slide.path, x, y, exc)
            size = self.sampler.size
            return torch.full((3, size, size), 255, dtype=torch.uint8), False
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), True


def warn_if_empty(
    path: Any, grid: np.ndarray, collection: dict[str, Any], name: str, threshold: float
) -> None:
    """Log a warning naming the slide when its heatmap has no predicted cell, or when no
    region reaches ``threshold`` (an empty GeoJSON)."""
    if not np.isfinite(grid).any():
        log.warning("%s: no tile was predicted (no tissue found?): the heatmap is empty", path)
    elif not collection.get("features"):
        log.warning(
            "%s: no region reaches p(%s) >= %g: the GeoJSON is empty (lower --threshold or "
            "choose another --class)",
            path,
            name,
            threshold,
        )


def aggregate(probs: np.ndarray, method: str = "mean", topk: int = 10) -> np.ndarray:
    """Slide-level class probabilities from tile probabilities (N, C)."""
    if len(probs) == 0:
        return np.full(probs.shape[1], np.nan)
    if method == "mean":
        return probs.mean(0)
    if method == "majority":
        votes = np.bincount(probs.argmax(1), minlength=probs.shape[1])
        return votes / votes.sum()
    if method == "topk":  # "is there enough of class c anywhere": top-k tile mean per class
        k = max(1, min(topk, len(probs)))
        top = np.sort(probs, axis=0)[-k:].mean(0)
        if probs.shape[1] == 2:  # binary: the positive class decides, the negative is 1 - p
            return np.array([1.0 - top[1], top[1]])
        return top / top.sum()
    raise ConfigError(f"aggregate must be mean, majority or topk, got {method!r}")


def _stain_of(ckpt: dict[str, Any], stain: Any) -> Any:
    """The StainNormalize transform of ``stain`` (see :class:`PatchPredictor`), or None."""
    from slidestream.data.stain import StainTarget
    from slidestream.data.transforms import StainNormalize

    if isinstance(stain, str) and stain == "checkpoint":
        saved = ckpt.get("stain")
        return StainNormalize(StainTarget.from_dict(saved)) if saved else None
    return StainNormalize(stain.target) if stain is not None else None


class PatchPredictor:
    """A patch-classifier checkpoint ready to predict slides (settings come from the checkpoint).

    ``stain``: ``"checkpoint"`` (tiles stain-normalised to the training run's target when it
    had one), None (never), or a :class:`~slidestream.data.stain.StainNormalizer`.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        *,
        device: str = "auto",
        batch_size: int = 64,
        workers: int = 2,
        min_tissue: float = 0.25,
        stain: Any = "checkpoint",
    ) -> None:
        ckpt = load_checkpoint(checkpoint)
        if ckpt["kind"] != "patch":
            raise ConfigError(f"{checkpoint} is a {ckpt['kind']} checkpoint, not a patch model")
        self.classes: list[str] = list(ckpt["classes"])
        self.mpp, self.size = ckpt.get("mpp"), int(ckpt["patch_size"])
        norm = ckpt.get("normalization") or {}
        self.mean, self.std = norm.get("mean"), norm.get("std")
        self.device = resolve_device(device)
        self.model = create_classifier(ckpt["model"]["name"], len(self.classes))
        try:
            self.model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:160]
            raise ConfigError(
                f"{checkpoint}: its weights do not fit {ckpt['model']['name']} with "
                f"{len(self.classes)} classes ({first}); was the file edited or mixed up?"
            ) from exc
        self.model.to(self.device).eval()
        self.batch_size, self.workers, self.min_tissue = batch_size, workers, min_tissue
        self.stain = _stain_of(ckpt, stain)

    @torch.no_grad()
    def tile_probs(self, slide: Slide, sampler: GridPatchSampler, xy: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C) of the tiles at ``xy``; NaN rows for tiles whose pixels
        cannot be decoded."""
        loader = DataLoader(
            _Tiles(slide, sampler, xy),
            batch_size=self.batch_size,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )
        out = []
        kw = {k: v for k, v in (("mean", self.mean), ("std", self.std)) if v}
        for batch, ok in loader:
            probs = np.full((len(ok), len(self.classes)), np.nan, np.float32)
            if ok.any():
                tiles = self.stain(batch[ok]) if self.stain is not None else batch[ok]
                logits = self.model(normalize(tiles, device=self.device, **kw))
                probs[ok.numpy()] = torch.softmax(logits.float(), 1).cpu().numpy()
            out.append(probs)
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(
        self,
        path: str | os.PathLike[str],
        out_dir: str | os.PathLike[str],
        *,
        backend: str = "auto",
        slide_mpp: float | None = None,
        aggregate_by: str = "mean",
        topk: int = 10,
        threshold: float = 0.5,
        geojson: str = "contours",
        target: str | None = None,
        stem: str | None = None,
    ) -> SlidePrediction:
        """Predict one slide and write ``<stem>.tiles.csv``, ``.heatmap.npy``/``.png``,
        ``.geojson`` and ``.viewer.html`` (zoomable page: slide, heatmap, contours) (``stem``:
        the slide's file stem unless given). Tiles whose pixels cannot
        be decoded are left out (NaN in the heatmap) and counted in ``damaged``."""
        from PIL import Image

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        slide = open_slide(path, backend=backend, mpp=slide_mpp)
        sampler = GridPatchSampler(
            self.size, self.mpp, min_tissue=self.min_tissue, cover_edges=True
        )
        mask = detect_tissue(slide, cache_dir=out / "masks")
        locs = sampler.locations(slide, mask)
        xy, tissue = locs[:, :2].astype(np.int64), locs[:, 2]
        probs = self.tile_probs(slide, sampler, xy)
        read = np.isfinite(probs).all(1)
        damaged = int((~read).sum())
        xy, tissue, probs = xy[read], tissue[read], probs[read]
        stem, size0 = stem or Path(path).stem, sampler.geometry(slide).size0
        write_tiles_csv(out / f"{stem}.tiles.csv", xy, size0, tissue, probs, self.classes)
        k = self._target_index(target)
        grid = self._grid(slide, sampler, xy, probs)
        np.save(out / f"{stem}.heatmap.npy", grid)
        thumb = slide.thumbnail(1024)
        w0, h0 = slide.dimensions
        rows, cols = grid.shape[1:]
        step = sampler.step * size0[0] / self.size, sampler.step * size0[1] / self.size
        cover = (cols * step[0] / w0, rows * step[1] / h0)
        Image.fromarray(heatmap_overlay(thumb, grid[k], cover, f"p({self.classes[k]})")).save(
            out / f"{stem}.heatmap.png"
        )
        collection = (
            tiles_geojson(xy, size0, probs, self.classes, threshold)
            if geojson == "tiles"
            else contours_geojson(grid[k], (0.0, 0.0, *step), self.classes[k], threshold)
        )
        write_geojson(collection, out / f"{stem}.geojson")
        warn_if_empty(path, grid[k], collection, self.classes[k], threshold)
        side = min(4096, max(1024, 4 * max(rows, cols)))
        write_viewer(
            out / f"{stem}.viewer.html",
            thumb if side == 1024 else slide.thumbnail(side),
            (w0, h0),
            grid[k],
            step,
            collection,
            title=f"{stem}: p({self.classes[k]})",
            heat_label=f"p({self.classes[k]})",
            contour_color=hex_color(self.classes[k]),
        )
        slide_probs = aggregate(probs, aggregate_by, topk)
        call = self.classes[int(np.nanargmax(slide_probs))] if len(probs) else "no tissue"
        return SlidePrediction(
            str(path),
            call,
            [float(p) for p in slide_probs],
            len(probs),
            damaged,
            stem,
            self.classes[k],
        )

    def heatmap_class(self, target: str | None) -> str:
        """The class whose probability heatmaps and GeoJSON show for ``--class target``."""
        return self.classes[self._target_index(target)]

    def _target_index(self, target: str | None) -> int:
        if target is None:  # the positive (second) class of two, else the last
            return 1 if len(self.classes) == 2 else len(self.classes) - 1
        if target not in self.classes:
            raise ConfigError(f"--class must be one of {self.classes}, got {target!r}")
        return self.classes.index(target)

    def _grid(
        self, slide: Slide, sampler: GridPatchSampler, xy: np.ndarray, probs: np.ndarray
    ) -> np.ndarray:
        """(C, rows, cols) probabilities on the full tile grid, NaN where no tile was predicted."""
        rows, cols = sampler.grid_shape(slide)
        size0 = sampler.geometry(slide).size0
        step_x, step_y = (sampler.step * s / self.size for s in size0)
        grid = np.full((len(self.classes), rows, cols), np.nan, np.float32)
        r = np.minimum(np.rint(xy[:, 1] / step_y).astype(int), rows - 1)
        c = np.minimum(np.rint(xy[:, 0] / step_x).astype(int), cols - 1)
        grid[:, r, c] = probs.T
        return grid

    def describe(self) -> dict[str, Any]:
        return {"classes": self.classes, "mpp": self.mpp, "patch_size": self.size}
