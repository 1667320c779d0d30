"""``slidestream report``: (re)write the HTML report of a run/prediction folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write DIR/report/index.html from runs and predictions",
        description="Collect training runs (metrics.csv, curves.png), prediction "
        "tables (predictions.csv) and per-slide pictures (QC "
        "overlays, heatmaps) found under DIR into an HTML report.",
    )
    p.add_argument(
        "dir",
        type=Path,
        metavar="RUN_DIR",
        help="folder holding run folders (metrics.csv) and predictions (predictions.csv)",
    )
    p.add_argument(
        "--title", default="slidestream report", help="page title (default: slidestream report)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidestream.errors import ConfigError
    from slidestream.infer.report import write_report

    if not args.dir.is_dir():
        raise ConfigError(f"not a folder: {args.dir}")
    print(f"report: {write_report(args.dir, args.title).resolve()}")
    return 0
