"""Slide prediction and attention heatmaps with a ``train-mil`` checkpoint.

:class:`MILPredictor` reads a slide's feature file (``features_dir``, from ``slidestream
features``) or computes the features with the checkpoint's encoder settings (refusing when the
encoder's weights differ from the ones the training features came from), runs the MIL model and
writes, per slide: ``<stem>.attention.csv`` (x, y, w, h in level-0 px, attention, relative
attention), ``<stem>.attention.npy`` (rows, cols) and ``.attention.png`` (relative attention =
attention / its maximum, on the patch grid, NaN outside tissue) and ``<stem>.attention.geojson``
(outlines of relative attention >= threshold, or one square per patch with ``geojson="tiles"``).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidestream.data.feature_folder import FeatureFolder, check_settings, settings_of
from slidestream.data.features import read_features
from slidestream.data.functional import resolve_device
from slidestream.errors import ConfigError
from slidestream.infer.export import contours_geojson, tiles_geojson, write_geojson
from slidestream.infer.heatmap import heatmap_overlay
from slidestream.infer.predict import SlidePrediction, warn_if_empty
from slidestream.infer.viewer import write_viewer
from slidestream.io import Slide, open_slide
from slidestream.models.checkpoint import load_checkpoint
from slidestream.models.mil import load_mil_model
from slidestream.models.slide import predictions
from slidestream.sampling import GridPatchSampler

__all__ = ["MILPredictor", "attention_grid"]

log = logging.getLogger(__name__)


def attention_grid(
    slide: Slide, sampler: GridPatchSampler, xy: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """(rows, cols) float32 of per-patch ``values`` on the sampler's full grid (NaN elsewhere)."""
    rows, cols = sampler.grid_shape(slide)
    step_x, step_y = (sampler.step * s / sampler.size for s in sampler.geometry(slide).size0)
    grid = np.full((rows, cols), np.nan, np.float32)
    r = np.minimum(np.rint(xy[:, 1] / step_y).astype(int), rows - 1)
    c = np.minimum(np.rint(xy[:, 0] / step_x).astype(int), cols - 1)
    grid[r, c] = values
    return grid


