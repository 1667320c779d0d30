"""``slidestream train``: whole-slide training end to end with slide labels (streamed CNN)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from slidestream.train.config import add_config_flags
    from slidestream.train.slide_config import SlideTrainConfig

    p = sub.add_parser(
        "train",
        help="train a streamed CNN on whole slides with slide labels",
        description="Train a torchvision CNN end to end on whole prepared slides "
        "(slidestream prepare) with only slide labels, streaming its "
        "trunk tile by tile with exact gradients. Every config key "
        "is a flag; re-running the same --name resumes. Under "
        "torchrun (python -m slidestream train ...) it runs DDP.",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="YAML with config keys")
    p.add_argument(
        "--only-eval",
        type=Path,
        metavar="CSV",
        default=None,
        help="write predictions.csv for these slides with --checkpoint (no training)",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint for --only-eval (default: RUN/best.pt)",
    )
    add_config_flags(p, SlideTrainConfig)
    p.set_defaults(func=run)


def print_epoch(row: dict) -> None:
    """One console line per epoch: loss, validation metrics, speed and data wait."""
    wait = row.get("data_wait_s", 0.0) / max(row.get("time_s", 0.0), 1e-9)
    parts = [f"epoch {row['epoch']}", f"train_loss {row['train_loss']:.4f}"]
    parts += [f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_")]
    unit = "bags" if "bags_per_s" in row else "images"
    parts += [
        f"{row.get(f'{unit}_per_s', 0):.2f} {unit}/s",
        f"data wait {wait:.0%}",
        f"peak {row.get('peak_mem_gb', 0):.2f} GB",
        f"{row.get('time_s', 0):.0f} s",
    ]
    print(" | ".join(parts), flush=True)


def run(args: argparse.Namespace) -> int:
    from slidestream.train.config import flag_overrides, load_config
    from slidestream.train.runlog import run_dir
    from slidestream.train.slide_config import SlideTrainConfig
    from slidestream.train.slide_loop import evaluate_slides, train_slides

    overrides = flag_overrides(args)
    if args.only_eval is not None:
        overrides.setdefault("data", str(args.only_eval))
    cfg = load_config(SlideTrainConfig, args.config, overrides)
    if args.only_eval is not None:
        ckpt = args.checkpoint or run_dir(cfg, "slides") / "best.pt"
        path = evaluate_slides(ckpt, args.only_eval, run_dir(cfg, "slides"))
        print(f"predictions: {path}")
        return 0
    run_path = train_slides(cfg, on_epoch=print_epoch)
    print(f"run folder: {run_path} (metrics.csv, best.pt, last.pt, curves.png)")
    return 0
