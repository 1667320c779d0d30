"""Otsu tissue detection on blurred greyscale (as in histo-fetch: blur, Otsu, clean-up)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from slidestream.errors import ConfigError
from slidestream.tissue.base import TissueDetector

__all__ = ["OtsuDetector"]


@dataclass(frozen=True)
class OtsuDetector(TissueDetector):
    """Tissue is darker than Otsu's threshold of the blurred grey image.

    ``max_threshold`` caps the threshold (grey level 0-255) so that a slide that is nearly all
    background is not split along JPEG noise; ``min_contrast`` is the grey-level spread (1st to
    99th percentile) below which the slide counts as empty.
    """

    name: ClassVar[str] = "otsu"
    max_threshold: float = 235.0
    min_contrast: float = 12.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.max_threshold <= 255:
            raise ConfigError(f"max_threshold must be in (0, 255], got {self.max_threshold}")

    def threshold(self, rgb: np.ndarray, sigma_px: float) -> np.ndarray:
        from skimage.filters import threshold_otsu

        from slidestream.tissue.base import gaussian_blur

        grey = rgb.astype(np.float32) @ np.array([0.2125, 0.7154, 0.0721], np.float32)
        if sigma_px > 0.3:
            grey = gaussian_blur(grey, sigma_px)
        lo, hi = np.percentile(grey, [1, 99])
        if hi - lo < self.min_contrast:
            return np.zeros(grey.shape, bool)
        thr = min(float(threshold_otsu(grey)), self.max_threshold)
        return grey < thr
