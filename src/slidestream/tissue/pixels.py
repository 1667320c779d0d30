"""Per-pixel colour features of a low-resolution slide image, and the pixels that can be tissue.

Both detectors threshold only *plausible* pixels: a pixel is never tissue when it is

- **dark**: its brightest channel is below ``min_value`` (black canvas of slides converted
  without alpha, pure-black scanner padding, black ink);
- **blackish**: value below 40 % and saturation below 30 % (black ink, shadows), or darker
  than the glass around it by more than 40 grey levels with a chroma (max - min channel)
  below 0.15x that darkness (grey-black ink, thin or faded: tissue that dark is coloured);
- **ink-coloured**: hue between 70° and 235° (yellow-green, green, cyan, blue) with at least
  20 % saturation, a hue H&E never has (eosin and haematoxylin lie between ~240° and ~30°):
  blue and green marker pens. Red, pink and purple ink share H&E's hues and stay;
- **beside any of the above**: within two blur sigmas of them (their blurred rims, where ink
  or black blends into glass or tissue);
- **grey**: saturation below the detector's floor (glass, unscanned or grey background,
  gradients). Unstained tissue is grey too, and is dropped.

All values here are float32 arrays of shape (H, W); hue in degrees [0, 360), saturation and
value in [0, 1] as in HSV.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PixelFeatures", "hysteresis", "otsu_thresholds", "pixel_features"]

INK_HUE = (70.0, 235.0)  # degrees: yellow-green through blue
INK_MIN_SATURATION = 0.2
BLACKISH = (0.4, 0.3)  # (value below, saturation below): black ink, shadows
GREYISH = (40.0, 0.15)  # darker than the local glass by more than this, chroma below x darkness
GLASS_SATURATION = 0.03  # glass, for GREYISH: plausible pixels less saturated than this
GREY = np.array([0.2125, 0.7154, 0.0721], np.float32)  # luminance weights (ITU-R BT.709)


@dataclass(frozen=True)
class PixelFeatures:
    """Colour features of a blurred (H, W, 3) image and its plausible-tissue map.

    ``grey`` is luminance and ``chroma`` the max - min channel, in [0, 255]; ``saturation``
    and ``value`` as in HSV, in [0, 1]; ``plausible`` is False for dark, blackish and
    ink-coloured pixels (see the module doc).
    """

    grey: np.ndarray
    chroma: np.ndarray
    saturation: np.ndarray
    value: np.ndarray
    plausible: np.ndarray

    def background(self, min_saturation: float) -> np.ndarray:
        """Plausible pixels too grey to be tissue (glass, unscanned background)."""
        return self.plausible & (self.saturation < min_saturation)

    def glass_grey(self, min_saturation: float) -> np.ndarray | float:
        """Local grey level of the glass, an (H, W) map (or 255.0 when no glass is seen):
        glass pixels averaged over ~1/8 of the image, so illumination gradients cancel."""
        import cv2

        glass = self.background(min_saturation)
        if glass.sum() < max(16, glass.size // 200):
            return 255.0
        h, w = glass.shape
        k = 64 / max(h, w)
        small = (max(1, round(w * k)), max(1, round(h * k)))
        weight = cv2.resize(glass.astype(np.float32), small, interpolation=cv2.INTER_AREA)
        total = cv2.resize(self.grey * glass, small, interpolation=cv2.INTER_AREA)
        weight, total = (cv2.GaussianBlur(a, (0, 0), 8.0) for a in (weight, total))
        level = np.where(weight > 1e-3, total / np.maximum(weight, 1e-6), 0.0)
        level[weight <= 1e-3] = float(np.median(self.grey[glass]))
        return cv2.resize(level.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)

    def saturation_floor(self, min_saturation: float) -> float:
        """The least saturation tissue may have: ``min_saturation``, lowered to 3x the median
        saturation of the glass when that is very grey (down to 40 % of ``min_saturation``),
        so that faded tissue on clean glass is kept."""
        glass = self.saturation[self.background(min_saturation)]
        if glass.size < max(16, self.saturation.size // 200):
            return min_saturation
        return float(np.clip(3.0 * np.median(glass), 0.4 * min_saturation, min_saturation))


def pixel_features(
    rgb: np.ndarray, sigma_px: float, min_value: float, drop_ink: bool = True
) -> PixelFeatures:
    """Features of an (H, W, 3) uint8 image after a Gaussian blur of ``sigma_px`` mask pixels.

    ``min_value`` (0-1) is the darkest brightest-channel value a tissue pixel may have;
    ``drop_ink=False`` keeps ink-coloured pixels (e.g. for IHC, whose counterstain is blue).
    """
    import cv2

    f = np.ascontiguousarray(rgb[..., :3], dtype=np.float32)
    if sigma_px > 0.3:  # the kernel of scipy.ndimage.gaussian_filter, edges repeated
        k = 2 * int(4.0 * sigma_px + 0.5) + 1
        f = cv2.GaussianBlur(f, (k, k), sigma_px, sigmaY=sigma_px, borderType=cv2.BORDER_REPLICATE)
    r, g, b = cv2.split(f)
    hi, lo = cv2.max(cv2.max(r, g), b), cv2.min(cv2.min(r, g), b)
    chroma = hi - lo
    value = hi * np.float32(1 / 255)
    saturation = chroma / np.maximum(hi, np.float32(1e-6))
    never = (value < min_value) | ((value < BLACKISH[0]) & (saturation < BLACKISH[1]))
    if drop_ink:  # hue from 8-bit HSV (0-255 for 0-360 degrees): 1.4 degree steps suffice
        hue = cv2.cvtColor(f.astype(np.uint8), cv2.COLOR_RGB2HSV_FULL)[..., 0]
        lo_h, hi_h = (round(h * 256 / 360) for h in INK_HUE)
        never |= (hue > lo_h) & (hue < hi_h) & (saturation >= INK_MIN_SATURATION)
    grey = r * GREY[0] + g * GREY[1] + b * GREY[2]
    first = PixelFeatures(grey, chroma, saturation, value, ~never)
    # much darker than the glass around them but hardly coloured: grey-black ink, thin or
    # faded (tissue that dark is clearly coloured)
    min_dark, ratio = GREYISH
    dark = first.glass_grey(GLASS_SATURATION) - grey
    never |= (dark > min_dark) & (chroma < ratio * dark)
    plausible = ~_grow(never, 2.0 * sigma_px)  # and their blurred rims
    return PixelFeatures(grey, chroma, saturation, value, plausible)


def _grow(binary: np.ndarray, radius_px: float) -> np.ndarray:
    """``binary`` dilated by a disk of ``radius_px``."""
    import cv2

    r = int(round(radius_px))
    if r < 1 or not binary.any():
        return binary
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(binary.astype(np.uint8), disk).astype(bool)


def otsu_thresholds(
    score: np.ndarray, background: np.ndarray | None, margin: float, floor: float
) -> tuple[float, float]:
    """(Otsu's threshold of ``score``, a faint-tissue threshold) for 1-D non-empty ``score``.

    The faint threshold is Otsu's lowered to at most ``margin`` above the median score of
    ``background`` (``None``: the scores below Otsu's threshold); a background of fewer than
    0.5 % of the scores (tissue everywhere) leaves it at Otsu's. Both are at least ``floor``.
    """
    from skimage.filters import threshold_otsu

    score, background = _sample(score), None if background is None else _sample(background)
    thr = float(threshold_otsu(score)) if np.ptp(score) > 0 else float(score[0])
    faint = thr
    if background is None:
        background = score[score < thr]
    if background.size >= max(16, score.size // 200):
        faint = min(thr, float(np.median(background)) + margin)
    return max(thr, floor), max(faint, floor)


def hysteresis(score: np.ndarray, thresholds: tuple[float, float], ring_px: float) -> np.ndarray:
    """Pixels above the first (Otsu's) threshold, plus faint ones above the second.

    Faint pixels within ``ring_px`` of ordinary tissue are the blurred rim of that tissue (which
    is faint too) unless they continue faint tissue from farther away: faint pixels beyond the
    ring are kept and grown back into it, through faint pixels, by ``ring_px``. So faint tissue
    is kept whole, also beside ordinary tissue, while rims do not widen the mask.
    """
    import cv2

    strong = score > thresholds[0]
    faint = score > thresholds[1]
    r = int(round(ring_px))
    if r < 1 or not strong.any():
        return strong | faint
    keep = (faint & ~_grow(strong, r)).astype(np.uint8)
    faint8, cross = faint.astype(np.uint8), np.ones((3, 3), np.uint8)
    for _ in range(r):  # geodesic dilation inside the faint pixels
        keep = cv2.dilate(keep, cross) & faint8
    return strong | keep.astype(bool)


def _sample(values: np.ndarray, most: int = 1 << 20) -> np.ndarray:
    """At most ``most`` of ``values`` (1-D), evenly strided: thresholds and medians of a few
    million pixels do not need them all."""
    return values[:: -(-values.size // most)] if values.size > most else values
