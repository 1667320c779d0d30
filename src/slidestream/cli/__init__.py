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

# what an interrupted command leaves behind, where every file it writes is replaced atomically
_RESUME = "re-run the same command to continue"
_AFTER_INTERRUPT = {
    "features": f"finished feature files are kept, none half-written; {_RESUME}",
    "patches": f"finished slides are kept in DB.h5.parts/, none half-written; {_RESUME}",
    "prepare": f"finished slides are kept, none half-written; {_RESUME}",
    "tissue": "masks and QC images written so far are whole",
    "synth": "no half-written slide was left",
    "train": f"last.pt holds the last finished epoch, no checkpoint is half-written; {_RESUME}",
}
_AFTER_INTERRUPT["train-patches"] = _AFTER_INTERRUPT["train-mil"] = _AFTER_INTERRUPT["train"]
_FORK_HOOK: list[bool] = []


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
    _workers_ignore_ctrl_c()
    try:
        return int(args.func(args) or 0)
    except SlideStreamError as exc:
        print(f"slidestream {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _close_progress_bars()
        what = _AFTER_INTERRUPT.get(args.command)
        print(
            f"slidestream {args.command}: interrupted" + (f"; {what}" if what else ""),
            file=sys.stderr,
        )
        return 130


def _workers_ignore_ctrl_c() -> None:
    """Processes forked by a command (DataLoader workers) ignore SIGINT: Ctrl-C reaches the whole
    process group, and the command stops its workers itself, without a traceback from each."""
    if not _FORK_HOOK:
        import os
        import signal

        os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        _FORK_HOOK.append(True)


def _close_progress_bars() -> None:
    """End open tqdm bars so the interrupt line starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
