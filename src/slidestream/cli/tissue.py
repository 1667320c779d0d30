"""``slidestream tissue``: tissue masks and QC overlays for slides and folders of slides."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from slidestream.cli._common import add_slide_options, count, error_line


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tissue",
        help="detect tissue; write masks, JSON and QC overlays",
        description="Detect tissue on each slide and write DIR/<stem>.tissue.png "
        "(1-bit mask), DIR/<stem>.tissue.json (method, parameters, "
        "mask mpp, slide size, fraction) and DIR/<stem>.qc.png "
        "(thumbnail with the tissue outline). A slide that fails is "
        "reported and skipped; the exit code is 1 if any failed.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH_OR_DIR", help="slides, folders or globs")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument(
        "--method",
        default="otsu",
        choices=["otsu", "hsv"],
        help="detector: otsu (default; darker or more coloured than the glass) or hsv "
        "(more saturated); both drop black or near-black areas, blue/green/black ink and "
        "grey glass, and keep faint pale tissue",
    )
    p.add_argument("--mask-mpp", type=float, default=8.0, help="µm per mask pixel (8)")
    p.add_argument("--recursive", action="store_true", help="search folders recursively")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (1)")
    p.add_argument("--qc-size", type=int, default=1024, help="longer side of QC images (1024)")
    add_slide_options(p)
    p.set_defaults(func=run)


def process_slide(path: Path, args: dict[str, Any]) -> dict[str, Any]:
    """Detect, save and draw one slide; returns a summary row (errors as a string)."""
    import os

    import numpy as np
    from PIL import Image

    from slidestream.errors import SlideStreamError
    from slidestream.io import open_slide
    from slidestream.tissue import detect_tissue, qc_overlay

    row: dict[str, Any] = {"slide": str(path), "stem": args["stem"]}
    try:
        with open_slide(path, backend=args["backend"], mpp=args["slide_mpp"]) as slide:
            mask = detect_tissue(slide, args["method"], mask_mpp=args["mask_mpp"])
            out = Path(args["out"])
            mask.save(out / f"{args['stem']}.tissue.png", slide=str(path), backend=slide.backend)
            qc = qc_overlay(slide.thumbnail(args["qc_size"]), mask)
            qc_path = out / f"{args['stem']}.qc.png"
            tmp = qc_path.with_name(f".{qc_path.name}.{os.getpid()}.tmp")
            Image.fromarray(np.ascontiguousarray(qc)).save(tmp, format="PNG")
            os.replace(tmp, qc_path)  # whole or not at all, even when Ctrl-C stops the worker
            row.update(backend=slide.backend, fraction=mask.fraction, mask_mpp=mask.mpp)
    except SlideStreamError as exc:
        row["error"] = " ".join(str(exc).split())
    return row


def run(args: argparse.Namespace) -> int:

    from tqdm import tqdm

    from slidestream.io import find_slides
    from slidestream.parallel import process_pool
    from slidestream.sampling.naming import output_stems

    slides = find_slides(args.paths, recursive=args.recursive)
    missing = [p for p in slides if not Path(p).exists()]
    slides = [p for p in slides if Path(p).exists()]
    if not slides:  # one line, and no output folder
        gone = f": not found: {', '.join(map(str, missing))}" if missing else ""
        error_line("tissue", f"no slides found in {' '.join(args.paths)}{gone}")
        return 1
    for path in missing:
        error_line("tissue", f"slide not found: {path} (left out)")
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (
            p,
            {
                "stem": stem,
                "backend": args.backend,
                "slide_mpp": args.slide_mpp,
                "method": args.method,
                "mask_mpp": args.mask_mpp,
                "out": str(args.out),
                "qc_size": args.qc_size,
            },
        )
        for p, stem in zip(slides, output_stems(slides), strict=True)
    ]
    bar = tqdm(total=len(jobs), desc="tissue", unit="slide")
    rows = []
    if args.workers > 1:
        with process_pool(args.workers) as pool:
            for row in pool.map(process_slide, *zip(*jobs, strict=True)):
                rows.append(_report(row, bar))
    else:
        for job in jobs:
            rows.append(_report(process_slide(*job), bar))
    bar.close()
    _print_summary(rows, args.out)
    return 1 if any("error" in r for r in rows) else 0


def _report(row: dict[str, Any], bar: Any) -> dict[str, Any]:
    if "error" in row:
        bar.clear()
        error_line("tissue", row["error"])
    bar.update(1)
    return row


def _print_summary(rows: list[dict[str, Any]], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("slide", "backend", "tissue", "mask µm/px", "status")
    for r in rows:
        if "error" in r:
            table.add_row(Path(r["slide"]).name, "-", "-", "-", "[red]failed[/red]")
        else:
            mpp = f"{r['mask_mpp']:.3g}" if r["mask_mpp"] else "-"
            status = "[yellow]no tissue[/yellow]" if _near_empty(r) else "ok"
            table.add_row(
                Path(r["slide"]).name, r["backend"], f"{100 * r['fraction']:.1f}%", mpp, status
            )
    ok = sum("error" not in r for r in rows)
    console = Console(width=120, stderr=False)
    console.print(table)
    console.print(f"{ok} of {count(len(rows), 'slide')} done; masks and QC images in {out}")
    empty = [Path(r["slide"]).name for r in rows if _near_empty(r)]
    if empty:
        console.print(
            f"{len(empty)} slide(s) with an empty or near-empty tissue mask: {', '.join(empty)} "
            "(blank slide? else try --method hsv, or check the QC images)"
        )


def _near_empty(row: dict[str, Any]) -> bool:
    from slidestream.tissue import NEAR_EMPTY

    return "error" not in row and row["fraction"] < NEAR_EMPTY
