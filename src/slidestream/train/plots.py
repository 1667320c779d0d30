"""Pictures of training: confusion matrices and loss/metric curves, drawn with Pillow."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["confusion_image", "curves_image"]


def confusion_image(
    matrix: Sequence[Sequence[int]], classes: Sequence[str], cell: int = 56
) -> np.ndarray:
    """A confusion matrix (rows: true, columns: predicted) as an RGB image with counts."""
    m = np.asarray(matrix, dtype=float)
    n = len(classes)
    label_w, top = 110, 40
    img = Image.new("RGB", (label_w + n * cell + 10, top + n * cell + 30), "white")
    draw = ImageDraw.Draw(img)
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    for i in range(n):
        draw.text((4, top + i * cell + cell // 2 - 6), str(classes[i])[:16], fill=(0, 0, 0))
        draw.text((label_w + i * cell + 4, top - 14), str(classes[i])[:8], fill=(0, 0, 0))
        for j in range(n):
            v = rows[i, j]
            color = (int(255 - 200 * v), int(255 - 120 * v), 255)
            x0, y0 = label_w + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 2, y0 + cell - 2], fill=color)
            draw.text(
                (x0 + 6, y0 + cell // 2 - 6),
                f"{int(m[i, j])}",
                fill=(255, 255, 255) if v > 0.6 else (0, 0, 0),
            )
    draw.text((label_w, top + n * cell + 8), "columns: predicted, rows: true", fill=(0, 0, 0))
    return np.asarray(img)


def curves_image(
    series: Mapping[str, Sequence[float]], width: int = 640, height: int = 360
) -> np.ndarray:
    """Line plot of named series over epochs (each scaled to its own range, legend with range)."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 50, width - 170, 20, height - 30
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for k, (name, values) in enumerate(series.items()):
        vals = np.asarray([v for v in values], float)
        ok = np.isfinite(vals)
        if not ok.any():
            continue
        lo, hi = float(vals[ok].min()), float(vals[ok].max())
        span = hi - lo or 1.0
        xs = left + (right - left) * np.arange(len(vals)) / max(1, len(vals) - 1)
        ys = bottom - (bottom - top) * (vals - lo) / span
        pts = [(float(x), float(y)) for x, y, good in zip(xs, ys, ok, strict=True) if good]
        color = colors[k % len(colors)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for p in pts:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        draw.text((right + 10, top + 16 * k), f"{name} [{lo:.3g}, {hi:.3g}]", fill=color)
    draw.text((left, bottom + 8), "epoch", fill=(0, 0, 0))
    return np.asarray(img)
