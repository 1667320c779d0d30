"""``slidestream train-mil``: slide-level MIL (attention pooling) on frozen patch features."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from slidestream.train.config import add_config_flags
    from slidestream.train.mil_config import MILTrainConfig

    p = sub.add_parser(
        "train-mil",
        help="train a MIL slide classifier on feature files (ABMIL, TransMIL-style)",
        description="Train a multiple-instance model on the feature files of "
        "slidestream features, with slide labels: gated attention "
        "(ABMIL) by default, mean/max pooling or a TransMIL-style "
        "transformer. Every config key is a flag; re-running the same "
        "--name resumes.",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="YAML with config keys")
    add_config_flags(p, MILTrainConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from slidestream.cli.train import print_epoch
    from slidestream.train.config import flag_overrides, load_config
    from slidestream.train.mil import train_mil
    from slidestream.train.mil_config import MILTrainConfig

    cfg = load_config(MILTrainConfig, args.config, flag_overrides(args))
    run_dir = train_mil(cfg, on_epoch=print_epoch)
    summary = run_dir / "summary.json"
    left = json.loads(summary.read_text()).get("skipped_slides", {}) if summary.is_file() else {}
    if left:
        print(f"{len(left)} slides left out (missing, empty or damaged bags; see {summary})")
    print(f"run folder: {run_dir} (metrics.csv, best.pt, last.pt, curves.png)")
    return 0
