"""Heatmaps: per-tile probabilities as arrays, and coloured overlays with a legend."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["colormap", "heatmap_overlay"]

# anchors of a perceptually ordered blue→green→yellow→red map (0 → 1)
_ANCHORS = np.array(
    [
        [48, 18, 59],
        [40, 110, 235],
        [25, 200, 160],
        [150, 240, 60],
        [250, 190, 40],
        [220, 60, 20],
        [122, 4, 3],
    ],
    float,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (NaN allowed) to (..., 3) uint8 RGB; NaN becomes 0."""
    v = np.clip(np.nan_to_num(np.asarray(values, float), nan=0.0), 0.0, 1.0)
    pos = v * (len(_ANCHORS) - 1)
    i = np.minimum(pos.astype(int), len(_ANCHORS) - 2)
    t = (pos - i)[..., None]
    return ((1 - t) * _ANCHORS[i] + t * _ANCHORS[i + 1]).round().astype(np.uint8)


def heatmap_overlay(
    thumbnail: np.ndarray,
    grid: np.ndarray,
    coverage: tuple[float, float],
    title: str = "",
    alpha: float = 0.7,
) -> np.ndarray:
    """Overlay ``grid`` (rows, cols) of probabilities in [0, 1] (NaN = not predicted) on a
    thumbnail. ``coverage`` is the fraction of the thumbnail's (width, height) the grid spans
    (tiles may stop short of the slide's right and bottom edges). A legend bar is added."""
    h, w = thumbnail.shape[:2]
    gw, gh = max(1, round(w * coverage[0])), max(1, round(h * coverage[1]))
    color = Image.fromarray(colormap(grid)).resize((gw, gh), Image.Resampling.NEAREST)
    # opacity grows with the probability, so low-probability tissue stays visible
    opacity = np.where(np.isfinite(grid), (0.35 + 0.65 * np.nan_to_num(grid)) * alpha * 255, 0)
    known = Image.fromarray(opacity.astype(np.uint8)).resize((gw, gh), Image.Resampling.NEAREST)
    out = Image.fromarray(thumbnail).convert("RGB")
    out.paste(color, (0, 0), known)
    # a legend that reads at report size: a bar over 60% of the height, ticks 0 / 0.5 / 1
    font = ImageFont.load_default(size=max(16, h // 36))
    legend_w = max(120, w // 7)
    canvas = Image.new("RGB", (w + legend_w, max(h, 200)), "white")
    canvas.paste(out, (0, 0))
    draw = ImageDraw.Draw(canvas)
    top, bar_h, bar_w = 30, max(100, int(0.6 * h)), max(18, legend_w // 6)
    x0 = w + 12
    for k in range(bar_h):
        c = tuple(int(x) for x in colormap(np.array(1 - k / max(1, bar_h - 1))))
        draw.line([(x0, top + k), (x0 + bar_w, top + k)], fill=c)
    draw.rectangle([x0, top, x0 + bar_w, top + bar_h - 1], outline=(0, 0, 0))
    for value in (1.0, 0.5, 0.0):
        y = top + (1 - value) * (bar_h - 1)
        draw.line([(x0 + bar_w, y), (x0 + bar_w + 5, y)], fill=(0, 0, 0))
        draw.text((x0 + bar_w + 8, y), f"{value:.1f}", fill=(0, 0, 0), font=font, anchor="lm")
    if title:
        draw.text((x0, top + bar_h + 10), title[:24], fill=(0, 0, 0), font=font)
    return np.asarray(canvas)
