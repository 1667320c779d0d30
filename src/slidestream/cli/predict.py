"""``slidestream predict``: run a checkpoint over slides; heatmaps, GeoJSON, slide-level calls."""

from __future__ import annotations

import argparse
from pathlib import Path

from slidestream.cli._common import add_backend_option, error_line, positive_float


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict slides with a checkpoint (heatmaps, GeoJSON)",
        description="Predict slides with a trained checkpoint; model settings "
        "(mpp, patch size, normalisation, classes) come from it. "
        "Writes DIR/<slide>.tiles.csv, .heatmap.npy, .heatmap.png, "
        ".geojson (QuPath 'Import objects') and DIR/predictions.csv. "
        "Under torchrun each rank predicts its share of the slides.",
    )
    p.add_argument("checkpoint", type=Path)
    p.add_argument("slides", nargs="+", help="slides, globs, folders, or a CSV/TSV with 'slide'")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers reading tiles (2)")
    p.add_argument("--aggregate", choices=["mean", "majority", "topk"], default="mean")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--threshold", type=float, default=0.5, help="GeoJSON probability threshold")
    p.add_argument("--geojson", choices=["contours", "tiles"], default="contours")
    p.add_argument("--class", dest="target", default=None, help="class shown in the heatmap")
    p.add_argument("--min-tissue", type=float, default=0.25)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--features", type=Path, default=None, metavar="DIR", help="feature files (mil checkpoints)"
    )
    add_backend_option(p)
    p.add_argument(
        "--slide-mpp",
        type=positive_float,
        default=None,
        help="µm per level-0 pixel for slides that carry none",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import csv
    import os

    from tqdm import tqdm

    from slidestream.errors import SlideStreamError
    from slidestream.infer import PatchPredictor
    from slidestream.infer.saliency import StreamingPredictor
    from slidestream.models.checkpoint import load_checkpoint
    from slidestream.sampling import load_cohort

    cohort = load_cohort(args.slides[0] if len(args.slides) == 1 else args.slides)
    for problem in cohort.problems:
        error_line("predict", f"{problem} (skipped)")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    entries = cohort.slides[rank::world]
    kind = load_checkpoint(args.checkpoint)["kind"]
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
        )
        extra = {"aggregate_by": args.aggregate, "topk": args.topk, "geojson": args.geojson}
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], len(cohort.problems)
    for entry in tqdm(entries, desc="predict", unit="slide", disable=rank != 0):
        try:
            res = predictor.predict(
                entry.path,
                args.out,
                backend=args.backend,
                slide_mpp=entry.mpp or args.slide_mpp,
                threshold=args.threshold,
                target=args.target,
                **extra,
            )
        except SlideStreamError as exc:
            error_line("predict", f"{entry.path}: {exc} (skipped)")
            failed += 1
            continue
        rows.append(
            [res.slide, entry.label or "", res.call, res.tiles, *[f"{p:.5f}" for p in res.probs]]
        )
    name = "predictions.csv" if world == 1 else f"predictions.rank{rank}.csv"
    with open(args.out / name, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "label", "call", "tiles", *[f"p_{c}" for c in predictor.classes]])
        w.writerows(rows)
    if world > 1:
        _merge_ranks(args.out, rank, world)
    if rank == 0:
        total = len((args.out / "predictions.csv").read_text().splitlines()) - 1
        print(f"{total} slides predicted -> {args.out / 'predictions.csv'}")
    return 1 if failed else 0


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
