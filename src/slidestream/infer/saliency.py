"""Whole-slide prediction with a streamed slide classifier, and a saliency heatmap.

The slide is read whole at the model's mpp (background outside the tissue mask made white, as in
training), classified through the streaming forward pass, and the gradient of the predicted
class's logit with respect to the input is streamed back tile by tile. Gradient × input, summed
over colour channels, smoothed and scaled to [0, 1], is the heatmap (written like the patch
model's: NPY, PNG over the thumbnail, GeoJSON contours).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from slidestream.colors import hex_color
from slidestream.data.functional import resolve_device
from slidestream.errors import ConfigError
from slidestream.infer.export import contours_geojson, write_geojson
from slidestream.infer.heatmap import heatmap_overlay
from slidestream.infer.predict import SlidePrediction, warn_if_empty
from slidestream.infer.viewer import write_viewer
from slidestream.io import open_slide
from slidestream.models.checkpoint import load_checkpoint
from slidestream.models.slide import load_slide_model, predictions
from slidestream.tissue import detect_tissue

__all__ = ["StreamingPredictor"]


class StreamingPredictor:
    """A ``kind="streaming"`` checkpoint ready to predict whole slides."""

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        *,
        device: str = "auto",
        heatmap_downsample: int | None = None,
        smooth_px: float = 2.0,
    ) -> None:
        ckpt = load_checkpoint(checkpoint)
        self.model, self.cfg = load_slide_model(ckpt)
        self.classes = list(ckpt["classes"]) or ["value"]
        self.mpp = ckpt.get("mpp")
        if not self.mpp:
            raise ConfigError(f"{checkpoint} records no mpp; retrain with prepared slides")
        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        # heatmap cells of ``heatmap_downsample`` model pixels (default: about 128 cells across)
        self.downsample, self.smooth_px = heatmap_downsample, smooth_px

    def image(
        self, path: str | os.PathLike[str], backend: str = "auto", slide_mpp: float | None = None
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """The whole slide at the model's mpp, background white; and the slide's level-0 size."""
        from PIL import Image

        with open_slide(path, backend=backend, mpp=slide_mpp) as slide:
            mpp_x, mpp_y = slide.require_mpp()
            w0, h0 = slide.dimensions
            w, h = max(1, round(w0 * mpp_x / self.mpp)), max(1, round(h0 * mpp_y / self.mpp))
            pixels = slide.read(0, 0, w, h, mpp=self.mpp)
            mask = detect_tissue(slide).mask
        tissue = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))
        return np.where(tissue[..., None], pixels, np.uint8(255)), (w0, h0)

    def predict(
        self,
        path: str | os.PathLike[str],
        out_dir: str | os.PathLike[str],
        *,
        backend: str = "auto",
        slide_mpp: float | None = None,
        threshold: float = 0.5,
        target: str | None = None,
        stem: str | None = None,
    ) -> SlidePrediction:
        """Predict one slide; outputs are named ``<stem>.*`` (the slide's file stem unless
        given)."""
        from PIL import Image
        from scipy import ndimage

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        pixels, (w0, h0) = self.image(path, backend, slide_mpp)
        x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].float()
        x = x.to(self.device).requires_grad_(True)
        logits = self.model(x)
        probs = predictions(self.cfg.task, logits.detach())[0].cpu().numpy()
        k = self._target(target, probs)
        logits[0, min(k, logits.shape[1] - 1)].backward()
        sal = (x.grad[0] * x.detach()[0]).sum(0).abs().cpu().numpy()
        sal = ndimage.gaussian_filter(sal, self.smooth_px * 2)
        h, w = sal.shape
        d = self.downsample or max(1, round(max(h, w) / 128))
        grid = sal[: h // d * d, : w // d * d].reshape(h // d, d, w // d, d).mean((1, 3))
        # background cells out first, so the scale is set by the tissue (max 1 over tissue)
        grid = np.where(pixels[: h // d * d : d, : w // d * d : d].min(-1) < 250, grid, np.nan)
        peak = np.nanmax(grid) if np.isfinite(grid).any() else 0.0
        grid = grid / peak if peak > 0 else grid
        stem = stem or Path(path).stem
        np.save(out / f"{stem}.heatmap.npy", grid.astype(np.float32)[None])
        with open_slide(path, backend=backend, mpp=slide_mpp) as slide:
            thumb = slide.thumbnail(1024)
        cover = (grid.shape[1] * d / w, grid.shape[0] * d / h)
        Image.fromarray(heatmap_overlay(thumb, grid, cover, "saliency")).save(
            out / f"{stem}.heatmap.png"
        )
        step = (d * w0 / w, d * h0 / h)  # level-0 px per heatmap cell
        collection = contours_geojson(
            grid, (0.0, 0.0, *step), f"salient:{self.classes[k]}", threshold
        )
        write_geojson(collection, out / f"{stem}.geojson")
        warn_if_empty(path, grid, collection, f"salient:{self.classes[k]}", threshold)
        title = f"{stem}: saliency for {self.classes[k]}"
        write_viewer(
            out / f"{stem}.viewer.html",
            thumb,
            (w0, h0),
            grid,
            step,
            collection,
            title=title,
            heat_label="saliency",
            contour_color=hex_color(self.classes[k]),
        )
        call = self.classes[k] if self.cfg.task != "regression" else f"{float(probs[0]):.4g}"
        return SlidePrediction(
            str(path), call, [float(p) for p in probs], 1, 0, stem, self.classes[k]
        )

    def _target(self, target: str | None, probs: np.ndarray) -> int:
        if target is None or self.cfg.task == "regression":
            return int(np.argmax(probs)) if self.cfg.task != "regression" else 0
        if target not in self.classes:
            raise ConfigError(f"--class must be one of {self.classes}, got {target!r}")
        return self.classes.index(target)
