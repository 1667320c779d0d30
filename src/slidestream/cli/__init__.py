"""The ``slidestream`` command line.

Each subcommand lives in its own module exposing ``register(subparsers)`` (adds its parser and sets
``func=run``) and ``run(args) -> int``. Module top levels stay light (argparse only); heavy imports
happen inside ``run`` so ``slidestream --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from slidestream._version import __version__

# Subcommand modules, in the order they appear in --help.
_COMMANDS = (
    "demo",
    "report",
    "info",
    "tissue",
    "synth",
    "patches_preview",
    "patches",
    "train_patches",
    "prepare",
    "train",
    "features",
    "train_mil",
    "predict",
    "check_streaming",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slidestream",
        description="Deep learning on gigapixel whole-slide images.",
    )
    parser.add_argument("--version", action="version", version=f"slidestream {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"slidestream.cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand module not present in this build
            if exc.name != f"slidestream.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from slidestream.errors import SlideStreamError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.verbose < 2:  # libvips repeats every decode error as a warning; ours is clearer
        logging.getLogger("pyvips").setLevel(logging.ERROR)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SlideStreamError as exc:
        print(f"slidestream {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("slidestream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
