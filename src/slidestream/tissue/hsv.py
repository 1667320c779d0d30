"""HSV saturation tissue detection: stained tissue is coloured, glass and background are grey."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from slidestream.errors import ConfigError
from slidestream.tissue.base import TissueDetector

__all__ = ["HSVDetector"]


@dataclass(frozen=True)
class HSVDetector(TissueDetector):
    """Tissue has saturation above Otsu's threshold of the blurred saturation channel, and at
    least ``min_saturation``; pixels darker than ``min_value`` (pen, dust, black borders) are
    excluded.
    """

    name: ClassVar[str] = "hsv"
    min_saturation: float = 0.07
    min_value: float = 0.15

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.min_saturation < 1:
            raise ConfigError(f"min_saturation must be in [0, 1), got {self.min_saturation}")

    def threshold(self, rgb: np.ndarray, sigma_px: float) -> np.ndarray:
        from skimage.color import rgb2hsv
        from skimage.filters import threshold_otsu

        from slidestream.tissue.base import gaussian_blur

        hsv = rgb2hsv(rgb)
        sat, val = hsv[..., 1], hsv[..., 2]
        if sigma_px > 0.3:
            sat = gaussian_blur(sat.astype(np.float32), sigma_px)
        if float(sat.max()) < self.min_saturation:
            return np.zeros(sat.shape, bool)
        thr = max(float(threshold_otsu(sat)), self.min_saturation)
        return (sat > thr) & (val > self.min_value)
