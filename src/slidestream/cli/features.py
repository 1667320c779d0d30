"""``slidestream features``: patch features of every slide with a frozen encoder (for MIL)."""

from __future__ import annotations

import argparse
from pathlib import Path

from slidestream.cli._common import (
    add_slide_options,
    add_stain_options,
    error_line,
    positive_float,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features",
        help="patch features of slides with a frozen encoder (one HDF5 file per slide)",
        description="Grid patches inside tissue, a frozen encoder (a torchvision "
        "name, name@stage for a cut ResNet, timm/<name>, or mean_rgb), one "
        "DIR/<slide>.h5 per slide (<slide>-<path hash>.h5 where slides share "
        "a name; DIR/index.<i>of<n>.csv maps them) with features (N, D), "
        "coords (N, 2) in level-0 px and the settings. Foundation models by name (uni, uni2-h, conch_v1_5, "
        "virchow2, h-optimus-0, prov-gigapath, phikon-v2, ctranspath; --weights hf loads "
        "them from the Hugging Face cache) bring their own patch size, mpp and normalisation. Finished slides are skipped; "
        "--shard i/n (or torchrun) splits the cohort without overlap.",
    )
    p.add_argument("cohort", help="slides, globs, folders, or a CSV/TSV with a 'slide' column")
    p.add_argument("--encoder", default="resnet50", help="encoder name (default: resnet50)")
    p.add_argument(
        "--weights", default=None, help="weights file, torchvision name, timm tag, or hf"
    )
    p.add_argument(
        "--mpp", type=positive_float, default=None, help="µm/px of the patches (the encoder's, 0.5)"
    )
    p.add_argument("--size", type=int, default=None, help="patch px (the encoder's input, 224)")
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder of <stem>.h5 feature files"
    )
    p.add_argument(
        "--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a patch (0.5)"
    )
    p.add_argument(
        "--batch-size", type=int, default=128, help="patches per encoder forward pass (128)"
    )
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers reading patches")
    p.add_argument(
        "--dtype",
        choices=["float16", "float32"],
        default="float16",
        help="stored feature precision (default: float16, half the disk)",
    )
    p.add_argument("--shard", default=None, metavar="I/N", help="do every N-th slide from I")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    add_slide_options(p)
    add_stain_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from slidestream.infer.features import FeatureExtractor, extract_cohort, parse_shard
    from slidestream.sampling import load_cohort

    cohort = load_cohort(args.cohort).with_slide_mpp(args.slide_mpp)
    for problem in cohort.problems:
        error_line("features", f"{problem} (skipped)")
    shard = parse_shard(args.shard)
    extractor = FeatureExtractor(
        args.encoder,
        weights=args.weights,
        mpp="encoder" if args.mpp is None else args.mpp,
        size=args.size,
        min_tissue=args.min_tissue,
        batch_size=args.batch_size,
        workers=args.workers,
        dtype=args.dtype,
        device=args.device,
        backend=args.backend,
    )
    from slidestream.data.stain import load_stain_target

    mpp = extractor.sampler.mpp
    extractor.set_stain(
        load_stain_target(
            args.stain_norm, args.stain_target, mpp=mpp, backend=args.backend, save_to=args.out
        )
    )
    bar = tqdm(total=len(cohort.slides[shard[0] :: shard[1]]), desc="features", unit="slide")
    report = extract_cohort(cohort, args.out, extractor, shard, lambda s, n: bar.update(1))
    bar.close()
    for path, why in report.failed.items():
        error_line("features", f"{path}: {why} (skipped)")
    print(
        f"shard {shard[0]}/{shard[1]}: {len(report.written)} slides written, "
        f"{len(report.skipped)} already done, {len(report.failed)} failed, "
        f"{len(report.empty)} empty (no tissue patches); "
        f"{report.patches} patches at {report.patches_per_s:.1f} patches/s -> {args.out}"
    )
    return 1 if report.failed or cohort.problems else 0
