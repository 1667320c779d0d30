"""Region reads per second: each reader library called directly vs ``Slide.read``.

On a generated 40000x30000 JPEG pyramid (0.25 µm/px, cached in benchmarks/_data), the same 2000
random 256x256 level-0 regions are read, one process and one thread, page cache warm:

- directly through pyvips (``Region.fetch``), tiffslide (``read_region(as_array=True)``) and
  OpenSlide (``read_region`` + ``np.asarray``);
- through ``slidestream.open_slide(path, backend=B).read(x, y, 256, 256)`` for every backend
  and for ``backend="auto"``.

Each method runs ``--repeats`` times and its best run counts. The last line printed is JSON with
``direct_best`` (regions/s of the fastest direct library), ``slidestream_auto`` and
``ratio = slidestream_auto / direct_best``.

    python benchmarks/read_regions.py [--size 40000 30000] [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("VIPS_CONCURRENCY", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from slidestream.io import open_slide  # noqa: E402
from slidestream.synthetic import write_synthetic_slide  # noqa: E402

HERE = Path(__file__).resolve().parent


def direct_readers(path: Path) -> dict[str, Callable[[int, int, int], np.ndarray]]:
    import openslide
    import pyvips
    import tiffslide

    osr = openslide.OpenSlide(str(path))
    ts = tiffslide.TiffSlide(str(path))
    region = pyvips.Region.new(pyvips.Image.tiffload(str(path), page=0, access="random"))

    def vips(x: int, y: int, s: int) -> np.ndarray:
        return np.frombuffer(region.fetch(x, y, s, s), np.uint8).reshape(s, s, 3)

    return {
        "pyvips": vips,
        "tiffslide": lambda x, y, s: ts.read_region((x, y), 0, (s, s), as_array=True),
        "openslide": lambda x, y, s: np.asarray(osr.read_region((x, y), 0, (s, s))),
    }


def our_readers(path: Path) -> dict[str, Callable[[int, int, int], np.ndarray]]:
    out = {}
    for backend in ("pyvips", "tiffslide", "openslide", "auto"):
        slide = open_slide(path, backend=backend)
        out[backend] = lambda x, y, s, slide=slide: slide.read(x, y, s, s)
    return out


def rate(
    fn: Callable[[int, int, int], np.ndarray], coords: np.ndarray, size: int, repeats: int
) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x, y in coords:
            fn(int(x), int(y), size)
        best = min(best, time.perf_counter() - t0)
    return len(coords) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", nargs=2, type=int, default=[40000, 30000], metavar=("W", "H"))
    ap.add_argument("--n", type=int, default=2000, help="regions per method (2000)")
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-dir", type=Path, default=HERE / "_data")
    args = ap.parse_args()

    w, h = args.size
    path = args.data_dir / f"bench_{w}x{h}.tiff"
    if not path.exists():
        print(f"generating {path} (once) ...", file=sys.stderr)
        write_synthetic_slide(path, w, h, mpp=0.25, seed=0)
    rng = np.random.default_rng(0)
    coords = np.stack(
        [rng.integers(0, w - args.patch, args.n), rng.integers(0, h - args.patch, args.n)], axis=1
    )

    direct, ours = direct_readers(path), our_readers(path)
    for x, y in coords:  # warm the page cache
        direct["pyvips"](int(x), int(y), args.patch)
    for name in ("pyvips", "tiffslide", "openslide"):  # same pixels, or the comparison is moot
        np.testing.assert_array_equal(
            ours[name](*map(int, coords[0]), args.patch),
            direct["pyvips"](*map(int, coords[0]), args.patch),
        )

    results = {}
    for label, readers in (("direct", direct), ("slidestream", ours)):
        for name, fn in readers.items():
            results[f"{label}_{name}"] = r = rate(fn, coords, args.patch, args.repeats)
            print(f"{label:12s} {name:10s} {r:8.1f} regions/s", file=sys.stderr)
    best_name = max(direct, key=lambda n: results[f"direct_{n}"])
    direct_best = results[f"direct_{best_name}"]
    summary = {
        "direct_best": round(direct_best, 1),
        "direct_best_library": best_name,
        "slidestream_auto": round(results["slidestream_auto"], 1),
        "ratio": round(results["slidestream_auto"] / direct_best, 3),
        "regions": args.n,
        "patch": args.patch,
        "slide": [w, h],
        **{k: round(v, 1) for k, v in results.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
