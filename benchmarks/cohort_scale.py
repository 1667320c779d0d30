"""Cohort size vs time to first batch and peak memory: ``PatchStream`` and ``features`` setup.

Cohorts of ``--rows`` rows (default 100, 1,000, 10,000) are symbolic links, under distinct names,
to ``--files`` generated slides (``--size``² px at 0.5 µm/px, cached in benchmarks/_data), listed in
a cohort CSV with a label column. Each measurement runs in a fresh process (so peak RSS is its own),
one thread, cold tissue-mask cache:

- ``stream``: ``load_cohort`` + ``PatchStream`` (random 224² patches at 0.5 µm/px) + the first
  batch of 32 through a ``DataLoader`` (0 workers: the peak RSS is the whole pipeline's);
- ``features``: ``FeatureExtractor("resnet18")`` (random weights, 224² at 2 µm/px, CPU) +
  ``load_cohort`` + ``extract_cohort`` of shard 0/N (its checks run over all rows, then the first
  slide is encoded and written);
- ``masks`` (``--mask-rows``, default 100 and 1,000): every row's slide opened and its mask made
  or loaded from the cache, one process: the per-row cost of the optional eager setup
  ``PatchStream.prepare`` (which spreads it over worker processes, after their start-up). Links
  to one file share one cached mask, so only ``--files`` masks are computed.

Peak RSS is ``ru_maxrss`` of the measuring process; ``*_mb_per_1000`` is the slope of peak RSS
from the smallest to the largest cohort per 1,000 rows. The last line is JSON with the curves.

    python benchmarks/cohort_scale.py [--rows 100 1000 10000] [--mask-rows 100 1000] [--files 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VIPS_CONCURRENCY", "1")

DATA = Path(__file__).resolve().parent / "_data" / "cohort_scale"


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child_stream(csv: Path, cache: Path) -> dict[str, float]:
    import torch
    from torch.utils.data import DataLoader

    from slidestream.data import PatchStream
    from slidestream.sampling import RandomPatchSampler, load_cohort

    torch.set_num_threads(1)
    base, t0 = _peak_mb(), time.perf_counter()
    cohort = load_cohort(csv)
    t_cohort = time.perf_counter() - t0
    stream = PatchStream(cohort, RandomPatchSampler(224, 0.5, min_tissue=0.5), mask_dir=cache)
    batch = next(iter(DataLoader(stream, batch_size=32, num_workers=0)))
    assert batch["image"].shape == (32, 3, 224, 224)
    return {
        "ttfb_s": time.perf_counter() - t0,
        "cohort_load_s": t_cohort,
        "peak_rss_mb": _peak_mb(),
        "rss_after_imports_mb": base,
        "masks_cached": len(list(cache.glob("*.tissue.png"))),
    }


def _child_features(csv: Path, cache: Path) -> dict[str, float]:
    import torch

    from slidestream.infer.features import FeatureExtractor, extract_cohort
    from slidestream.sampling import load_cohort

    torch.set_num_threads(1)
    base, t0 = _peak_mb(), time.perf_counter()
    extractor = FeatureExtractor(
        "resnet18", mpp=2.0, size=224, workers=0, batch_size=32, device="cpu"
    )
    cohort = load_cohort(csv)
    report = extract_cohort(cohort, cache / "features", extractor, shard=(0, len(cohort)))
    assert len(report.written) == 1 and report.patches > 0, report
    return {
        "setup_s": time.perf_counter() - t0,
        "peak_rss_mb": _peak_mb(),
        "rss_after_imports_mb": base,
        "patches": report.patches,
    }


def _child_masks(csv: Path, cache: Path) -> dict[str, float]:
    from slidestream.io import open_slide
    from slidestream.sampling import load_cohort
    from slidestream.tissue import detect_tissue

    cohort = load_cohort(csv)
    t0 = time.perf_counter()
    for entry in cohort:  # what PatchStream.prepare does for each row, in its workers
        with open_slide(entry.path, mpp=entry.mpp) as slide:
            detect_tissue(slide, cache_dir=cache)
    return {
        "masks_s": time.perf_counter() - t0,
        "masks_computed": len(list(cache.glob("*.tissue.png"))),
        "peak_rss_mb": _peak_mb(),
    }


def _cohort(rows: int, files: int, size: int) -> Path:
    """``rows`` links to ``files`` generated slides, and their CSV (made once, reused)."""
    from slidestream.synthetic import write_synthetic_slide

    slides = []
    for i in range(files):
        path = DATA / f"slide{i}.tiff"
        if not path.exists():
            write_synthetic_slide(path, size, size, mpp=0.5, seed=900 + i, tumour=i % 2 == 1)
        slides.append(path)
    links = DATA / "links"
    links.mkdir(exist_ok=True)
    lines = []
    for r in range(rows):
        link = links / f"case{r:05d}.tiff"
        if not link.is_symlink():
            link.symlink_to(slides[r % files])
        lines.append(f"{link},{'tumour' if r % files % 2 else 'normal'},p{r}")
    csv = DATA / f"cohort{rows}.csv"
    csv.write_text("slide,label,patient\n" + "\n".join(lines) + "\n")
    return csv


def _measure(kind: str, csv: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, str(csv), tmp],
            capture_output=True,
            text=True,
            check=False,
        )
    if out.returncode:
        raise SystemExit(f"{kind} {csv.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _slope(rows: list[int], values: list[float]) -> float:
    return (values[-1] - values[0]) / (rows[-1] - rows[0]) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--mask-rows", type=int, nargs="*", default=[100, 1000])
    ap.add_argument("--files", type=int, default=3)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--child", nargs=3, metavar=("KIND", "CSV", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, csv, tmp = args.child
        run = {"stream": _child_stream, "features": _child_features, "masks": _child_masks}
        print(json.dumps(run[kind](Path(csv), Path(tmp))))
        return
    DATA.mkdir(parents=True, exist_ok=True)
    rows = sorted(args.rows)
    result: dict[str, object] = {"rows": rows, "files": args.files, "size": args.size}
    for kind in ("stream", "features"):
        got = [_measure(kind, _cohort(n, args.files, args.size)) for n in rows]
        for key in got[0]:
            result[f"{kind}_{key}"] = [round(g[key], 3) for g in got]
        for g, n in zip(got, rows, strict=True):
            print(f"{kind} {n:>6} rows: {g}", file=sys.stderr)
        result[f"{kind}_mb_per_1000"] = round(_slope(rows, [g["peak_rss_mb"] for g in got]), 2)
    rows_m = sorted(args.mask_rows)
    if rows_m:
        got = [_measure("masks", _cohort(n, args.files, args.size)) for n in rows_m]
        result["masks_rows"] = rows_m
        result["masks_s"] = [round(g["masks_s"], 2) for g in got]
        result["masks_computed"] = [g["masks_computed"] for g in got]
        result["masks_ms_per_row"] = round(1000 * got[-1]["masks_s"] / rows_m[-1], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
