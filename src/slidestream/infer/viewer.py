"""A slide viewer that zooms to cell level: one offline HTML page per predicted slide.

The page shows a DeepZoom pyramid of the slide (written beside it by
:func:`~slidestream.infer.deepzoom.write_deepzoom`, full resolution by default) in OpenSeadragon
(vendored, BSD-3, inlined into the page), with the prediction heatmap as a second,
semi-transparent layer (show/hide, opacity slider, colour bar), the GeoJSON contours as an SVG
overlay in their class colours (show/hide), a scale bar in µm (when the mpp is known) and the
title. It opens from ``file://`` with no network and no server: tiles load as ``<img>`` and the
pyramid is described inline, not fetched. Pan with the mouse, zoom with the wheel; the URL hash
(``#x=…&y=…&scale=…&opacity=…``: level-0 px, level-0 px per screen px or ``mpp=`` µm per
screen px, heatmap opacity) holds the view, so a link or a reload returns to it. All
coordinates are level-0 px of the slide, y growing downwards as in QuPath.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from slidestream.errors import ConfigError
from slidestream.infer.deepzoom import write_deepzoom
from slidestream.infer.heatmap import colormap
from slidestream.io import Slide

__all__ = ["copy_viewer", "write_viewer", "viewer_files"]

HEAT_SIDE = 4096  # px, longest side of the heatmap image (cells upscaled by an integer factor)
HEAT_OPACITY = 0.5


def viewer_files(path: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """(page, ``.dzi``, ``_files/`` folder) a viewer at ``path`` consists of."""
    page = Path(path)
    stem = page.name[: -len(page.suffix)] if page.suffix else page.name
    return page, page.with_name(stem + ".dzi"), page.with_name(stem + "_files")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no second copy of the tiles where the file system allows
    except OSError:
        shutil.copy2(src, dst)


def copy_viewer(page: str | os.PathLike[str], dst_dir: str | os.PathLike[str], name: str) -> Path:
    """Copy a viewer (page, ``.dzi`` and tiles) into ``dst_dir`` as ``name`` (e.g.
    ``"ab12-s1.viewer.html"``) and return the new page's path.

    Tiles are hard-linked where possible (same file system), else copied; the page's tile URL is
    pointed at the copied ``_files/`` folder. A page without a pyramid beside it (not written by
    :func:`write_viewer`) is copied alone. An older copy under ``name`` is replaced.
    """
    src_page, src_dzi, src_files = viewer_files(page)
    dst_page, dst_dzi, dst_files = viewer_files(Path(dst_dir) / name)
    dst_page.parent.mkdir(parents=True, exist_ok=True)
    text = src_page.read_text(encoding="utf-8")
    if src_files.is_dir() and src_dzi.is_file():
        if dst_files.exists():
            shutil.rmtree(dst_files)
        shutil.copytree(src_files, dst_files, copy_function=_link_or_copy)
        shutil.copyfile(src_dzi, dst_dzi)
        old, new = (f'"Url":"{quote(p.name)}/"' for p in (src_files, dst_files))
        text = text.replace(old, new, 1)
    dst_page.write_text(text, encoding="utf-8")
    return dst_page


def _static(name: str) -> str:
    return resources.files("slidestream.infer").joinpath("static", name).read_text("utf-8")


def _heat_png(grid: np.ndarray) -> str:
    """(rows, cols) values in [0, 1] (NaN: not predicted, transparent) as a PNG data URI."""
    from PIL import Image

    rgb = colormap(grid)
    alpha = np.where(np.isfinite(grid), 255, 0).astype(np.uint8)[..., None]
    rgba = np.concatenate([rgb, alpha], 2)
    k = max(1, min(64, HEAT_SIDE // max(grid.shape)))  # crisp cells when the browser smooths
    rgba = np.repeat(np.repeat(rgba, k, 0), k, 1)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _ring_path(ring: Any) -> str:
    pts = [f"{float(p[0]):.1f} {float(p[1]):.1f}" for p in ring]
    return "M" + " L".join(pts) + " Z" if len(pts) >= 3 else ""


def _contours(geojson: dict[str, Any] | None, default_color: str) -> list[dict[str, str]]:
    """Polygon/MultiPolygon features as SVG paths (holes kept, even-odd) in level-0 px.

    Colour: the feature's QuPath ``classification.color`` ([r, g, b]) if given, else
    ``default_color``."""
    out = []
    for feat in (geojson or {}).get("features", []):
        geom = feat.get("geometry") or {}
        polys = {"Polygon": [geom.get("coordinates")], "MultiPolygon": geom.get("coordinates")}
        props = feat.get("properties") or {}
        cls = props.get("classification") or {}
        rgb = cls.get("color")
        color = default_color
        if isinstance(rgb, list) and len(rgb) == 3:
            color = "#{:02x}{:02x}{:02x}".format(*(int(v) & 255 for v in rgb))
        for poly in polys.get(geom.get("type")) or []:
            d = " ".join(filter(None, (_ring_path(r) for r in poly or [])))
            if d:
                out.append({"d": d, "color": color, "name": str(cls.get("name", ""))})
    return out


def _colorbar(label: str) -> str:
    stops = ", ".join(
        f"rgb({r},{g},{b}) {100 * i / 10:.0f}%"
        for i, (r, g, b) in enumerate(colormap(np.linspace(0, 1, 11)))
    )
    return (
        f'<span class="ss-colorbar">{html.escape(label)} 0'
        f'<span class="ramp" style="background: linear-gradient(to right, {stops})"></span>'
        f"1</span>"
    )


def _controls(heat: bool, contours: int, heat_label: str) -> str:
    parts = []
    if heat:
        parts += [
            '<label><input type="checkbox" id="ss-heat" checked> heatmap</label>',
            f'<label>heatmap opacity <input type="range" id="ss-opacity" min="0" max="1" '
            f'step="0.05" value="{HEAT_OPACITY}"></label>',
            _colorbar(heat_label),
        ]
    if contours:
        parts.append(
            f'<label><input type="checkbox" id="ss-contours" checked> contours ({contours})</label>'
        )
    return "\n".join(parts)


def _page(title: str, config: dict[str, Any], controls: str) -> str:
    data = json.dumps(config, separators=(",", ":")).replace("<", "\\u003c")
    osd = _static("openseadragon/openseadragon.min.js").replace("</script", "<\\/script")
    t = html.escape(title or "slide")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{t}</title>
<style>{_static("viewer.css")}</style>
</head><body>
<header><h1>{t}</h1>
{controls}
</header>
<main><div id="osd"></div>
<div id="ss-scale"><div id="ss-bar"></div><span id="ss-bar-label"></span></div></main>
<script type="application/json" id="ss-config">{data}</script>
<script>{osd}</script>
<script>{_static("viewer.js")}</script>
</body></html>
"""


