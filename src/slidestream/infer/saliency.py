"""Whole-slide prediction with a streamed slide classifier, and a saliency heatmap.

:class:`StreamingPredictor` (an adapter of :class:`~slidestream.infer.engine.Predictor`) reads
the slide whole at the model's mpp (background outside the tissue mask made white, as in
training), classifies it through the streaming forward pass, and streams the gradient of the
predicted class's logit with respect to the input back tile by tile. Gradient × input, summed
over colour channels, smoothed and scaled to [0, 1], is the heatmap (written like the patch
model's: ``<stem>.heatmap.npy`` (1, rows, cols), ``.heatmap.png``, ``.geojson`` contours,
``.viewer.html``; there is no tile table).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from slidestream.colors import hex_color
from slidestream.data.functional import resolve_device
from slidestream.errors import ConfigError
from slidestream.infer.engine import Layout, Predictor, Scores
from slidestream.io import Slide
from slidestream.models.slide import build_slide_model, predictions, slide_spec

__all__ = ["StreamingPredictor"]


class StreamingPredictor(Predictor):
    """A ``kind="streaming"`` checkpoint ready to predict whole slides; heatmap cells of
    ``heatmap_downsample`` model pixels (default: about 128 cells across), saliency smoothed
    by a Gaussian of ``2 * smooth_px`` model pixels."""

    kind = "streaming"

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        *,
        state: dict[str, Any] | None = None,
        device: str = "auto",
        heatmap_downsample: int | None = None,
        smooth_px: float = 2.0,
    ) -> None:
        super().__init__(checkpoint, state=state)
        self.cfg = slide_spec(self.ckpt)
        self.mpp = self.ckpt.get("mpp")
        if not self.mpp:
            raise ConfigError(f"{checkpoint} records no mpp; retrain with prepared slides")
        self.device = resolve_device(device)
        model = build_slide_model(self.cfg)
        self.model = self.fit_weights(model, self.cfg.name).to(self.device).eval()
        self.downsample, self.smooth_px = heatmap_downsample, smooth_px

    def image(self, slide: Slide, layout: Layout) -> np.ndarray:
        """(H, W, 3) uint8: the whole slide at the model's mpp, background outside the tissue
        mask white. Raises MissingMppError when the slide has no mpp."""
        from PIL import Image

        mpp_x, mpp_y = slide.require_mpp()
        w0, h0 = slide.dimensions
        w, h = max(1, round(w0 * mpp_x / self.mpp)), max(1, round(h0 * mpp_y / self.mpp))
        pixels = slide.read(0, 0, w, h, mpp=self.mpp)
        tissue = Image.fromarray(layout.mask.mask).resize((w, h), Image.Resampling.NEAREST)
        return np.where(np.asarray(tissue)[..., None], pixels, np.uint8(255))

    def score(self, slide: Slide, layout: Layout, target: str | None, **_: Any) -> Scores:
        """The call and the saliency of ``target`` (default: the predicted class)."""
        pixels = self.image(slide, layout)
        x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].float()
        x = x.to(self.device).requires_grad_(True)
        logits = self.model(x)
        probs = predictions(self.cfg.task, logits.detach())[0].cpu().numpy()
        k = self._target(target, probs)
        logits[0, min(k, logits.shape[1] - 1)].backward()
        grid, d = self._saliency(x, pixels)
        (h, w), (w0, h0) = pixels.shape[:2], slide.dimensions
        regression = self.cfg.task == "regression"
        call = self.classes[k] if not regression else f"{float(probs[0]):.4g}"
        return Scores(
            call=call,
            probs=[float(p) for p in probs],
            tiles=1,
            heat=grid,
            cell=(d * w0 / w, d * h0 / h),  # level-0 px per heatmap cell
            label="saliency",
            name=f"salient:{self.classes[k]}",
            caption=f"saliency for {self.classes[k]}",
            heatmap_class=self.classes[k],
            positive=True,  # the saliency of the class called (or asked for) is drawn
            saved=grid[None],
            color=hex_color(self.classes[k]),
        )

    def _saliency(self, x: torch.Tensor, pixels: np.ndarray) -> tuple[np.ndarray, int]:
        """(rows, cols) float32 gradient × input in [0, 1] over tissue (NaN on background),
        in cells of ``d`` model pixels; and ``d``."""
        from scipy import ndimage

        sal = (x.grad[0] * x.detach()[0]).sum(0).abs().cpu().numpy()
        sal = ndimage.gaussian_filter(sal, self.smooth_px * 2)
        h, w = sal.shape
        d = self.downsample or max(1, round(max(h, w) / 128))
        grid = sal[: h // d * d, : w // d * d].reshape(h // d, d, w // d, d).mean((1, 3))
        # background cells out first, so the scale is set by the tissue (max 1 over tissue)
        grid = np.where(pixels[: h // d * d : d, : w // d * d : d].min(-1) < 250, grid, np.nan)
        peak = np.nanmax(grid) if np.isfinite(grid).any() else 0.0
        return (grid / peak if peak > 0 else grid).astype(np.float32), d

    def _target(self, target: str | None, probs: np.ndarray) -> int:
        if target is None or self.cfg.task == "regression":
            return int(np.argmax(probs)) if self.cfg.task != "regression" else 0
        return self.target_index(target)
