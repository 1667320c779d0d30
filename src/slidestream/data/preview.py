"""Pictures for auditing patch selection by eye: patch grids and sampled locations on thumbnails."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["patch_grid", "draw_boxes"]


def patch_grid(
    images: Sequence[np.ndarray],
    captions: Sequence[str] | None = None,
    columns: int = 8,
    tile: int = 160,
    pad: int = 4,
) -> np.ndarray:
    """Tile (H, W, 3) uint8 images into one (rows, columns) grid with a caption under each."""
    if not images:
        return np.full((tile, tile, 3), 255, np.uint8)
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    text_h = 12 * (max(c.count("\n") for c in captions) + 1) + 4 if captions else 0
    cell_w, cell_h = tile + pad, tile + text_h + pad
    canvas = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        x0, y0 = pad + c * cell_w, pad + r * cell_h
        canvas.paste(Image.fromarray(img).resize((tile, tile), Image.Resampling.BILINEAR), (x0, y0))
        if captions:
            draw.multiline_text((x0 + 1, y0 + tile + 2), captions[i], fill=(0, 0, 0), spacing=1)
    return np.asarray(canvas)


def draw_boxes(
    image: np.ndarray,
    boxes: Sequence[tuple[float, float, float, float]],
    scale: tuple[float, float],
    color: tuple[int, int, int] = (255, 0, 0),
    width: int = 2,
) -> np.ndarray:
    """Draw level-0 (x, y, w, h) boxes on a thumbnail whose pixels are ``scale`` level-0 px."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    sx, sy = scale
    for x, y, w, h in boxes:
        draw.rectangle([x / sx, y / sy, (x + w) / sx, (y + h) / sy], outline=color, width=width)
    return np.asarray(canvas)
