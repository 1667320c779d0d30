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
    """Tissue scores above Otsu's threshold of a blurred darkness-plus-colour score.

    The score is ``(glass - grey) + (max - min channel)`` in grey levels, where ``glass`` is the
    local grey level of the glass (so illumination gradients cancel; 255 when no glass is
    seen): tissue stands out by being darker or more coloured than glass. Otsu's threshold is computed over plausible pixels
    only (dark, blackish and blue/green ink pixels and their rims are left out; see
    :mod:`slidestream.tissue.pixels`). Faint tissue is kept: pixels above a lower threshold,
    ``faint_margin`` grey levels above the median score of the glass, count too when they lie
    away from ordinary tissue (so its blurred rim does not widen the mask). Pixels with HSV
    saturation below ``min_saturation`` (glass, grey or unscanned areas, gradients, unstained
    tissue) are never tissue. ``max_threshold`` (0-255) keeps both thresholds at least
    ``255 - max_threshold``; ``min_contrast`` is the score spread (1st to 99th percentile of
    plausible pixels) below which the slide counts as empty. ``min_value`` is the darkest
    brightest-channel value (0-1) tissue may have; ``drop_ink=False`` keeps ink-coloured pixels
    (e.g. IHC, whose counterstain is blue).
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
        # darkness (below the local glass level) plus colour, in grey levels
        score = feat.glass_grey(self.min_saturation) - feat.grey + feat.chroma
        plausible = score[feat.plausible]
        if plausible.size < 2 or _spread(plausible) < self.min_contrast:
            return np.zeros(score.shape, bool)
        glass = score[feat.background(self.min_saturation)]
        thr = otsu_thresholds(plausible, glass, self.faint_margin, 255.0 - self.max_threshold)
        floor = feat.saturation_floor(self.min_saturation)
        coloured = feat.plausible & (feat.saturation >= floor)
        return hysteresis(np.where(coloured, score, -np.inf), thr, 3.0 * sigma_px)


def _check_unit(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"{name} must be in [0, 1), got {value}")


def _spread(values: np.ndarray) -> float:
    """1st to 99th percentile range of ``values`` (1-D), from at most ~2 million of them."""
    return float(np.ptp(np.percentile(values[:: max(1, values.size >> 20)], [1, 99])))
