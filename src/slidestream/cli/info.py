"""``slidestream info``: dimensions, levels, mpp, vendor and backend of slides."""

from __future__ import annotations

import argparse

from slidestream.cli._common import add_slide_options, error_line


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="show slide dimensions, levels, mpp, vendor, backend",
        description="Show what each slide is: size, pyramid levels, microns per "
        "pixel, vendor and the reader used.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="slide files, folders or globs")
    p.add_argument("--json", action="store_true", help="one JSON object per slide per line")
    add_slide_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from slidestream.errors import SlideStreamError
    from slidestream.io import find_slides, open_slide

    failed = 0
    rows = []
    for path in find_slides(args.paths):
        try:
            with open_slide(path, backend=args.backend, mpp=args.slide_mpp) as slide:
                info = slide.info
        except SlideStreamError as exc:
            error_line("info", str(exc))
            failed += 1
            continue
        if args.json:
            keys = (
                "path",
                "width",
                "height",
                "level_count",
                "level_dimensions",
                "mpp_x",
                "mpp_y",
                "vendor",
                "backend",
            )
            d = info.to_dict()
            print(json.dumps({k: d[k] for k in keys}), flush=True)
        else:
            rows.append(info)
    if rows:
        _print_table(rows)
    return 1 if failed else 0


def _print_table(rows: list) -> None:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    table = Table("slide", "size (px)", "levels", "mpp (µm/px)", "vendor", "backend")
    for r in rows:
        mpp = f"{r.mpp_x:.4g} x {r.mpp_y:.4g}" if r.mpp_x else "unknown (give --slide-mpp)"
        table.add_row(
            Path(r.path).name,
            f"{r.width} x {r.height}",
            str(r.level_count),
            mpp,
            r.vendor,
            r.backend,
        )
    Console(width=120).print(table)
