"""Pixel formats: what a file stores, and its one conversion to ``(H, W, 3) uint8`` RGB.

Every reader decodes a file to the samples it stores and converts them here, so all readers give
the same pixels for the same file. The rules:

- greyscale → R = G = B; MinIsWhite greyscale is inverted (0 is white);
- palette (colour-mapped) → the colour map, taken as 8-bit when all its entries are below 256,
  else by its high byte (libtiff's convention, so libvips and OpenSlide agree);
- 9- to 16-bit samples → ``round(v * 255 / max)`` (halves up), where ``max`` is the file's
  SMaxSampleValue tag when it gives one, else ``2**BitsPerSample - 1`` (65535 for 16-bit
  TIFF and PNG, 4095 for 12-bit TIFF); values above ``max`` become 255;
- YCbCr that is not JPEG-compressed is converted only by OpenSlide (libtiff); the other readers
  refuse it with a plain SlideOpenError, so ``auto`` moves on to OpenSlide;
- an alpha channel (grey+alpha, RGBA) is composited over white after the 8-bit conversion;
- anything else — float or signed samples, 1-bit, CMYK/Lab, and 2- or 4+-channel images whose
  extra channels are not alpha (fluorescence, multiplex) — is refused with a
  :class:`PixelFormatError` that says what the file holds. Nothing is ever clipped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from slidestream.errors import SlideOpenError

__all__ = [
    "PixelFormat",
    "PixelFormatError",
    "RefusedFileError",
    "RGB8",
    "RGBA8",
    "to_rgb",
    "from_tiff_page",
    "refuse",
]

_PHOTOMETRIC_COLOURS = {0: 1, 1: 1, 2: 3, 3: 1, 6: 3}  # MinIsWhite, MinIsBlack, RGB, Palette, YCbCr
_PHOTOMETRIC_NAMES = {4: "transparency-mask", 5: "CMYK", 8: "CIELab", 9: "ICCLab", 10: "ITULab"}
_ALPHA = {1: "assoc", 2: "unassoc"}  # TIFF ExtraSamples values


class RefusedFileError(SlideOpenError):
    """The file itself is unusable (its header, tile table or pixels): no other reader helps."""


class PixelFormatError(RefusedFileError):
    """The file holds pixels that have no defined brightfield RGB rendering."""


@dataclass(frozen=True, eq=False)
class PixelFormat:
    """Samples a reader delivers, and how they become 8-bit RGB.

    ``colour`` is 1 (grey or palette index) or 3 (RGB) bands, followed by one alpha band when
    ``alpha`` is ``"assoc"`` (premultiplied) or ``"unassoc"``. Samples are ``bits`` wide and
    scaled so that ``max_value`` is 255 (``invert``: MinIsWhite); ``colormap`` is a (N, 3)
    uint8 palette indexed by the sample.
    """

    name: str
    colour: int = 3
    alpha: str | None = None
    bits: int = 8
    max_value: int = 255
    invert: bool = False
    colormap: np.ndarray | None = None
    raw_ycbcr: bool = False  # YCbCr samples that only libtiff's RGBA interface converts
    lut: np.ndarray | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.bits > 8 or self.invert or self.max_value != 255:
            object.__setattr__(self, "lut", _scale_lut((1 << self.bits) - 1, self))

    def check_reader(self, reader: str, path: Any) -> None:
        """SlideOpenError (``auto`` moves on) if ``reader`` cannot deliver these samples."""
        if self.raw_ycbcr:
            raise SlideOpenError(
                f"{reader}: {path} stores {self.name} pixels, which only backend='openslide' "
                f"converts to RGB"
            )

    def to_rgb(self, arr: np.ndarray) -> np.ndarray:
        """(H, W[, bands]) samples → (H, W, 3) uint8, alpha composited over white."""
        if self.colormap is not None:
            return np.ascontiguousarray(self.colormap[arr[..., 0] if arr.ndim == 3 else arr])
        if self.lut is not None:
            arr = self.lut[arr]
        return to_rgb(arr, premultiplied=self.alpha == "assoc")

    def decoded(self, *, inverted: bool, palette: bool) -> PixelFormat:
        """The format as delivered by a library that inverts MinIsWhite / expands palettes."""
        fmt = self
        if inverted and fmt.invert:
            fmt = replace(fmt, invert=False)
        if palette and fmt.colormap is not None:
            fmt = replace(fmt, colour=3, colormap=None)
        return fmt


RGB8 = PixelFormat("8-bit RGB")
RGBA8 = PixelFormat("8-bit RGBA", alpha="unassoc")
_U16_TO_U8 = np.minimum((np.arange(65536, dtype=np.int64) * 510 + 65535) // 131070, 255).astype(
    np.uint8
)


def to_rgb(arr: np.ndarray, *, premultiplied: bool = False) -> np.ndarray:
    """(H, W, 1|2|3|4) uint8 (or uint16) → (H, W, 3) uint8; a 2nd/4th band is alpha, composited
    over white."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype == np.uint16:  # associated images of 16-bit files: the 16-bit rule
        arr = _U16_TO_U8[arr]
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    bands = arr.shape[2]
    if bands in (2, 4):
        alpha = arr[..., -1:].astype(np.uint16)
        color = arr[..., :-1].astype(np.uint16)
        if alpha.min() < 255:
            if premultiplied:
                color = np.minimum(color + (255 - alpha), 255)
            else:
                color = (color * alpha + 255 * (255 - alpha) + 127) // 255
        arr = color.astype(np.uint8)
        bands -= 1
    if bands == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif bands != 3:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def _scale_lut(top: int, fmt: PixelFormat) -> np.ndarray:
    """uint8 table over sample values 0..top: ``round(v * 255 / max_value)``, capped at 255."""
    v = np.arange(top + 1, dtype=np.int64)
    m = fmt.max_value
    if fmt.invert:
        v = np.maximum(m - v, 0)
    return np.minimum((v * 510 + m) // (2 * m), 255).astype(np.uint8)


def describe_samples(bits: int, kind: str, channels: int, extra: str = "") -> str:
    """Words for what a file holds, e.g. '16-bit unsigned 5-channel pixels'."""
    what = {1: "greyscale", 3: "RGB"}.get(channels, f"{channels}-channel")
    return f"{bits}-bit {kind} {what}{extra} pixels"


def refuse(path: Any, holds: str) -> PixelFormatError:
    """The one-line error for a file whose pixels have no brightfield RGB rendering."""
    return PixelFormatError(
        f"{path} holds {holds}, not a brightfield RGB slide; export an 8-bit RGB image "
        f"(for fluorescence, a false-colour composite of chosen channels) and open that"
    )


def from_tiff_page(page: Any, path: Any) -> PixelFormat:
    """The PixelFormat of a tifffile page's raw samples, or PixelFormatError saying what it is."""
    photometric = int(page.photometric)
    spp, bits = int(page.samplesperpixel), int(page.bitspersample)
    kind = {1: "unsigned", 2: "signed", 3: "floating-point"}.get(int(page.sampleformat), "complex")
    if photometric not in _PHOTOMETRIC_COLOURS:
        name = _PHOTOMETRIC_NAMES.get(photometric, f"photometric-{photometric}")
        raise refuse(path, f"{bits}-bit {name} pixels")
    colour = _PHOTOMETRIC_COLOURS[photometric]
    extras = [int(e) for e in page.extrasamples]
    alpha = _ALPHA.get(extras[0]) if spp == colour + 1 and extras else None
    if spp != colour + (alpha is not None) or (photometric == 3 and spp != 1):
        note = f" (RGB + {spp - 3} extra)" if colour == 3 else " (fluorescence or multiplex?)"
        raise refuse(path, describe_samples(bits, kind, spp, note if spp > 1 else ""))
    if kind != "unsigned" or not (bits == 8 or 9 <= bits <= 16):
        raise refuse(path, describe_samples(bits, kind, spp))
    top = (1 << bits) - 1
    smax = page.tags.get(281)  # SMaxSampleValue
    max_value = int(np.max(smax.value)) if smax is not None else top
    max_value = max_value if 0 < max_value < top else top
    if photometric == 3:
        cmap = np.asarray(page.colormap).reshape(3, -1)
        cmap8 = (cmap if cmap.max() < 256 else cmap >> 8).T.astype(np.uint8)
        return PixelFormat(f"{bits}-bit palette", 1, colormap=np.ascontiguousarray(cmap8))
    if photometric == 6 and int(page.compression) != 7:  # JPEG decoders convert YCbCr
        name = f"{bits}-bit YCbCr (not JPEG-compressed)"
        return PixelFormat(name, colour, alpha, bits, max_value, raw_ycbcr=True)
    name = f"{bits}-bit " + ("MinIsWhite " if photometric == 0 else "")
    name += {1: "grey", 3: "RGB"}[colour] + ("+alpha" if alpha else "")
    name += f" (max {max_value})" if max_value != 255 else ""
    return PixelFormat(name, colour, alpha, bits, max_value, invert=photometric == 0)
