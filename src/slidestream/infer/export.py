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
    *,
    mpp: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """The union of the grid cells whose value is >= ``threshold``, one Polygon feature per
    connected region (holes kept; cells touching only at a corner are separate regions).

    ``grid`` is (rows, cols) of probabilities, NaN where no tile was predicted: such cells are
    never inside a contour, whatever the threshold (0 included); ``origin_step`` is
    (x0, y0, step_x, step_y) in level-0 px: cell (r, c) covers
    [x0 + c*step_x, x0 + (c+1)*step_x) x [y0 + r*step_y, ...), so the polygons' area is exactly
    the cells' area. Each feature's properties: ``tiles`` (cells inside), ``probability`` and
    ``max_probability`` (their mean and max), ``area_px`` (level-0 px²), ``area_um2`` (µm², with
    ``mpp`` = (x, y) µm/px only), the same values under ``measurements`` (the map QuPath reads
    as an object's measurements), and a QuPath ``classification`` named ``name`` with its colour
    (:func:`slidestream.colors.class_color`). Raises ConfigError for a NaN threshold.
    """
    import shapely

    if not np.isfinite(threshold):
        raise ConfigError(f"contour threshold must be a number, got {threshold}")
    x0, y0, step_x, step_y = origin_step
    grid = np.asarray(grid, np.float64)
    above = np.isfinite(grid) & (np.nan_to_num(grid, nan=-np.inf) >= threshold)
    if not above.any():
        return {"type": "FeatureCollection", "features": []}
    rr, c0, c1 = _row_runs(above)  # one box per horizontal run of cells: fewer to merge
    boxes = shapely.box(
        x0 + c0 * step_x, y0 + rr * step_y, x0 + c1 * step_x, y0 + (rr + 1) * step_y
    )
    merged = shapely.simplify(shapely.union_all(boxes), 0)  # drops collinear vertices
    polys = list(getattr(merged, "geoms", [merged]))
    cells_r, cells_c = np.nonzero(above)
    centres = shapely.points(x0 + (cells_c + 0.5) * step_x, y0 + (cells_r + 0.5) * step_y)
    poly_i, cell_i = shapely.STRtree(centres).query(polys, predicate="contains")
    values = grid[cells_r, cells_c]
    feats = []
    for i, poly in enumerate(polys):
        inside = values[cell_i[poly_i == i]]
        props = _measurements(poly.area, inside, mpp)
        feats.append(_feature(_rings(poly), name, props))
    return {"type": "FeatureCollection", "features": feats}


def _row_runs(above: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, first col, last col + 1) of each horizontal run of True cells."""
    edges = np.diff(np.pad(above.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    r_start, c_start = np.nonzero(edges == 1)
    _, c_stop = np.nonzero(edges == -1)  # row-major order: stops pair with starts
    return r_start, c_start, c_stop


def _measurements(area_px: float, values: np.ndarray, mpp: tuple[float, float] | None) -> dict:
    """A region's properties: cell count, mean/max value, area in level-0 px² (and µm²)."""
    m: dict[str, Any] = {
        "tiles": int(len(values)),
        "probability": float(values.mean()),
        "max_probability": float(values.max()),
        "area_px": float(area_px),
    }
    if mpp is not None:
        m["area_um2"] = float(area_px * mpp[0] * mpp[1])
    return {**m, "measurements": dict(m)}


def _rings(poly: Any) -> list[list[list[float]]]:
    """GeoJSON rings of a shapely Polygon: exterior counter-clockwise, holes clockwise."""
    from shapely.geometry.polygon import orient

    poly = orient(poly, sign=1.0)
    rings = [poly.exterior, *poly.interiors]
    return [[[float(x), float(y)] for x, y in ring.coords] for ring in rings]


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
