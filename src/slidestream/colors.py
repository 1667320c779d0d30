"""Class colours as a function of the class name: one table for GeoJSON annotations and
predictions, viewers and the report, so that a class looks the same wherever it appears (a
tumour annotation and a tumour prediction imported together into QuPath do not clash)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["class_color", "class_colors", "hex_color", "write_colors"]

# well-known pathology classes (case-insensitive), colour-blind-safe where possible
_KNOWN = {
    "tumour": (220, 50, 32),
    "tumor": (220, 50, 32),
    "cancer": (220, 50, 32),
    "carcinoma": (220, 50, 32),
    "normal": (0, 158, 115),
    "benign": (0, 158, 115),
    "healthy": (0, 158, 115),
    "stroma": (230, 159, 0),
    "inflamed": (0, 114, 178),
    "immune": (0, 114, 178),
    "lymphocytes": (0, 114, 178),
    "necrosis": (86, 86, 86),
    "other": (150, 150, 150),
    "background": (200, 200, 200),
}
_PALETTE = [
    (204, 121, 167), (86, 180, 233), (240, 228, 66), (117, 112, 179), (166, 86, 40),
    (27, 158, 119), (231, 41, 138), (102, 166, 30), (230, 171, 2), (31, 120, 180),
]  # fmt: skip


def class_color(name: str) -> tuple[int, int, int]:
    """RGB of a class name: a fixed colour for well-known classes, otherwise one picked by a
    hash of the lower-cased name (stable across runs and machines). A ``prefix:`` (as in
    ``salient:tumour``) is ignored."""
    key = str(name).split(":")[-1].strip().lower()
    if key in _KNOWN:
        return _KNOWN[key]
    digest = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16)
    return _PALETTE[digest % len(_PALETTE)]


def hex_color(name: str) -> str:
    r, g, b = class_color(name)
    return f"#{r:02x}{g:02x}{b:02x}"


def class_colors(names: Iterable[str]) -> dict[str, str]:
    """``{name: "#rrggbb"}`` for each class name."""
    return {str(n): hex_color(n) for n in names}


def write_colors(folder: str | os.PathLike[str], names: Iterable[str]) -> Path:
    """Save the colours of ``names`` as ``folder/colors.json``."""
    path = Path(folder) / "colors.json"
    path.write_text(json.dumps(class_colors(names), indent=1))
    return path
