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


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a 2-D float image with edge pixels repeated: the kernel of
    ``scipy.ndimage.gaussian_filter`` (radius ``4 sigma``), in OpenCV (~5x faster)."""
    import cv2

    k = 2 * int(4.0 * sigma + 0.5) + 1
    return cv2.GaussianBlur(image, (k, k), sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)


def _disk(radius: float) -> np.ndarray | None:
    r = int(round(radius))
    if r < 1:
        return None
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return ((xx * xx + yy * yy) <= r * r).astype(np.uint8)


def _clean(
    tissue: np.ndarray,
    closing_px: float,
    opening_px: float,
    min_object_px: float,
    max_hole_px: float,
) -> np.ndarray:
    """Closing, opening, then holes and objects of at most the given areas removed (4-connected).

    OpenCV's binary morphology and connected components: ~10x faster than SciPy and
    scikit-image on a mask, with the same result (disk-shaped structuring elements).
    """
    import cv2

    if not tissue.any():
        return tissue
    pad = int(round(max(closing_px, opening_px))) + 1
    work = np.pad(tissue.astype(np.uint8), pad)  # so closing does not glue tissue to the border
    if (se := _disk(closing_px)) is not None:
        work = cv2.morphologyEx(work, cv2.MORPH_CLOSE, se)
    if (se := _disk(opening_px)) is not None:
        work = cv2.morphologyEx(work, cv2.MORPH_OPEN, se)
    work = work[pad:-pad, pad:-pad]
    if max_hole_px >= 1:
        work = 1 - _remove_small(1 - work, int(max_hole_px))
    if min_object_px >= 1:
        work = _remove_small(work, int(min_object_px))
    return work.astype(bool)


def _remove_small(binary: np.ndarray, max_size: int) -> np.ndarray:
    """``binary`` (uint8 0/1) without its 4-connected components of ``max_size`` px or fewer."""
    import cv2

    _, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=4)
    keep = stats[:, cv2.CC_STAT_AREA] > max_size
    keep[0] = False  # label 0 is the background
    return keep.astype(np.uint8)[labels]
