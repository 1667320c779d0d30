"""The one writer of per-slide prediction outputs: tile table CSV, heatmap NPY and PNG overlay,
GeoJSON (QuPath 'Import objects') and the zoomable viewer page."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np

from slidestream.infer.engine import OutputNames, Scores, TileTable
from slidestream.infer.export import contours_geojson, tiles_geojson, write_geojson
from slidestream.infer.heatmap import heatmap_overlay
from slidestream.infer.viewer import write_viewer
from slidestream.io import Slide

__all__ = ["warn_if_empty", "write_outputs", "write_table"]

log = logging.getLogger(__name__)


def write_outputs(
    out: Path,
    stem: str,
    slide: Slide,
    scores: Scores,
    names: OutputNames,
    threshold: float = 0.5,
    geojson: str = "contours",
    *,
    viewer_mpp: float | None | bool = 0.5,
) -> None:
    """Write ``out/<stem>.<names.table>`` (when the score has a tile table: x, y, w, h in
    level-0 px, then its columns), ``.<names.heatmap>.npy`` (``scores.saved``) and ``.png``
    (heatmap over a 1024 px thumbnail, with legend), ``.<names.geojson>`` (contours of the
    heatmap cells >= ``threshold`` with measurements, or with ``geojson="tiles"`` one square
    per tile whose top probability reaches it) and ``.viewer.html`` with its DeepZoom tile
    pyramid ``<stem>.viewer_files/`` read from the slide down to ``viewer_mpp`` µm/px (None: the
    slide's level 0; a slide without mpp: level 0; ``False``: no viewer). Disk: about 0.3-0.5 MB per
    Mpx of the finest level (JPEG tiles, measured), e.g. 0.1-0.2 GB for a 40k x 40k px slide at
    0.25 µm/px capped to 0.5 µm/px."""
    from PIL import Image

    if scores.table is not None:
        write_table(out / f"{stem}.{names.table}", scores.table)
    heat, cell = scores.heat, scores.cell
    np.save(out / f"{stem}.{names.heatmap}.npy", heat if scores.saved is None else scores.saved)
    w0, h0 = slide.dimensions
    rows, cols = heat.shape
    cover = (cols * cell[0] / w0, rows * cell[1] / h0)
    thumb = slide.thumbnail(1024)
    Image.fromarray(heatmap_overlay(thumb, heat, cover, scores.label)).save(
        out / f"{stem}.{names.heatmap}.png"
    )
    collection = _geojson(slide, scores, threshold, geojson)
    write_geojson(collection, out / f"{stem}.{names.geojson}")
    warn_if_empty(slide.path, scores, collection, threshold)
    if viewer_mpp is False:
        return
    color = {"contour_color": scores.color} if scores.color else {}
    write_viewer(
        out / f"{stem}.viewer.html",
        slide,
        (w0, h0),
        heat,
        cell,
        collection,
        title=f"{stem}: {scores.caption}",
        heat_label=scores.label,
        finest_mpp=viewer_mpp if slide.mpp else None,
        **color,
    )


def _geojson(slide: Slide, scores: Scores, threshold: float, how: str) -> dict[str, Any]:
    table = scores.table
    if how == "tiles" and table is not None:
        return tiles_geojson(table.xy, table.size0, table.probs, table.classes, threshold)
    origin_step = (0.0, 0.0, *scores.cell)
    return contours_geojson(scores.heat, origin_step, scores.name, threshold, mpp=slide.mpp)


def warn_if_empty(path: Any, scores: Scores, collection: dict[str, Any], threshold: float) -> None:
    """Log a warning naming the slide when its heatmap has no predicted cell, or when its
    GeoJSON is empty although the slide is called for what the heatmap shows or ``threshold``
    is above 1 (no probability can reach it). An empty GeoJSON of a slide called negative is the
    right answer and is not warned about."""
    if not np.isfinite(scores.heat).any():
        log.warning("%s: no tile was predicted (no tissue found?): the heatmap is empty", path)
    elif not collection.get("features") and (scores.positive or threshold > 1):
        log.warning(
            "%s: called %s, yet no region reaches %s >= %g: the GeoJSON is empty (lower "
            "--threshold or choose another --class)",
            path,
            scores.call,
            scores.label,
            threshold,
        )


def write_table(path: Path, table: TileTable) -> Path:
    """One CSV row per tile: x, y, w, h (level-0 px), then ``table.columns`` formatted."""
    names = list(table.columns)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y", "w", "h", *names])
        sx, sy = round(table.size0[0], 2), round(table.size0[1], 2)
        for i, (x, y) in enumerate(table.xy):
            values = [format(table.columns[n][0][i], table.columns[n][1]) for n in names]
            w.writerow([int(x), int(y), sx, sy, *values])
    return path
