"""``slidestream predict``: run a checkpoint over slides; heatmaps, GeoJSON, slide-level calls."""

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
        "Under torchrun each rank predicts its share of the slides.",
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
        "per tile (default: contours)",
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
    add_backend_option(p)
    add_slide_mpp_option(p)
    add_stain_options(p)  # default: the training run's stain target, when it had one
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import csv
    import os

    from tqdm import tqdm

    from slidestream.colors import write_colors
    from slidestream.errors import SlideStreamError
    from slidestream.infer import PatchPredictor
    from slidestream.infer.saliency import StreamingPredictor
    from slidestream.models.checkpoint import load_checkpoint
    from slidestream.sampling.cohort import failure_message
    from slidestream.sampling.naming import output_stems

    cohort = load_slides("predict", args.slides)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    stems = dict(zip(cohort.slides, output_stems([e.path for e in cohort]), strict=True))
    entries = cohort.slides[rank::world]
    kind = load_checkpoint(args.checkpoint)["kind"]
    if kind != "patch" and (args.stain_norm or args.stain_target):
        raise SlideStreamError(
            f"--stain-norm applies to patch models; {args.checkpoint} is a {kind} checkpoint "
            "(for MIL, normalise when computing features: features --stain-norm)"
        )
    if kind == "streaming":
        predictor = StreamingPredictor(args.checkpoint, device=args.device)
        extra = {}
    elif kind == "mil":
        from slidestream.infer.mil import MILPredictor

        predictor = MILPredictor(
            args.checkpoint,
            features_dir=args.features,
            device=args.device,
            batch_size=args.batch_size,
            workers=args.workers,
        )
        extra = {"geojson": args.geojson}
    else:
        predictor = PatchPredictor(
            args.checkpoint,
            device=args.device,
            batch_size=args.batch_size,
            workers=args.workers,
            min_tissue=args.min_tissue,
            stain=_stain_option(args),
        )
        extra = {"aggregate_by": args.aggregate, "topk": args.topk, "geojson": args.geojson}
    args.out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_colors(args.out, predictor.classes)
        if kind == "patch":
            drawn = predictor.heatmap_class(args.target)
            how = "--class" if args.target else "the default; choose with --class"
            print(
                f"heatmaps and GeoJSON show p({drawn}) ({how}; classes: "
                f"{', '.join(predictor.classes)})"
            )
    rows, failed, damaged = [], len(cohort.problems), {}
    for entry in tqdm(entries, desc="predict", unit="slide", disable=rank != 0):
        try:
            res = predictor.predict(
                entry.path,
                args.out,
                backend=args.backend,
                slide_mpp=entry.mpp or args.slide_mpp,
                threshold=args.threshold,
                target=args.target,
                stem=stems[entry],
                **extra,
            )
        except SlideStreamError as exc:
            error_line("predict", f"{failure_message(entry.path, exc)} (skipped)")
            failed += 1
            continue
        if res.damaged:
            damaged[res.slide] = res.damaged
        probs = [f"{p:.5f}" for p in res.probs]
        rows.append(
            [res.slide, res.stem, entry.label or "", res.call, res.heatmap_class, res.tiles,
             res.damaged, *probs]
        )  # fmt: skip
    damaged_lines("predict", damaged, "tile")
    name = "predictions.csv" if world == 1 else f"predictions.rank{rank}.csv"
    with open(args.out / name, "w", newline="") as f:
        w = csv.writer(f)
        head = ["slide", "stem", "label", "call", "heatmap_class", "tiles", "damaged_tiles"]
        w.writerow([*head, *[f"p_{c}" for c in predictor.classes]])
        w.writerows(rows)
    if world > 1:
        _merge_ranks(args.out, rank, world)
    if rank == 0:
        total = len((args.out / "predictions.csv").read_text().splitlines()) - 1
        print(f"{count(total, 'slide')} predicted -> {args.out / 'predictions.csv'}")
    return 1 if failed else 0


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


def _merge_ranks(out: Path, rank: int, world: int) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()
    if rank == 0:
        parts = [(out / f"predictions.rank{r}.csv").read_text().splitlines() for r in range(world)]
        lines = parts[0][:1] + [line for p in parts for line in p[1:]]
        (out / "predictions.csv").write_text("\n".join(lines) + "\n")
    dist.barrier()
