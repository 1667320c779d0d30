"""Patch samplers: where to read patches of a slide, in level-0 pixels.

A sampler is a validated, immutable description (patch size, target mpp, minimum tissue). For one
slide it yields :class:`PatchLocation` s through :meth:`PatchSampler.iter_locations`, given the
slide, its tissue mask and a numpy ``Generator``; all randomness comes from that generator.

Locations are aligned to the pixel grid of the pyramid level the patch will be read from, so a
patch at an mpp that a level provides is decoded exactly as stored, with no resampling (drawing
level-0 coordinates without that alignment made most reads resample in a peer library).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from slidestream.errors import ConfigError
from slidestream.io.base import Slide
from slidestream.tissue.mask import TissueMask

__all__ = ["LocationArrays", "PatchLocation", "PatchSampler", "PatchGeometry"]


@dataclass(frozen=True)
class PatchLocation:
    """Top-left corner ``(x, y)`` in level-0 pixels, the patch's tissue fraction and its label
    (a class name from annotations, else None: the slide's label applies)."""

    x: int
    y: int
    tissue_fraction: float
    label: str | None = None


@dataclass(frozen=True)
class PatchGeometry:
    """How a patch maps onto one slide: level-0 extent, read level and alignment step."""

    size0: tuple[float, float]  # level-0 pixels covered by the patch along x and y
    step: float  # level-0 grid the corner snaps to (the read level's downsample, or 1)
    mpp: float | None  # µm per output pixel (None: the slide's native pixels)

    def snap(self, x: np.ndarray, y: np.ndarray, dims: tuple[int, int]) -> tuple[np.ndarray, ...]:
        """Clip corners into the slide and align them to the read level's grid."""
        w0, h0 = dims
        x = np.clip(x, 0, max(0.0, w0 - self.size0[0]))
        y = np.clip(y, 0, max(0.0, h0 - self.size0[1]))
        return (np.floor(x / self.step) * self.step).astype(np.int64), (
            np.floor(y / self.step) * self.step
        ).astype(np.int64)


@dataclass(frozen=True)
class PatchSampler(ABC):
    """Base of samplers: ``size`` output pixels square at ``mpp`` µm/px (None = native pixels),
    keeping patches whose tissue fraction is at least ``min_tissue``."""

    size: int = 256
    mpp: float | None = 0.5
    min_tissue: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"size must be a positive integer of pixels, got {self.size!r}")
        if self.mpp is not None and not self.mpp > 0:
            raise ConfigError(f"mpp must be positive (µm per pixel) or None, got {self.mpp!r}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"min_tissue must be in [0, 1], got {self.min_tissue!r}")

    def geometry(self, slide: Slide) -> PatchGeometry:
        """Level-0 footprint and grid of this sampler's patches on ``slide``."""
        if self.mpp is None:
            return PatchGeometry((float(self.size), float(self.size)), 1.0, None)
        mpp_x, mpp_y = slide.require_mpp()
        sx, sy = self.mpp / mpp_x, self.mpp / mpp_y
        level = slide.best_level_for_downsample(min(sx, sy))
        ds = slide.level_downsamples[level]
        exact = math.isclose(sx, ds, rel_tol=1e-9) and math.isclose(sy, ds, rel_tol=1e-9)
        return PatchGeometry((self.size * sx, self.size * sy), ds if exact else 1.0, self.mpp)

    def read(self, slide: Slide, loc: PatchLocation) -> np.ndarray:
        """The (size, size, 3) uint8 pixels of ``loc``."""
        if self.mpp is None:
            return slide.read(loc.x, loc.y, self.size, self.size)
        return slide.read(loc.x, loc.y, self.size, self.size, mpp=self.mpp)

    @property
    def with_replacement(self) -> bool:
        """True (the default) when a slide's locations may repeat, so a stream restarts a slide
        that comes back with a fresh iterator. A sampler whose slides run dry returns False, and
        its ``iter_locations`` must then return an iterator that holds neither the slide nor its
        mask: a stream keeps it while the slide is closed and resumes it where it stopped."""
        return True

    @abstractmethod
    def iter_locations(
        self,
        slide: Slide,
        mask: TissueMask,
        rng: np.random.Generator,
        annotations: object | None = None,
    ) -> Iterator[PatchLocation]:
        """Patch locations of one slide (finite or endless, depending on the sampler)."""


class LocationArrays:
    """Iterator over patch locations kept as compact arrays (int64 x, y; float32 fraction):
    ~20 bytes per location, so a paused slide costs little. Holds no slide or mask."""

    def __init__(self, x: np.ndarray, y: np.ndarray, frac: np.ndarray) -> None:
        self.x, self.y = np.asarray(x, np.int64), np.asarray(y, np.int64)
        self.frac = np.asarray(frac, np.float32)
        self.next_index = 0

    def __iter__(self) -> LocationArrays:
        return self

    def __next__(self) -> PatchLocation:
        i = self.next_index
        if i >= len(self.x):
            raise StopIteration
        self.next_index = i + 1
        return PatchLocation(int(self.x[i]), int(self.y[i]), float(self.frac[i]))

    def __len__(self) -> int:
        return len(self.x) - self.next_index


def tissue_centres(
    mask: TissueMask, rng: np.random.Generator, n: int, pixels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniform over the tissue of ``mask`` (or over ``pixels``, flat mask indices),
    in level-0 pixels."""
    flat = np.flatnonzero(mask.mask) if pixels is None else pixels
    pick = flat[rng.integers(0, len(flat), n)]
    rows, cols = np.divmod(pick, mask.mask.shape[1])
    dx, dy = mask.downsample
    return (cols + rng.random(n)) * dx, (rows + rng.random(n)) * dy
