"""Tissue detection shared by all methods: read a low-resolution image, threshold, clean up.

Sizes are physical (µm, µm²) and converted to mask pixels with the mask's mpp; when a slide has
no mpp the mask is made at a fixed size and the pixel fallbacks are used.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from slidestream.errors import ConfigError
from slidestream.io.base import Slide
from slidestream.tissue.mask import TissueMask

__all__ = ["TissueDetector"]

_FALLBACK_MASK_SIZE = 2048  # longer side of the mask when the slide has no mpp
_FALLBACK_MPP = 8.0  # µm per mask pixel assumed for sizes when the slide has no mpp


@dataclass(frozen=True)
class TissueDetector(ABC):
    """Base of tissue detectors: subclasses implement :meth:`threshold`."""

    name: ClassVar[str] = ""
    mask_mpp: float = 8.0  # µm per mask pixel
    blur_um: float = 16.0  # Gaussian sigma before thresholding
    closing_um: float = 24.0  # radius of the closing that bridges small gaps
    opening_um: float = 8.0  # radius of the opening that removes specks
    min_object_um2: float = 40_000.0  # tissue pieces smaller than this are dropped (0.04 mm²)
    max_hole_um2: float = 40_000.0  # holes smaller than this are filled

    def __post_init__(self) -> None:
        if not self.mask_mpp > 0:
            raise ConfigError(f"mask_mpp must be positive, got {self.mask_mpp}")
        for key in ("blur_um", "closing_um", "opening_um", "min_object_um2", "max_hole_um2"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")

    def params(self) -> dict[str, Any]:
        return asdict(self)

    @abstractmethod
    def threshold(self, rgb: np.ndarray, sigma_px: float) -> np.ndarray:
        """Boolean tissue map of an (H, W, 3) uint8 image, before morphological clean-up."""

    def detect(self, slide: Slide) -> TissueMask:
        """The tissue mask of ``slide`` (empty, not an error, for an all-background slide)."""
        w0, h0 = slide.dimensions
        mpp = slide.mpp
        if mpp is not None:
            size = math.ceil(max(w0 * mpp[0], h0 * mpp[1]) / self.mask_mpp)
        else:
            size = _FALLBACK_MASK_SIZE
        size = max(1, min(size, max(w0, h0)))
        rgb = slide.thumbnail(size)
        mask_mpp = mpp[0] * w0 / rgb.shape[1] if mpp is not None else None
        um = 1.0 / (mask_mpp if mask_mpp is not None else _FALLBACK_MPP)  # mask px per µm
        tissue = self.threshold(rgb, self.blur_um * um)
        tissue = _clean(
            tissue,
            self.closing_um * um,
            self.opening_um * um,
            self.min_object_um2 * um * um,
            self.max_hole_um2 * um * um,
        )
        return TissueMask(tissue, (w0, h0), mask_mpp, self.name, self.params())


def _disk(radius: float) -> np.ndarray | None:
    r = int(round(radius))
    if r < 1:
        return None
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx * xx + yy * yy) <= r * r


def _clean(
    tissue: np.ndarray,
    closing_px: float,
    opening_px: float,
    min_object_px: float,
    max_hole_px: float,
) -> np.ndarray:
    from scipy import ndimage
    from skimage import morphology

    if not tissue.any():
        return tissue
    pad = int(round(max(closing_px, opening_px))) + 1
    work = np.pad(tissue, pad)  # so closing does not glue tissue to the border
    if (se := _disk(closing_px)) is not None:
        work = ndimage.binary_closing(work, structure=se)
    if (se := _disk(opening_px)) is not None:
        work = ndimage.binary_opening(work, structure=se)
    work = work[pad:-pad, pad:-pad]
    if max_hole_px >= 1:
        work = _compat(morphology.remove_small_holes, work, int(max_hole_px))
    if min_object_px >= 1:
        work = _compat(morphology.remove_small_objects, work, int(min_object_px))
    return work


def _compat(fn: Any, arr: np.ndarray, size: int) -> np.ndarray:
    """scikit-image renamed the size argument (``max_size`` in 0.26, removes <= size)."""
    try:
        return fn(arr, max_size=size)
    except TypeError:
        return fn(arr, size + 1)
