"""Otsu tissue detection on blurred greyscale, over the pixels that can be tissue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from slidestream.errors import ConfigError
from slidestream.tissue.base import TissueDetector

__all__ = ["OtsuDetector"]


@dataclass(frozen=True)
class OtsuDetector(TissueDetector):
    """Tissue is darker than Otsu's threshold of the blurred grey image, and coloured.

    The threshold is computed over plausible pixels only (dark, blackish and blue/green ink
    pixels are left out; see :mod:`slidestream.tissue.pixels`), and lowered to at most
    ``faint_margin`` grey levels below the median of the grey background (glass), so faint,
    pale tissue is kept. Pixels with HSV saturation below ``min_saturation`` (glass, grey or
    unscanned areas, gradients) and brighter than ``max_threshold`` (grey level 0-255) are never
    tissue; ``min_contrast`` is the grey-level spread (1st to 99th percentile of plausible
    pixels) below which the slide counts as empty. ``min_value`` is the darkest brightest-channel
    value (0-1) tissue may have; ``drop_ink=False`` keeps ink-coloured pixels.
    """

    name: ClassVar[str] = "otsu"
    max_threshold: float = 250.0
    min_contrast: float = 12.0
    min_saturation: float = 0.03
    faint_margin: float = 8.0
    min_value: float = 0.2
    drop_ink: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.max_threshold <= 255:
            raise ConfigError(f"max_threshold must be in (0, 255], got {self.max_threshold}")
        _check_unit("min_saturation", self.min_saturation)
        _check_unit("min_value", self.min_value)
        if self.faint_margin < 0:
            raise ConfigError(f"faint_margin must be >= 0 grey levels, got {self.faint_margin}")

    def threshold(self, rgb: np.ndarray, sigma_px: float) -> np.ndarray:
        from slidestream.tissue.pixels import hysteresis, otsu_thresholds, pixel_features

        feat = pixel_features(rgb, sigma_px, self.min_value, self.drop_ink)
        score = 255.0 - feat.grey + feat.chroma  # darkness plus colour, grey levels
        plausible = score[feat.plausible]
        if plausible.size < 2 or np.ptp(np.percentile(plausible, [1, 99])) < self.min_contrast:
            return np.zeros(score.shape, bool)
        glass = score[feat.background(self.min_saturation)]
        thr = otsu_thresholds(plausible, glass, self.faint_margin, 255.0 - self.max_threshold)
        coloured = feat.plausible & (feat.saturation >= self.min_saturation)
        return hysteresis(np.where(coloured, score, -np.inf), thr, 3.0 * sigma_px)


def _check_unit(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"{name} must be in [0, 1), got {value}")
