"""``slidestream patches-preview``: look at the patches a sampler would draw, before training."""

from __future__ import annotations

import argparse
from pathlib import Path

from slidestream.cli._common import (
    add_backend_option,
    add_slide_mpp_option,
    error_line,
    load_slides,
    positive_float,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "patches-preview",
        help="PNG grid of sampled patches + locations per slide",
        description="Sample patches as training would and write DIR/patches.png "
        "(a grid labelled with slide, coordinates and label), "
        "DIR/<stem>.locations.png per slide (thumbnail with tissue "
        "outline and sampled boxes; <stem> gets a short hash of the "
        "path when two slides share a file name) and DIR/patches.csv "
        "(slide path and its locations image per patch).",
    )
    p.add_argument("cohort", nargs="+", metavar="COHORT", help="cohort CSV/TSV, slides or folders")
    p.add_argument("--mpp", type=positive_float, required=True, help="µm per pixel of patches")
    p.add_argument("--size", type=int, default=256, help="patch size in pixels (256)")
    p.add_argument("--n", type=int, default=64, help="number of patches (64)")
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder for the images and CSV"
    )
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction (0.5)")
    p.add_argument("--method", default="otsu", choices=["otsu", "hsv"], help="tissue detector")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled locations (0)")
    p.add_argument("--columns", type=int, default=8, help="grid columns (8)")
    add_backend_option(p)
    add_slide_mpp_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import csv
    import math

    from PIL import Image

    from slidestream.data import PatchStream
    from slidestream.data.preview import patch_grid
    from slidestream.sampling import RandomPatchSampler
    from slidestream.sampling.naming import output_stems

    cohort = load_slides("patches-preview", args.cohort)
    cohort = _without_missing_mpp(cohort.with_slide_mpp(args.slide_mpp), args.backend)
    if not len(cohort):
        error_line("patches-preview", "no usable slides")
        return 1
    paths = [e.path for e in cohort]
    stems = dict(zip(map(str, paths), output_stems(paths), strict=True))
    sampler = RandomPatchSampler(args.size, args.mpp, args.min_tissue, replacement=False)
    stream = PatchStream(
        cohort,
        sampler,
        patches_per_slide=math.ceil(args.n / len(cohort)),
        patches_per_visit=4,
        tissue=args.method,
        backend=args.backend,
        mask_dir=args.out / "masks",
        seed=args.seed,
    )
    items = [it for _, it in zip(range(args.n), stream, strict=False)]
    args.out.mkdir(parents=True, exist_ok=True)
    captions = [
        f"{stems[i['slide']][:18]}\n{i['x']},{i['y']}"
        + (f" {stream.classes[i['label']]}" if i["label"] >= 0 else "")
        for i in items
    ]
    grid = patch_grid(
        [i["image"].permute(1, 2, 0).numpy() for i in items], captions, columns=args.columns
    )
    Image.fromarray(grid).save(args.out / "patches.png")
    with open(args.out / "patches.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "x", "y", "mpp", "size", "label", "tissue_fraction", "locations"])
        for i in items:
            label = stream.classes[i["label"]] if i["label"] >= 0 else ""
            w.writerow(
                [
                    i["slide"],
                    i["x"],
                    i["y"],
                    i["mpp"],
                    args.size,
                    label,
                    f"{i['tissue_fraction']:.3f}",
                    f"{stems[i['slide']]}.locations.png",
                ]
            )
    _draw_locations(items, stream, args, stems)
    stats = stream.stats()
    print(
        f"{len(items)} patches from {len({i['slide'] for i in items})} slides "
        f"({stats['slides_dropped']} dropped) -> {args.out / 'patches.png'}"
    )
    return 1 if stats["slides_dropped"] or cohort.problems or not items else 0


def _without_missing_mpp(cohort, backend: str):
    """The cohort less the slides with no mpp anywhere, each reported with the way to give it
    (in this command ``--mpp`` is the patches' resolution, not the slide's)."""
    from slidestream.errors import MissingMppError, SlideStreamError
    from slidestream.io import open_slide
    from slidestream.sampling.cohort import failure_message

    missing = []
    for entry in cohort:
        if entry.mpp is None:
            try:
                with open_slide(entry.path, backend=backend) as slide:
                    if slide.mpp is None:
                        missing.append(entry.path)
            except SlideStreamError:
                continue  # the stream reports it
    for path in missing:
        msg = failure_message(path, MissingMppError())
        error_line("patches-preview", f"{msg} (left out)")
        cohort.problems.append(msg)
    return cohort.without(missing)


def _draw_locations(
    items: list[dict], stream, args: argparse.Namespace, stems: dict[str, str]
) -> None:
    from PIL import Image

    from slidestream.data.preview import draw_boxes
    from slidestream.io import open_slide
    from slidestream.tissue import detect_tissue, qc_overlay

    by_slide: dict[str, list[dict]] = {}
    for i in items:
        by_slide.setdefault(i["slide"], []).append(i)
    for path, its in by_slide.items():
        entry = next(e for e in stream.cohort if str(e.path) == path)
        with open_slide(path, backend=args.backend, mpp=entry.mpp) as slide:
            thumb = slide.thumbnail(1024)
            mask = detect_tissue(slide, args.method, cache_dir=args.out / "masks")
            w0, h0 = slide.dimensions
            scale = (w0 / thumb.shape[1], h0 / thumb.shape[0])
            geo = stream.sampler.geometry(slide)
            boxes = [(i["x"], i["y"], *geo.size0) for i in its]
            img = draw_boxes(qc_overlay(thumb, mask), boxes, scale)
        Image.fromarray(img).save(args.out / f"{stems[path]}.locations.png")
