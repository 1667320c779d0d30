"""A deterministic grid of patches over tissue, for inference and patch databases."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from slidestream.errors import ConfigError
from slidestream.io.base import Slide
from slidestream.sampling.base import LocationArrays, PatchLocation, PatchSampler
from slidestream.tissue.mask import TissueMask

__all__ = ["GridPatchSampler"]


@dataclass(frozen=True)
class GridPatchSampler(PatchSampler):
    """Row-major grid of patches with a ``stride`` in output pixels (default: ``size``, no
    overlap; ``overlap`` is the alternative way to say it), keeping those with at least
    ``min_tissue``. The order is deterministic; the generator is not used.

    ``cover_edges``: continue the grid over the slide's right and bottom edges, so that the
    last, partial row and column are covered too (those patches extend past the slide, read as
    white, and their tissue fraction is measured over the part inside the slide). Without it,
    the grid holds only patches that lie wholly inside the slide.
    """

    stride: int | None = None
    overlap: int = 0
    cover_edges: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stride is not None and self.overlap:
            raise ConfigError("give stride or overlap, not both")
        if not 0 <= self.overlap < self.size:
            raise ConfigError(f"overlap must be in [0, size), got {self.overlap}")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"stride must be a positive number of pixels, got {self.stride}")

    @property
    def step(self) -> int:
        """Grid step in output pixels."""
        return self.stride if self.stride is not None else self.size - self.overlap

    def locations(self, slide: Slide, mask: TissueMask | None) -> np.ndarray:
        """(N, 3) array of x, y (level-0 px) and tissue fraction of every kept grid patch."""
        geo = self.geometry(slide)
        (sx, sy), (w0, h0) = geo.size0, slide.dimensions
        rows, cols = self.grid_shape(slide)
        step_x, step_y = self.step * sx / self.size, self.step * sy / self.size
        gx, gy = np.meshgrid(np.arange(cols) * step_x, np.arange(rows) * step_y)
        bounds = (w0 + sx, h0 + sy) if self.cover_edges else slide.dimensions
        x, y = geo.snap(gx.ravel(), gy.ravel(), bounds)
        frac = mask.region_fraction(x, y, sx, sy) if mask is not None else np.ones(len(x))
        if mask is not None and self.cover_edges:  # over the part of the patch in the slide
            inside = np.clip(w0 - x, 0, sx) * np.clip(h0 - y, 0, sy) / (sx * sy)
            frac = np.minimum(np.asarray(frac) / np.maximum(inside, 1e-9), 1.0)
        keep = frac >= self.min_tissue if mask is not None else np.ones(len(x), bool)
        return np.stack([x[keep], y[keep], np.asarray(frac)[keep]], axis=1)

    def grid_shape(self, slide: Slide) -> tuple[int, int]:
        """(rows, cols) of the full grid before the tissue filter (a heatmap's shape)."""
        (sx, sy), (w0, h0) = self.geometry(slide).size0, slide.dimensions
        step_x, step_y = self.step * sx / self.size, self.step * sy / self.size
        if self.cover_edges:
            return (
                max(1, int(np.ceil(h0 / step_y - 1e-6))),
                max(1, int(np.ceil(w0 / step_x - 1e-6))),
            )
        return (
            int(np.floor(max(h0 - sy, 0.0) / step_y + 1e-6)) + 1,
            int(np.floor(max(w0 - sx, 0.0) / step_x + 1e-6)) + 1,
        )

    def iter_locations(
        self,
        slide: Slide,
        mask: TissueMask,
        rng: np.random.Generator | None = None,
        annotations: object | None = None,
    ) -> Iterator[PatchLocation]:
        locs = self.locations(slide, mask)  # computed now: the iterator holds arrays only
        return LocationArrays(locs[:, 0], locs[:, 1], locs[:, 2])

    @property
    def with_replacement(self) -> bool:
        return False
