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
        "(thumbnail with the tissue outline), and DIR/tissue.csv (one row per slide). "
        "A slide that fails is reported and skipped; the exit code is 1 if any failed. "
        "--shard i/n (or torchrun's RANK/WORLD_SIZE) does every n-th slide from i and "
        "writes DIR/tissue.shard-i-of-n.csv; the same command with --merge then writes "
        "DIR/tissue.csv from all shards.",
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
    p.add_argument("--shard", default=None, metavar="I/N", help="do every N-th slide from I")
    p.add_argument(
        "--merge",
        action="store_true",
        help="combine the shards' tissue.shard-*.csv into tissue.csv",
    )
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
    from slidestream.sampling.shards import parse_shard, shard_items, shard_path

    slides = find_slides(args.paths, recursive=args.recursive)
    missing = [p for p in slides if not p.exists()]  # URLs: asked of the server
    slides = [p for p in slides if p not in missing]
    if not slides:  # one line, and no output folder
        gone = f": not found: {', '.join(map(str, missing))}" if missing else ""
        error_line("tissue", f"no slides found in {' '.join(args.paths)}{gone}")
        return 1
    for path in missing:
        error_line("tissue", f"slide not found: {path} (left out)")
    if args.merge:
        return _merge(slides, args.out)
    shard = parse_shard(args.shard)
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
    jobs = shard_items(jobs, shard)  # stems of the whole cohort: the same in every shard
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
    _write_table(shard_path(args.out / "tissue.csv", shard), rows)
    _print_summary(rows, args.out)
    return 1 if any("error" in r for r in rows) else 0


_COLUMNS = ["slide", "stem", "backend", "fraction", "mask_mpp", "error"]


def _write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """The summary CSV (one row per slide, errors included), renamed into place."""
    import csv
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, _COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _merge(slides: list[Path], out: Path) -> int:
    """tissue.csv from the shards' CSVs, in the order of ``slides``; slides in no shard are
    named (their shard did not finish, or it ran on other slides)."""
    from slidestream.sampling.shards import read_shard_tables

    _, table = read_shard_tables(out / "tissue.csv")
    by_slide = {r["slide"]: r for r in table}
    rows, missing = [], []
    for path in slides:
        row = by_slide.get(str(path))
        if row is None:
            missing.append(str(path))
            continue
        rows.append({k: v for k, v in row.items() if v != ""})
    for path in missing:
        error_line("tissue", f"{path} is in no shard's tissue.shard-*.csv (left out of the merge)")
    _write_table(out / "tissue.csv", rows)
    for r in rows:
        r["fraction"] = float(r.get("fraction", "nan"))
        r["mask_mpp"] = float(r["mask_mpp"]) if r.get("mask_mpp") else None
    _print_summary(rows, out)
    return 1 if missing or any("error" in r for r in rows) else 0


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
