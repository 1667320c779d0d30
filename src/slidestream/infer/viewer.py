"""A zoomable slide viewer: one standalone, offline HTML page per predicted slide.

Built with bokeh (its JavaScript is inlined in the page, so the file works without a network
or a server): the slide image, the prediction heatmap on top (show/hide, opacity slider, colour
bar) and the GeoJSON contours (show/hide). Pan with the mouse, zoom with the wheel. All
coordinates are level-0 px of the slide, y growing downwards as in QuPath.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from slidestream.infer.heatmap import colormap

__all__ = ["write_viewer"]

MAX_SIDE = 4096  # px of the slide image in the page (longer side)


def _rgba(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3|4) uint8 → (H, W) uint32 view for bokeh's image_rgba."""
    if pixels.shape[2] == 3:
        pixels = np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), 255, np.uint8)], 2)
    return np.ascontiguousarray(pixels).view(np.uint32)[..., 0]


def _heat_rgba(grid: np.ndarray) -> np.ndarray:
    """Heatmap cells as RGBA: the colour map where predicted, transparent where not."""
    rgb = colormap(grid)
    alpha = np.where(np.isfinite(grid), 255, 0).astype(np.uint8)[..., None]
    return _rgba(np.concatenate([rgb, alpha], 2))


def _polygons(geojson: dict[str, Any] | None) -> dict[str, list]:
    """Contours of a FeatureCollection as bokeh multi_polygons columns (holes kept)."""
    xs, ys, names = [], [], []
    for feat in (geojson or {}).get("features", []):
        geom = feat.get("geometry") or {}
        parts = {"Polygon": [geom.get("coordinates")], "MultiPolygon": geom.get("coordinates")}
        for poly in parts.get(geom.get("type")) or []:
            if not poly:
                continue
            xs.append([[[float(p[0]) for p in ring] for ring in poly]])
            ys.append([[[float(p[1]) for p in ring] for ring in poly]])
            cls = (feat.get("properties") or {}).get("classification") or {}
            names.append(str(cls.get("name", feat.get("properties", {}).get("name", ""))))
    return {"xs": xs, "ys": ys, "name": names}


def write_viewer(
    path: str | os.PathLike[str],
    thumbnail: np.ndarray,
    slide_size: tuple[int, int],
    grid: np.ndarray | None = None,
    cell: tuple[float, float] | None = None,
    geojson: dict[str, Any] | None = None,
    *,
    title: str = "",
    heat_label: str = "probability",
    contour_color: str = "#00e5ff",
) -> Path:
    """Write a standalone viewer page and return its path.

    Args:
        path: the HTML file to write.
        thumbnail: (H, W, 3) uint8 image of the whole slide (downscaled to at most
            :data:`MAX_SIDE` px here).
        slide_size: (w, h) level-0 px of the slide.
        grid: (rows, cols) float heatmap in [0, 1], NaN where nothing was predicted.
        cell: (w, h) level-0 px of one heatmap cell; cell (r, c) covers
            ``[c·w, (c+1)·w) × [r·h, (r+1)·h)``.
        geojson: a FeatureCollection in level-0 px (Polygon/MultiPolygon features drawn).
        title: page and plot title (escaped by bokeh); ``heat_label``: colour bar title.
    """
    from bokeh.embed import file_html
    from bokeh.layouts import column, row
    from bokeh.models import Checkbox, ColorBar, CustomJS, LinearColorMapper, Slider
    from bokeh.plotting import figure
    from bokeh.resources import INLINE
    from PIL import Image

    w0, h0 = slide_size
    thumb = Image.fromarray(thumbnail)
    if max(thumb.size) > MAX_SIDE:
        thumb.thumbnail((MAX_SIDE, MAX_SIDE))
    fig = figure(
        title=title,
        x_range=(0, w0),
        y_range=(h0, 0),  # flipped: y grows downwards, row 0 of an image at the top
        match_aspect=True,
        tools="pan,wheel_zoom,box_zoom,reset,save",
        active_scroll="wheel_zoom",
        sizing_mode="stretch_both",
        min_height=400,
        x_axis_label="x (level-0 px)",
        y_axis_label="y (level-0 px)",
    )
    fig.image_rgba(
        image=[_rgba(np.asarray(thumb.convert("RGB")))], x=0, y=0, dw=w0, dh=h0, name="slide"
    )
    controls = []
    if grid is not None and cell is not None:
        rows_, cols = grid.shape
        heat = fig.image_rgba(
            image=[_heat_rgba(grid)],
            x=0,
            y=0,
            dw=cols * cell[0],
            dh=rows_ * cell[1],
            global_alpha=0.5,
            name="heatmap",
        )
        palette = [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in colormap(np.linspace(0, 1, 256))]
        bar = ColorBar(
            color_mapper=LinearColorMapper(palette=palette, low=0, high=1),
            title=heat_label,
            width=14,
            major_label_text_font_size="12pt",
        )
        fig.add_layout(bar, "right")
        opacity = Slider(start=0, end=1, step=0.05, value=0.5, title="heatmap opacity")
        opacity.js_on_change(
            "value", CustomJS(args={"r": heat}, code="r.glyph.global_alpha = cb_obj.value")
        )
        shown = Checkbox(label="heatmap", active=True)
        shown.js_on_change("active", CustomJS(args={"r": heat}, code="r.visible = cb_obj.active"))
        controls += [shown, opacity]
    polys = _polygons(geojson)
    if polys["xs"]:
        outline = fig.multi_polygons(
            xs=polys["xs"],
            ys=polys["ys"],
            fill_alpha=0.0,
            line_color=contour_color,
            line_width=2,
            name="contours",
        )
        shown = Checkbox(label=f"contours ({len(polys['xs'])})", active=True)
        shown.js_on_change(
            "active", CustomJS(args={"r": outline}, code="r.visible = cb_obj.active")
        )
        controls.append(shown)
    page = column(row(*controls), fig, sizing_mode="stretch_both") if controls else fig
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(file_html(page, resources=INLINE, title=title or "slide"), encoding="utf-8")
    return out
