"""Exports: QuPath-compatible GeoJSON of tiles or merged contours, and per-tile CSV."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slidestream.colors import class_color
from slidestream.errors import ConfigError

__all__ = ["tiles_geojson", "contours_geojson", "write_geojson", "write_tiles_csv"]


def _feature(rings: list[list[list[float]]], name: str, props: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": rings},
        "properties": {
            "objectType": "annotation",
            "isLocked": False,
            "classification": {"name": name, "color": list(class_color(name))},
            **props,
        },
    }


def tiles_geojson(
    xy: np.ndarray,
    size0: tuple[float, float],
    probs: np.ndarray,
    classes: Sequence[str],
    threshold: float | None = None,
) -> dict[str, Any]:
    """One square polygon per tile (level-0 px), classed by its most probable class; with
    ``threshold``, only tiles whose top probability reaches it."""
    sx, sy = size0
    feats = []
    for (x, y), p in zip(xy, probs, strict=True):
        k = int(np.argmax(p))
        if threshold is not None and p[k] < threshold:
            continue
        ring = [[x, y], [x + sx, y], [x + sx, y + sy], [x, y + sy], [x, y]]
        feats.append(
            _feature(
                [[[float(a), float(b)] for a, b in ring]],
                classes[k],
                {
                    "probability": float(p[k]),
                    **{f"p_{c}": float(q) for c, q in zip(classes, p, strict=True)},
                },
            )
        )
    return {"type": "FeatureCollection", "features": feats}


def contours_geojson(
    grid: np.ndarray,
    origin_step: tuple[float, float, float, float],
    name: str,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Merged outlines (with holes) of grid cells whose probability is >= ``threshold``.

    ``grid`` is (rows, cols) of probabilities, NaN where no tile was predicted: such cells are
    never inside a contour, whatever the threshold (0 included); ``origin_step`` is
    (x0, y0, step_x, step_y) in level-0 pixels: cell (r, c) covers
    [x0 + c*step_x, x0 + (c+1)*step_x) x [y0 + r*step_y, ...). Each feature's ``tiles`` counts
    the predicted cells inside it (holes, and islands within holes, excluded) and
    ``probability`` is their mean. The QuPath colour follows ``name``
    (:func:`slidestream.colors.class_color`).
    """
    from skimage.measure import find_contours, points_in_poly

    if not np.isfinite(threshold):
        raise ConfigError(f"contour threshold must be a number, got {threshold}")
    x0, y0, step_x, step_y = origin_step
    grid = np.asarray(grid, np.float64)
    above = np.isfinite(grid) & (np.nan_to_num(grid, nan=-np.inf) >= threshold)
    padded = np.pad(above.astype(float), 1)
    # with 'high' orientation, outer boundaries and holes wind in opposite directions: the
    # shoelace area (x = col, y = row) is negative for outer rings, positive for holes
    rings = [c - 1 for c in find_contours(padded, 0.5, positive_orientation="high")]
    outer, holes = [], []
    for ring in rings:
        area = 0.5 * np.sum(ring[:-1, 1] * ring[1:, 0] - ring[1:, 1] * ring[:-1, 0])
        (outer if area < 0 else holes).append(ring)
    feats = []
    for ring in outer:
        inside = [h for h in holes if points_in_poly(h[:1, ::-1], ring[:, ::-1])[0]]
        # a hole of an island nested in this ring's hole lies inside both: keep the direct ones
        inside = [h for h in inside if not _nested_in_other(h, inside, outer, ring)]
        cells = _cells_in(ring, inside, above)
        prob = float(grid[cells].mean()) if cells.any() else 0.0
        coords = [_to_level0(r, x0, y0, step_x, step_y) for r in [ring, *inside]]
        feats.append(_feature(coords, name, {"probability": prob, "tiles": int(cells.sum())}))
    return {"type": "FeatureCollection", "features": feats}


def _inside(points: np.ndarray, ring: np.ndarray) -> np.ndarray:
    from skimage.measure import points_in_poly

    return points_in_poly(points, ring[:, ::-1])


def _nested_in_other(
    hole: np.ndarray, holes: list[np.ndarray], outer: list[np.ndarray], ring: np.ndarray
) -> bool:
    """True when ``hole`` lies inside an island (another outer ring) that itself lies in one of
    ``holes``: it belongs to that island, not to ``ring``."""
    p = hole[:1, ::-1]
    for island in outer:
        if island is ring or not _inside(p, island)[0]:
            continue
        if any(_inside(island[:1, ::-1], h)[0] for h in holes if h is not hole):
            return True
    return False


def _cells_in(ring: np.ndarray, holes: list[np.ndarray], above: np.ndarray) -> np.ndarray:
    """Cells of ``above`` inside ``ring`` and outside all of ``holes``."""
    rr, cc = np.nonzero(above)
    pts = np.stack([cc, rr], 1).astype(float)
    keep = _inside(pts, ring)
    for hole in holes:
        keep &= ~_inside(pts, hole)
    out = np.zeros_like(above)
    out[rr[keep], cc[keep]] = True
    return out


def _to_level0(ring: np.ndarray, x0: float, y0: float, sx: float, sy: float) -> list[list[float]]:
    # contour vertices sit on cell centres' half-way lines; +0.5 maps them to cell edges
    pts = [[float(x0 + (c + 0.5) * sx), float(y0 + (r + 0.5) * sy)] for r, c in ring]
    if pts[0] != pts[-1]:
        pts.append(pts[0])
    return pts


def write_geojson(collection: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(collection))
    os.replace(tmp, path)
    return path


def write_tiles_csv(
    path: str | os.PathLike[str],
    xy: np.ndarray,
    size0: tuple[float, float],
    tissue: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
) -> Path:
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y", "w", "h", "tissue_fraction", *[f"p_{c}" for c in classes]])
        for (x, y), t, p in zip(xy, tissue, probs, strict=True):
            w.writerow(
                [
                    int(x),
                    int(y),
                    round(size0[0], 2),
                    round(size0[1], 2),
                    round(float(t), 4),
                    *[f"{q:.5f}" for q in p],
                ]
            )
    return path
