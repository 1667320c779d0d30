"""``slidestream demo``: the whole pipeline on a synthetic cohort, ending in an HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on synthetic slides (CPU, minutes)",
        description="Generate a small synthetic cohort (tumour texture in half the "
        "slides), detect tissue, train a streamed slide classifier "
        "and a patch classifier, predict held-out slides and write "
        "DIR/report/index.html.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("demo_out"),
        metavar="DIR",
        help="folder for everything the demo writes; the report is DIR/report/index.html "
        "(default: demo_out)",
    )
    p.add_argument("--fast", action="store_true", help="smaller cohort (about 2 minutes)")
    p.add_argument("--workers", type=int, default=2, help="processes for slide preparation")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidestream.demo import run_demo

    report = run_demo(args.out, fast=args.fast, workers=args.workers)
    print(f"report: {report.resolve()}")
    return 0
