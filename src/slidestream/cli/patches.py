"""``slidestream patches``: build HDF5 patch databases (one file per split, split by patient)."""

from __future__ import annotations

import argparse
from pathlib import Path

from slidestream.cli._common import (
    add_backend_option,
    add_slide_mpp_option,
    add_stain_options,
    count,
    damaged_lines,
    error_line,
    load_slides,
    positive_float,
    warning_line,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "patches",
        help="build an HDF5 patch database from slides or tile folders",
        description="Extract patches into HDF5 (uint8, one patch per chunk, "
        "compressed) with label, slide, patient, x, y, mpp; one file "
        "per split, patients never shared between splits; resumable.",
    )
    p.add_argument(
        "cohort",
        nargs="+",
        metavar="COHORT",
        help="cohort CSV/TSV, slides, folders of slides, or (with --tiles) a folder "
        "of class folders of tile images",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DB.h5",
        help="database file; with --split, one file per split (DB.train.h5, ...)",
    )
    p.add_argument("--mpp", type=positive_float, help="µm per pixel of the patches")
    p.add_argument("--size", type=int, default=256, help="patch size in pixels (256)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--grid", type=int, metavar="STRIDE", help="grid patches, stride in pixels")
    mode.add_argument("--random", type=int, metavar="N", help="N random patches per slide")
    p.add_argument("--split", default=None, help="e.g. train=0.7,val=0.15,test=0.15")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and splits (0)")
    p.add_argument(
        "--labels",
        choices=["slide", "annotations"],
        default="slide",
        help="slide label, or the class of the GeoJSON polygon under each patch",
    )
    p.add_argument(
        "--min-tissue",
        type=float,
        default=0.5,
        help="minimum tissue fraction of a patch, 0-1 (default: 0.5)",
    )
    p.add_argument(
        "--compression",
        choices=["gzip", "lzf", "none"],
        default="gzip",
        help="HDF5 compression of the images: gzip (smaller), lzf (faster), none (default: gzip)",
    )
    p.add_argument("--tiles", action="store_true", help="COHORT is ROOT/<class>/<image> tiles")
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="do every N-th slide from I into DB.shard-I-of-N.h5 (default: torchrun's RANK/"
        "WORLD_SIZE, else all slides)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="merge the shard databases into --out (same COHORT, --split and --seed; the "
        "patches are mapped, not copied, so keep the shard files next to it)",
    )
    add_backend_option(p)
    add_slide_mpp_option(p)
    add_stain_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidestream.data.database import (
        build_patch_databases,
        build_tile_database,
        merge_shard_databases,
    )
    from slidestream.errors import ConfigError
    from slidestream.sampling import (
        AnnotationSampler,
        GridPatchSampler,
        RandomPatchSampler,
        parse_shard,
        parse_split,
    )

    split = parse_split(args.split) if args.split else None
    if args.tiles and (args.stain_norm or args.stain_target):
        raise ConfigError("--stain-norm works on slides, not --tiles folders")
    shard = parse_shard(args.shard)
    if args.tiles and (shard[1] > 1 or args.merge):
        raise ConfigError("--shard and --merge are for slides, not --tiles folders")
    if args.merge:
        cohort = load_slides("patches", args.cohort)
        build = merge_shard_databases(cohort, args.out, split=split, seed=args.seed)
        for name, path in build.files.items():
            print(f"{name}: {count(build.patches[name], 'patch', 'patches')} merged -> {path}")
        return 0
    if args.tiles:
        build = build_tile_database(
            args.cohort[0],
            args.out,
            args.size,
            split=split,
            seed=args.seed,
            compression=args.compression,
            mpp=args.mpp,
        )
    else:
        if args.mpp is None:
            raise ConfigError("--mpp is required for slides (the µm per pixel of the patches)")
        cohort = load_slides("patches", args.cohort).with_slide_mpp(args.slide_mpp)
        if args.labels == "slide" and not cohort.classes:
            warning_line(
                "patches",
                "the slides have no labels, so the database will hold none and "
                "train-patches cannot use it: give a cohort CSV with a label column, "
                "--labels annotations, or --tiles class folders",
            )
        if args.random is not None and args.labels == "annotations":
            sampler = AnnotationSampler(args.size, args.mpp, args.min_tissue)
        elif args.random is not None:
            sampler = RandomPatchSampler(args.size, args.mpp, args.min_tissue, replacement=False)
        else:
            sampler = GridPatchSampler(args.size, args.mpp, args.min_tissue, stride=args.grid)
        from slidestream.data.stain import load_stain_target

        stain = load_stain_target(
            args.stain_norm,
            args.stain_target,
            mpp=args.mpp,
            backend=args.backend,
            save_to=args.out.parent,
        )
        build = build_patch_databases(
            cohort,
            args.out,
            sampler,
            split=split,
            seed=args.seed,
            labels=args.labels,
            per_slide=args.random,
            compression=args.compression,
            backend=args.backend,
            mask_dir=args.out.parent / "masks",
            stain=stain,
            shard=shard,
        )
        build.failures = cohort.problems + build.failures
    for failure in build.failures:
        error_line("patches", f"skipped {failure}")
    damaged_lines("patches", build.damaged, "patch region")
    for name, path in build.files.items():
        print(f"{name}: {count(build.patches[name], 'new patch', 'new patches')} -> {path}")
    if build.damaged:
        print(
            f"{count(sum(build.damaged.values()), 'unreadable patch region')} left out in "
            f"{count(len(build.damaged), 'slide')} (listed above and in the database's "
            "damaged_regions)"
        )
    empty = build.empty
    if empty:
        names = ", ".join(Path(p).name for p in empty[:10]) + (" ..." if len(empty) > 10 else "")
        print(f"{count(len(empty), 'slide')} gave no patches (blank or too little tissue): {names}")
    if build.skipped:
        print(
            f"{count(build.skipped, 'slide')} (or tile blocks) already in the database "
            f"{'was' if build.skipped == 1 else 'were'} skipped"
        )
    return 1 if build.failures else 0
