"""``slidestream prepare``: crop slides to tissue at a target mpp for whole-slide training."""

from __future__ import annotations

import argparse
from pathlib import Path

from slidestream.cli._common import (
    add_backend_option,
    add_slide_mpp_option,
    count,
    damaged_lines,
    error_line,
    load_slides,
    positive_float,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="crop slides to tissue at a target mpp (for train)",
        description="For each slide, read the tissue region at --mpp, crop to "
        "the tissue bounding box, remove empty rows/columns between "
        "pieces, and write DIR/<stem>.tiff (tiled pyramid), its "
        "tissue mask and thumbnail, and DIR/prepared.csv (with each "
        "output's source path; <stem> gets a short hash of the path "
        "when two slides share a file name). Finished slides are "
        "skipped on re-runs; failures are listed. Regions with "
        "undecodable pixels are left white and counted. --shard i/n (or torchrun's "
        "RANK/WORLD_SIZE) does every n-th slide from i and writes "
        "DIR/prepared.shard-i-of-n.csv; the same command with --merge writes prepared.csv.",
    )
    p.add_argument("cohort", nargs="+", metavar="COHORT", help="cohort CSV/TSV or slides")
    p.add_argument("--mpp", type=positive_float, required=True, help="target µm per pixel")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for the prepared slides, masks, thumbnails and prepared.csv",
    )
    p.add_argument(
        "--workers", type=int, default=2, help="parallel processes (2; 1 runs in this process)"
    )
    p.add_argument(
        "--keep-empty", action="store_true", help="keep empty rows/columns between tissue pieces"
    )
    p.add_argument("--margin-um", type=float, default=64.0, help="margin around tissue (64 µm)")
    p.add_argument("--shard", default=None, metavar="I/N", help="do every N-th slide from I")
    p.add_argument(
        "--merge",
        action="store_true",
        help="write prepared.csv from the shards' prepared.shard-*.csv (same COHORT)",
    )
    add_backend_option(p)
    add_slide_mpp_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidestream.data.prepare import merge_prepared, prepare_cohort
    from slidestream.sampling.shards import parse_shard, shard_path

    cohort = load_slides("prepare", args.cohort).with_slide_mpp(args.slide_mpp)
    if args.merge:
        result = merge_prepared(cohort, args.out)
        for failure in result.failures:
            error_line("prepare", f"not merged: {failure}")
        print(f"{count(len(result.rows), 'slide')} merged -> {args.out / 'prepared.csv'}")
        return 1 if result.failures else 0
    result = prepare_cohort(
        cohort,
        args.out,
        args.mpp,
        workers=args.workers,
        remove_empty=not args.keep_empty,
        margin_um=args.margin_um,
        backend=args.backend,
        shard=(shard := parse_shard(args.shard)),
    )
    for failure in result.failures:
        error_line("prepare", f"failed: {failure}")
    damaged_lines("prepare", result.damaged, "region")
    note = (
        f", {len(result.damaged)} with unreadable regions left white (damaged_regions column)"
        if result.damaged
        else ""
    )
    print(
        f"{count(len(result.rows), 'slide')} prepared ({result.skipped} already done), "
        f"{len(result.failures)} failed{note} -> "
        f"{shard_path(args.out / 'prepared.csv', shard)}"
    )
    return 1 if result.failures else 0