class MILPredictor:
    """A MIL checkpoint ready to predict slides and map its attention onto them."""

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        *,
        features_dir: str | os.PathLike[str] | None = None,
        device: str = "auto",
        batch_size: int = 64,
        workers: int = 2,
    ) -> None:
        ckpt = load_checkpoint(checkpoint)
        self.model, self.spec = load_mil_model(ckpt)
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.classes: list[str] = list(ckpt["classes"]) or ["value"]
        self.feat: dict[str, Any] = dict(ckpt.get("features") or {})
        self.features_dir = Path(features_dir) if features_dir else None
        self.batch_size, self.workers = batch_size, workers
        self._extractor: Any = None
        self._folder: FeatureFolder | None = None

    def _compute(self, path: Path, slide_mpp: float | None, backend: str) -> tuple:
        from slidestream.infer.features import FeatureExtractor

        f = self.feat
        if self._extractor is None:
            weights = None if f.get("weights") in (None, "none") else f["weights"]
            self._extractor = FeatureExtractor(
                f["encoder"],
                weights=weights,
                mpp=f.get("mpp") or None,
                size=int(f["size"]),
                min_tissue=float(f.get("min_tissue", 0.5)),
                batch_size=self.batch_size,
                workers=self.workers,
                device=str(self.device),
                backend=backend,
            )
            mine, theirs = self._extractor.attrs["weights_hash"], f.get("weights_hash")
            if theirs and mine != theirs:
                raise ConfigError(
                    f"the encoder {f['encoder']} here has weights {mine}, the training features "
                    f"{theirs}; pass --features DIR with the slides' feature files"
                )
        slide = open_slide(path, backend=backend, mpp=slide_mpp)
        from slidestream.tissue import detect_tissue

        mask = detect_tissue(slide, cache_dir=None)
        xy = self._extractor.sampler.locations(slide, mask)[:, :2].astype(np.int64)
        return self._extractor.encode(slide, xy), xy, slide

    def features(self, path: Path, slide_mpp: float | None, backend: str) -> tuple:
        """(features (N, D) float32, coords (N, 2) level-0 px, open slide) of one slide."""
        stored = None
        if self.features_dir is not None:
            if self._folder is None:
                self._folder = FeatureFolder(self.features_dir)
            stored, _ = self._folder.find(path)
        if stored is not None:
            feats, xy, attrs = read_features(stored)
            check_settings(
                [stored],
                [settings_of(attrs, feats.shape[1] if len(feats) else None)],
                settings_of(self.feat, self.spec.in_dim),
                against="features the model was trained on",
            )
            return (
                np.asarray(feats, np.float32),
                xy,
                open_slide(path, backend=backend, mpp=slide_mpp),
            )
        return self._compute(path, slide_mpp, backend)

    @torch.no_grad()
    def predict(
        self,
        path: str | os.PathLike[str],
        out_dir: str | os.PathLike[str],
        *,
        backend: str = "auto",
        slide_mpp: float | None = None,
        threshold: float = 0.5,
        geojson: str = "contours",
        target: str | None = None,
        stem: str | None = None,
        **_: Any,
    ) -> SlidePrediction:
        """Predict one slide and write its attention CSV, heatmap NPY/PNG, GeoJSON and viewer
        page, named ``<stem>.attention.*`` / ``<stem>.viewer.html`` (``stem``: the slide's file
        stem unless given)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = Path(path)
        feats, xy, slide = self.features(path, slide_mpp, backend)
        stem = stem or path.stem
        if len(feats) == 0:
            nan = [float("nan")] * len(self.classes)
            return SlidePrediction(str(path), "no tissue", nan, 0, 0, stem, "attention")
        logits, att = self.model.forward_attention(torch.from_numpy(feats).to(self.device))
        probs = predictions(self.spec.task, logits).cpu().numpy()[0]
        att = att.cpu().numpy()
        rel = att / max(float(att.max()), 1e-12)
        self._write(path, stem, out, slide, xy, att, rel, threshold, geojson)
        if self.spec.task == "regression":
            call = f"{probs[0]:.4g}"
        elif self.spec.task == "multilabel":
            call = ";".join(c for c, p in zip(self.classes, probs, strict=True) if p >= 0.5)
        else:
            call = self.classes[int(np.argmax(probs))]
        return SlidePrediction(
            str(path), call, [float(p) for p in probs], len(feats), 0, stem, "attention"
        )

    def _write(
        self,
        path: Path,
        stem: str,
        out: Path,
        slide: Slide,
        xy: np.ndarray,
        att: np.ndarray,
        rel: np.ndarray,
        threshold: float,
        geojson: str,
    ) -> None:
        from PIL import Image

        f = self.feat
        sampler = GridPatchSampler(int(f["size"]), f.get("mpp") or None, min_tissue=0.0)
        size0 = sampler.geometry(slide).size0
        with open(out / f"{stem}.attention.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["x", "y", "w", "h", "attention", "relative_attention"])
            for (x, y), a, r in zip(xy, att, rel, strict=True):
                w.writerow(
                    [int(x), int(y), round(size0[0], 2), round(size0[1], 2), f"{a:.6g}", f"{r:.5f}"]
                )
        grid = attention_grid(slide, sampler, xy, rel)
        np.save(out / f"{stem}.attention.npy", grid)
        rows, cols = grid.shape
        step = tuple(sampler.step * s / sampler.size for s in size0)
        w0, h0 = slide.dimensions
        cover = (cols * step[0] / w0, rows * step[1] / h0)
        thumb = slide.thumbnail(1024)
        Image.fromarray(heatmap_overlay(thumb, grid, cover, "attention")).save(
            out / f"{stem}.attention.png"
        )
        collection = (
            tiles_geojson(xy, size0, rel[:, None], ["attention"], threshold)
            if geojson == "tiles"
            else contours_geojson(grid, (0.0, 0.0, *step), "attention", threshold)
        )
        write_geojson(collection, out / f"{stem}.attention.geojson")
        warn_if_empty(path, grid, collection, "attention", threshold)
        write_viewer(
            out / f"{stem}.viewer.html",
            thumb,
            (w0, h0),
            grid,
            step,
            collection,
            title=f"{stem}: MIL attention",
            heat_label="attention / max",
        )
