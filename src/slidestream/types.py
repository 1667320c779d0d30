"""Small frozen value types shared across layers. Units are in the field names."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["SlideInfo"]


@dataclass(frozen=True)
class SlideInfo:
    """What a slide is, independent of the backend that reads it.

    ``level_dimensions`` are (width, height) in pixels of each pyramid level; ``level_downsamples``
    are level-0 pixels per level pixel; ``mpp_x``/``mpp_y`` are microns per level-0 pixel, or None
    when the file does not say and no override was given.
    """

    path: str
    width: int
    height: int
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float | None
    mpp_y: float | None
    vendor: str
    backend: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["level_dimensions"] = [list(wh) for wh in self.level_dimensions]
        d["level_downsamples"] = list(self.level_downsamples)
        return d
