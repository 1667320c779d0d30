"""Helpers shared by CLI subcommands (console output lives here, never in the library)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_backend_option", "add_slide_options", "error_line", "positive_float"]


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_backend_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "pyvips", "tiffslide", "openslide", "image"],
        help="slide reader (default: auto, the fastest that opens the file)",
    )


def add_slide_options(parser: argparse.ArgumentParser) -> None:
    add_backend_option(parser)
    parser.add_argument(
        "--mpp",
        type=positive_float,
        default=None,
        help="microns per pixel of level 0, overriding (or supplying) the file's",
    )


def error_line(command: str, message: str) -> None:
    """One line on stderr, no traceback."""
    print(f"slidestream {command}: error: {' '.join(str(message).split())}", file=sys.stderr)
