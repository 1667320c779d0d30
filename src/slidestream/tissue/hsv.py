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
    """Tissue has HSV saturation above Otsu's threshold of the blurred saturation channel.

    The threshold is computed over plausible pixels only (dark, blackish and blue/green ink
    pixels and their rims are left out; see :mod:`slidestream.tissue.pixels`). Faint tissue is
    kept: pixels above a lower threshold, ``faint_margin`` above the median saturation of the
    pixels below Otsu's, count too when they lie away from ordinary tissue. Both thresholds are
    at least ``min_saturation``. Unlike ``otsu``, darkness plays no part: dark but grey-ish
    tissue (folds, dense debris) may be dropped. ``min_value`` is the darkest brightest-channel
    value (0-1) tissue may have; ``drop_ink=False`` keeps ink-coloured pixels.
    """

    name: ClassVar[str] = "hsv"
    min_saturation: float = 0.03
    min_value: float = 0.2
    faint_margin: float = 0.015
    drop_ink: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("min_saturation", "min_value", "faint_margin"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{key} must be in [0, 1), got {getattr(self, key)}")

    def threshold(self, rgb: np.ndarray, sigma_px: float) -> np.ndarray:
        from slidestream.tissue.pixels import hysteresis, otsu_thresholds, pixel_features

        feat = pixel_features(rgb, sigma_px, self.min_value, self.drop_ink)
        sat = feat.saturation[feat.plausible]
        if sat.size < 2 or float(sat.max()) < self.min_saturation:
            return np.zeros(feat.saturation.shape, bool)
        floor = feat.saturation_floor(self.min_saturation)
        thr = otsu_thresholds(sat, None, self.faint_margin, floor)
        score = np.where(feat.plausible, feat.saturation, -np.inf)
        return hysteresis(score, thr, 3.0 * sigma_px)
