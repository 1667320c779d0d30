"""Viewer pyramids: time, disk and peak memory of ``write_viewer`` on a slide, both routes.

Writes a viewer for ``--slide`` (default ``../shared/data/cmu_small_region.svs``) with a
tissue-fraction heatmap (256 px level-0 cells) and its contours at fraction >= 0.5, once
through the pyvips loader route (backend pyvips) and once through the ``Slide.read`` streamed
route (backend tiffslide). With ``--synthetic W H`` a generated slide of that size is used
instead (cached in benchmarks/_data). With ``--screenshots DIR`` and a chromium on PATH, the
viewer is photographed in headless Chromium at the whole-slide view (``viewer.png``) and zoomed
to ``--zoom-mpp`` µm per screen px on the most tissue-rich cell (``viewer-cells.png``); the
µm/px on screen is read back from the page.

The last line printed is JSON: per route ``seconds``, ``pyramid_mb``, ``tiles``, ``rss_growth_mb``
(how far the process RSS rose while the route ran), ``mpix_per_s`` (level-0 megapixels per s), and the screenshots' ``um_per_px``.

    python benchmarks/viewer_pyramid.py [--synthetic 40000 30000] [--screenshots docs]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from slidestream.infer.export import contours_geojson
from slidestream.infer.viewer import viewer_files, write_viewer
from slidestream.io import open_slide
from slidestream.synthetic import write_synthetic_slide
from slidestream.tissue import detect_tissue

HERE = Path(__file__).resolve().parent
CELL = 256.0  # level-0 px of one heatmap cell


def tissue_grid(slide) -> np.ndarray:
    """(rows, cols) tissue fraction of each CELL × CELL level-0 cell."""
    mask = detect_tissue(slide)
    w0, h0 = slide.dimensions
    rows, cols = int(np.ceil(h0 / CELL)), int(np.ceil(w0 / CELL))
    yy, xx = np.mgrid[0:rows, 0:cols] * CELL
    grid = mask.region_fraction(xx, yy, CELL, CELL)
    return np.where(grid > 0.02, grid, np.nan)


def rss_growth(fn):
    """``fn()`` and how far the process RSS rose above its start while it ran, in MB."""
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.wait(0.05):
            peak = max(peak, proc.memory_info().rss)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        return fn(), (peak - base) / 1e6
    finally:
        done.set()
        thread.join()


def run_route(path: Path, backend: str, out: Path, grid: np.ndarray) -> dict:
    geo = contours_geojson(np.nan_to_num(grid), (0.0, 0.0, CELL, CELL), "tissue", 0.5)
    with open_slide(path, backend=backend) as slide:
        t0 = time.perf_counter()
        page, rss_mb = rss_growth(lambda: write_viewer(
            out / f"{path.stem}.viewer.html", slide, slide.dimensions, grid, (CELL, CELL), geo,
            title=f"{path.name}: tissue fraction", heat_label="tissue fraction",
        ))  # fmt: skip
        seconds = time.perf_counter() - t0
    _, _, files = viewer_files(page)
    tiles = [f for f in files.rglob("*") if f.is_file()]
    return {
        "page": str(page),
        "seconds": round(seconds, 2),
        "pyramid_mb": round(sum(f.stat().st_size for f in tiles) / 1e6, 2),
        "tiles": len(tiles),
        "rss_growth_mb": round(rss_mb, 1),
        "mpix_per_s": round(slide.dimensions[0] * slide.dimensions[1] / seconds / 1e6, 1),
    }


def photograph(page: Path, hash_: str, shot: Path) -> dict:
    """Screenshot the page in headless Chromium and read back its view state."""
    browser = next(b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b))
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--window-size=1200,800", "--virtual-time-budget=10000"]  # fmt: skip
    url = page.resolve().as_uri() + hash_
    subprocess.run([*cmd, f"--screenshot={shot}", url], check=True, capture_output=True)
    dom = subprocess.run([*cmd, "--dump-dom", url], check=True, capture_output=True, text=True)
    state = dict(
        re.findall(r'data-([a-z0-9-]+)="([^"]*)"', re.search(r"<html[^>]*>", dom.stdout)[0])
    )
    return {"file": str(shot), "um_per_px": float(state.get("um-per-px", "nan")), **state}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--slide", type=Path, default=HERE.parent.parent / "shared/data/cmu_small_region.svs"
    )
    ap.add_argument("--synthetic", nargs=2, type=int, metavar=("W", "H"))
    ap.add_argument("--out", type=Path, default=HERE / "_data" / "viewer")
    ap.add_argument("--screenshots", type=Path)
    ap.add_argument("--zoom-mpp", type=float, default=0.4)
    args = ap.parse_args()
    path = args.slide
    if args.synthetic:
        w, h = args.synthetic
        path = HERE / "_data" / f"viewer_{w}x{h}.tiff"
        if not path.exists():
            write_synthetic_slide(path, w, h, mpp=0.25, seed=3, tumour=True)
    with open_slide(path) as slide:
        grid = tissue_grid(slide)
    result: dict = {"slide": str(path), "size": list(open_slide(path).dimensions)}
    for route, backend in (("streamed", "tiffslide"), ("pyvips", "pyvips")):
        result[route] = run_route(path, backend, args.out / route, grid)
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)
        page = Path(result["pyvips"]["page"])
        r, c = np.unravel_index(np.nanargmax(grid), grid.shape)
        near = (
            f"#x={(c + 0.5) * CELL:.0f}&y={(r + 0.5) * CELL:.0f}&mpp={args.zoom_mpp}&opacity=0.35"
        )
        result["whole"] = photograph(page, "", args.screenshots / "viewer.png")
        result["cells"] = photograph(page, near, args.screenshots / "viewer-cells.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
