"""``slidestream predict``: run a checkpoint over slides; heatmaps, GeoJSON, slide-level calls."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from slidestream.cli._common import (
    add_backend_option,
    add_slide_mpp_option,
    add_stain_options,
    count,
    damaged_lines,
    error_line,
    load_slides,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict slides with a checkpoint (heatmaps, GeoJSON)",
        description="Predict slides with a trained checkpoint; model settings "
        "(mpp, patch size, normalisation, classes) come from it. "
        "Writes DIR/<stem>.tiles.csv, .heatmap.npy, .heatmap.png, "
        ".geojson (QuPath 'Import objects') and DIR/predictions.csv "
        "(slide path, output stem, call, ...; <stem> is the file's "
        "stem, plus a short hash of its path when two slides share "
        "a file name). Tiles that cannot be decoded are left out "
        "and counted (damaged_tiles). "
        "With --shard i/n (default under torchrun: the rank) each job predicts every n-th "
        "slide from i into DIR/predictions.<i>of<n>.csv; the last to finish merges them into "
        "DIR/predictions.csv.",
    )
    p.add_argument(
        "checkpoint",
        type=Path,
        help="best.pt/last.pt of train-patches or train (kind read from it)",
    )
    p.add_argument("slides", nargs="+", help="slides, globs, folders, or a CSV/TSV with 'slide'")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for predictions.csv and per-slide tiles CSV, heatmaps, GeoJSON, viewers",
    )
    p.add_argument(
        "--batch-size", type=int, default=64, help="tiles per forward pass (default: 64)"
    )
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers reading tiles (2)")
    p.add_argument(
        "--aggregate",
        choices=["mean", "majority", "topk"],
        default="mean",
        help="slide call from tile probabilities: mean, majority vote, or mean of the top-k "
        "tiles per class (default: mean)",
    )
    p.add_argument(
        "--topk", type=int, default=10, help="tiles averaged by --aggregate topk (default: 10)"
    )
    p.add_argument("--threshold", type=float, default=0.5, help="GeoJSON probability threshold")
    p.add_argument(
        "--geojson",
        choices=["contours", "tiles"],
        default="contours",
        help="GeoJSON of the --class heatmap: contours of cells >= --threshold, or one square "
        "per tile (default: contours; streamed models have no tiles: always contours)",
    )
    p.add_argument("--class", dest="target", default=None, help="class shown in the heatmap")
    p.add_argument(
        "--min-tissue",
        type=float,
        default=0.25,
        help="minimum tissue fraction of a tile to be predicted, 0-1 (default: 0.25)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument(
        "--features",
        type=Path,
        default=None,
        metavar="DIR",
        help="feature files of the slides, for MIL checkpoints (default: computed)",
    )
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="predict every N-th slide from I (0 <= I < N; default: the torchrun rank, or all)",
    )
    p.add_argument(
        "--viewer-mpp",
        type=float,
        default=0.5,
        metavar="MPP",
        help="finest µm/px of the viewer's tile pyramid (default: 0.5; 0: the slide's level 0)",
    )
    p.add_argument("--no-viewer", action="store_true", help="write no viewer page or pyramid")
    add_backend_option(p)
    add_slide_mpp_option(p)
    add_stain_options(p)  # default: the training run's stain target, when it had one
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from slidestream.colors import write_colors
    from slidestream.errors import ConfigError
    from slidestream.infer.cohort import predict_cohort
    from slidestream.infer.engine import load_predictor
    from slidestream.infer.features import parse_shard
    from slidestream.models.checkpoint import load_checkpoint

    shard = parse_shard(args.shard)
    cohort = load_slides("predict", args.slides)
    stain = args.stain_norm or args.stain_target
    kind = load_checkpoint(args.checkpoint)["kind"] if stain else "patch"  # read once otherwise
    if kind != "patch":
        raise ConfigError(
            f"--stain-norm applies to patch models; {args.checkpoint} is a {kind} checkpoint "
            "(for MIL, normalise when computing features: features --stain-norm)"
        )
    predictor = load_predictor(
        args.checkpoint,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        min_tissue=args.min_tissue,
        features_dir=args.features,
        stain=_stain_option(args),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    if shard[0] == 0:
        write_colors(args.out, predictor.classes)
        if predictor.kind == "patch":
            drawn = predictor.heatmap_class(args.target)
            how = "--class" if args.target else "the default; choose with --class"
            print(
                f"heatmaps and GeoJSON show p({drawn}) ({how}; classes: "
                f"{', '.join(predictor.classes)})"
            )
    quiet = shard[0] != 0 and "RANK" in os.environ  # one progress bar under torchrun
    todo = len(cohort.slides[shard[0] :: shard[1]])
    bar = tqdm(total=todo, desc="predict", unit="slide", disable=quiet)
    done = predict_cohort(
        predictor,
        cohort,
        args.out,
        shard=shard,
        on_slide=lambda entry, res: bar.update(1),
        slide_mpp=args.slide_mpp,
        backend=args.backend,
        threshold=args.threshold,
        geojson=args.geojson,
        target=args.target,
        aggregate_by=args.aggregate,
        topk=args.topk,
        viewer_mpp=args.viewer_mpp or None,
        viewer=not args.no_viewer,
    )
    bar.close()
    for why in done.failed.values():
        error_line("predict", f"{why} (skipped)")
    damaged_lines("predict", done.damaged, "tile")
    print(f"{count(done.predicted, 'slide')} predicted -> {done.table}")
    if done.merged is not None:
        total = len(done.merged.read_text().splitlines()) - 1
        print(f"all {shard[1]} shards in: {count(total, 'slide')} -> {done.merged}")
    elif shard[1] > 1:
        print(f"shard {shard[0]}/{shard[1]} done; the last shard to finish writes predictions.csv")
    return 1 if done.failed or cohort.problems else 0


def _stain_option(args: argparse.Namespace) -> object:
    """``--stain-norm/--stain-target`` (saved as OUT/stain.json), else the checkpoint's target."""
    if not (args.stain_norm or args.stain_target):
        return "checkpoint"
    from slidestream.data.stain import load_stain_target
    from slidestream.models.checkpoint import load_checkpoint

    mpp = load_checkpoint(args.checkpoint).get("mpp")
    return load_stain_target(
        args.stain_norm, args.stain_target, mpp=mpp, backend=args.backend, save_to=args.out
    )
