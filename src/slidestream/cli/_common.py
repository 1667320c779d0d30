"""Helpers shared by CLI subcommands (console output lives here, never in the library)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = [
    "add_backend_option",
    "add_slide_mpp_option",
    "add_slide_options",
    "count",
    "load_slides",
    "warning_line",
    "damaged_lines",
    "error_line",
    "positive_float",
]


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
    """``--backend`` and ``--slide-mpp`` (in every command ``--mpp`` is an output resolution)."""
    add_backend_option(parser)
    add_slide_mpp_option(parser)


def add_slide_mpp_option(parser: argparse.ArgumentParser) -> None:
    """``--slide-mpp``: the slides' level-0 µm/px (where ``--mpp`` means the output's)."""
    parser.add_argument(
        "--slide-mpp",
        type=positive_float,
        default=None,
        metavar="UM",
        help="µm per level-0 pixel of the slides, overriding the files' (a cohort CSV's mpp "
        "column wins over it); for slides that carry none or a wrong one",
    )


def load_slides(command: str, sources: Sequence[str | os.PathLike[str]]) -> Any:
    """The cohort of a command's slide arguments (a CSV/TSV, paths, folders, globs). Its
    problems are printed once, one line each; with no slide left, a ConfigError says so
    before the command writes anything."""
    import logging

    from slidestream.errors import ConfigError
    from slidestream.sampling import load_cohort

    logger = logging.getLogger("slidestream.sampling.cohort")
    level = logger.level
    logger.setLevel(logging.ERROR)  # printed below instead, once
    try:
        cohort = load_cohort(sources[0] if len(sources) == 1 else list(sources))
    finally:
        logger.setLevel(level)
    if not len(cohort):
        why = "; ".join(cohort.problems) or "it lists no slide"
        raise ConfigError(f"no slides to process in {' '.join(map(str, sources))}: {why}")
    for problem in cohort.problems:
        error_line(command, f"{problem} (left out)")
    for warning in cohort.warnings:
        error_line(command, warning)
    return cohort


def damaged_lines(command: str, damaged: dict[str, int], unit: str) -> None:
    """One stderr line per slide with unreadable regions that were left out."""
    for slide, n in sorted(damaged.items()):
        print(
            f"slidestream {command}: warning: {slide}: {count(n, unit)} "
            f"with undecodable pixels left out",
            file=sys.stderr,
        )


def count(n: int, word: str, plural: str | None = None) -> str:
    """``"1 slide"``, ``"2 slides"``, ``"0 slides"``."""
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def warning_line(command: str, message: str) -> None:
    """One warning line on stderr."""
    print(f"slidestream {command}: warning: {' '.join(str(message).split())}", file=sys.stderr)


def error_line(command: str, message: str) -> None:
    """One line on stderr, no traceback."""
    print(f"slidestream {command}: error: {' '.join(str(message).split())}", file=sys.stderr)


def add_stain_options(p: argparse.ArgumentParser) -> None:
    """``--stain-norm`` and ``--stain-target`` (see :func:`slidestream.data.stain.load_stain_target`)."""
    p.add_argument(
        "--stain-norm",
        choices=["macenko", "reinhard", "vahadane"],
        default=None,
        help="stain-normalise every patch to --stain-target",
    )
    p.add_argument(
        "--stain-target",
        default=None,
        metavar="PATH",
        help="image, slide (tissue at the patches' mpp) or stain.json to normalise to; "
        "the fitted target is saved as stain.json with the output",
    )