def _mpp(image: Slide | np.ndarray, mpp: float | None) -> float | None:
    if mpp is not None:
        if not mpp > 0:
            raise ConfigError(f"mpp must be a positive µm per level-0 px, got {mpp!r}")
        return float(mpp)
    if isinstance(image, Slide) and image.mpp is not None:
        return float(min(image.mpp))
    return None


def write_viewer(
    path: str | os.PathLike[str],
    image: Slide | np.ndarray,
    slide_size: tuple[int, int],
    grid: np.ndarray | None = None,
    cell: tuple[float, float] | None = None,
    geojson: dict[str, Any] | None = None,
    *,
    title: str = "",
    heat_label: str = "probability",
    contour_color: str = "#00e5ff",
    mpp: float | None = None,
    finest_mpp: float | None = None,
    tile_format: str = "jpeg",
) -> Path:
    """Write a viewer page and its image pyramid; return the page's path.

    Files written: ``path`` (e.g. ``out/s1.viewer.html``, about 0.4 MB: OpenSeadragon is
    inlined), ``out/s1.viewer.dzi`` and the tiles ``out/s1.viewer_files/`` (see
    :func:`~slidestream.infer.deepzoom.write_deepzoom` for their disk cost). Move the three
    together.

    Args:
        path: the HTML file to write.
        image: an open Slide (→ a pyramid of level 0: zoom reaches the scan's resolution) or an
            (H, W, 3) uint8 image of the whole slide, e.g. a thumbnail (→ a pyramid of it,
            stretched over ``slide_size``).
        slide_size: (w, h) level-0 px of the slide (a Slide's must equal its dimensions).
        grid: (rows, cols) float heatmap in [0, 1], NaN where nothing was predicted.
        cell: (w, h) level-0 px of one heatmap cell; cell (r, c) covers
            ``[c·w, (c+1)·w) × [r·h, (r+1)·h)``.
        geojson: a FeatureCollection in level-0 px (Polygon/MultiPolygon features drawn).
        title: page title (HTML-escaped); ``heat_label``: colour bar title.
        contour_color: "#rrggbb" of contours whose feature has no ``classification.color``.
        mpp: µm per level-0 px for the scale bar (default: the Slide's; none for an array).
        finest_mpp: cap on the pyramid's finest resolution, µm/px (saves disk; Slide only).
        tile_format: ``"jpeg"`` or ``"png"`` (lossless) tiles.

    Raises:
        ConfigError: inconsistent arguments. SlideReadError: the slide could not be read.
    """
    page, dzi, _ = viewer_files(path)
    w0, h0 = (int(v) for v in slide_size)
    if isinstance(image, Slide) and image.dimensions != (w0, h0):
        raise ConfigError(
            f"slide_size {w0}x{h0} does not match {image.path.name} ({image.dimensions[0]}x"
            f"{image.dimensions[1]}); pass slide.dimensions"
        )
    if grid is not None and (cell is None or np.ndim(grid) != 2):
        raise ConfigError("grid must be a (rows, cols) array and needs cell=(w, h) level-0 px")
    scale = _mpp(image, mpp)
    dz = write_deepzoom(dzi.with_suffix(""), image, finest_mpp=finest_mpp, tile_format=tile_format)
    world_w = dz.width * dz.downsample if isinstance(image, Slide) else float(w0)
    config: dict[str, Any] = {
        "slide": {
            "source": dz.tile_source(quote(dz.tiles.name) + "/"),
            "width": world_w,
            "size": [w0, h0],
            "mpp": scale,
            "maxLevel": dz.max_level,
        },
        "heat": None,
        "contours": _contours(geojson, contour_color),
    }
    if grid is not None and cell is not None:
        g = np.asarray(grid, float)
        url = _heat_png(g)
        config["heat"] = {"url": url, "width": g.shape[1] * float(cell[0]), "opacity": HEAT_OPACITY}
    controls = _controls(config["heat"] is not None, len(config["contours"]), heat_label)
    part = page.with_name(page.name + ".part")
    part.write_text(_page(title, config, controls), encoding="utf-8")
    os.replace(part, page)  # never a half-written page
    return page
