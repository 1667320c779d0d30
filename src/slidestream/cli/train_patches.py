"""``slidestream train-patches``: train a patch classifier from a database or from slides."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from slidestream.train.config import add_config_flags
    from slidestream.train.patch_config import PatchTrainConfig

    p = sub.add_parser(
        "train-patches",
        help="train a patch classifier (DenseNet & co.)",
        description="Train a torchvision (or timm/) classifier on patches from an "
        "HDF5 database (slidestream patches) or straight from a "
        "cohort CSV (PatchStream). Every config key is also a flag; "
        "re-running the same --name resumes.",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="YAML with config keys")
    add_config_flags(p, PatchTrainConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidestream.train.config import flag_overrides, load_config
    from slidestream.train.patch_config import PatchTrainConfig
    from slidestream.train.patches import train_patches

    cfg = load_config(PatchTrainConfig, args.config, flag_overrides(args))
    from slidestream.cli.train import print_epoch

    run_dir = train_patches(cfg, on_epoch=print_epoch)
    print(f"run folder: {run_dir} (metrics.csv, best.pt, last.pt, curves.png, tensorboard/)")
    return 0
