"""Random patches uniform over tissue, with or without replacement."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from slidestream.errors import ConfigError
from slidestream.io.base import Slide
from slidestream.sampling.base import LocationArrays, PatchLocation, PatchSampler, tissue_centres
from slidestream.tissue.mask import TissueMask

__all__ = ["RandomPatchSampler"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RandomPatchSampler(PatchSampler):
    """Patches whose centres are uniform over the tissue.

    With ``replacement=True`` (default) the stream of a slide is endless and may repeat a place.
    Without replacement, the slide is cut into a grid of non-overlapping patches (shifted by a
    random offset, so each epoch cuts differently), whose tissue patches are visited in random
    order, each once; the slide then runs dry.
    ``max_tries`` rounds of rejection sampling are allowed before a slide with too little
    qualifying tissue is given up.
    """

    replacement: bool = True
    batch: int = 64  # candidates drawn at once
    max_tries: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch < 1 or self.max_tries < 1:
            raise ConfigError(
                f"batch and max_tries must be >= 1, got {self.batch}, {self.max_tries}"
            )

    def iter_locations(
        self,
        slide: Slide,
        mask: TissueMask,
        rng: np.random.Generator,
        annotations: object | None = None,
    ) -> Iterator[PatchLocation]:
        if mask.is_empty:
            return iter(())
        if self.replacement:
            return self._endless(slide, mask, rng)
        return self._once_each(slide, mask, rng)

    @property
    def with_replacement(self) -> bool:
        return self.replacement

    def _endless(
        self, slide: Slide, mask: TissueMask, rng: np.random.Generator
    ) -> Iterator[PatchLocation]:
        geo = self.geometry(slide)
        (sx, sy), pixels = geo.size0, np.flatnonzero(mask.mask)
        misses = 0
        while misses < self.max_tries:
            cx, cy = tissue_centres(mask, rng, self.batch, pixels)
            x, y = geo.snap(cx - sx / 2, cy - sy / 2, slide.dimensions)
            frac = mask.region_fraction(x, y, sx, sy)
            keep = np.flatnonzero(frac >= self.min_tissue)
            misses = 0 if len(keep) else misses + 1
            for i in keep:
                yield PatchLocation(int(x[i]), int(y[i]), float(frac[i]))
        log.info(
            "%s: no patch with >= %.0f%% tissue in %d tries; giving up on the slide",
            slide.path.name,
            100 * self.min_tissue,
            self.max_tries * self.batch,
        )

    def _once_each(
        self, slide: Slide, mask: TissueMask, rng: np.random.Generator
    ) -> Iterator[PatchLocation]:  # not a generator: the cut is made now
        geo = self.geometry(slide)
        (sx, sy), (w0, h0), step = geo.size0, slide.dimensions, geo.step
        # cells a whole number of grid steps apart never overlap after snapping
        px, py = math.ceil(sx / step - 1e-9) * step, math.ceil(sy / step - 1e-9) * step
        ox = math.floor(rng.random() * px / step) * step
        oy = math.floor(rng.random() * py / step) * step
        xs = np.arange(ox, w0 - sx + 1e-6, px)
        ys = np.arange(oy, h0 - sy + 1e-6, py)
        gx, gy = np.meshgrid(xs, ys)
        x, y = geo.snap(gx.ravel(), gy.ravel(), slide.dimensions)
        frac = mask.region_fraction(x, y, sx, sy)
        order = rng.permutation(np.flatnonzero(frac >= self.min_tissue))
        return LocationArrays(x[order], y[order], frac[order])
