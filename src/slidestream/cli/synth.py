"""``slidestream synth``: write a synthetic H&E-like pyramidal TIFF."""

from __future__ import annotations

import argparse

from slidestream.cli._common import positive_float


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic H&E-like slide (tiled pyramidal TIFF)",
        description="Write a synthetic slide: tissue pieces with nuclei on white "
        "background, optionally with tumour regions, deterministic "
        "for a seed, in bounded memory.",
    )
    p.add_argument("out", metavar="OUT.tiff", help="output file (.tiff, or .svs with --aperio)")
    p.add_argument(
        "--size",
        nargs=2,
        type=int,
        metavar=("W", "H"),
        required=True,
        help="level-0 width and height in pixels",
    )
    p.add_argument("--mpp", type=positive_float, default=0.5, help="microns per pixel (0.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--tumour", "--tumor", action="store_true", help="add tumour-texture regions")
    p.add_argument(
        "--texture",
        default="normal",
        choices=["normal", "tumour", "inflamed"],
        help="base tissue texture (normal)",
    )
    p.add_argument("--aperio", action="store_true", help="Aperio-style SVS layout and description")
    p.add_argument("--no-mpp", action="store_true", help="write no usable resolution (for tests)")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality (85)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from slidestream.synthetic import write_synthetic_slide

    t0 = time.perf_counter()
    w, h = args.size
    path = write_synthetic_slide(
        args.out,
        w,
        h,
        mpp=args.mpp,
        seed=args.seed,
        tumour=args.tumour,
        aperio=args.aperio,
        write_mpp=not args.no_mpp,
        quality=args.quality,
    )
    print(f"wrote {path} ({w}x{h} px at {args.mpp} µm/px) in {time.perf_counter() - t0:.1f} s")
    return 0
