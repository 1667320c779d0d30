"""Plain images (PNG, JPEG, BMP, small non-pyramidal TIFF) read whole into memory.

TIFF files are decoded with tifffile and 16-bit PNGs with imagecodecs, so their samples are
converted by the same rules as the other readers' (see :mod:`slidestream.io._pixels`); other
files are read with Pillow. They carry no trustworthy microns-per-pixel: give ``mpp=``
(``--slide-mpp``) for mpp-based reads.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from slidestream.errors import SlideOpenError
from slidestream.io._integrity import tile_index
from slidestream.io._pixels import (
    RGB8,
    PixelFormat,
    RefusedFileError,
    describe_samples,
    from_tiff_page,
    refuse,
)
from slidestream.io.base import LevelLayout, Slide

__all__ = ["ImageSlide"]

_MAX_PIXELS = 40_000 * 40_000
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Pillow modes of whole-number samples wider than 8 bits that it keeps as they are
_PIL_16BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_PIL_REFUSED = {"I": "signed", "F": "floating-point", "I;32": "signed"}


class ImageSlide(Slide):
    backend = "image"

    def _open(self) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about the odd TIFF tags of WSIs
            try:
                return self._load()
            except (SlideOpenError, RefusedFileError):
                raise
            except (
                UnidentifiedImageError,
                OSError,
                ValueError,
                Image.DecompressionBombError,
            ) as exc:
                raise SlideOpenError(f"Pillow cannot open {self.path} as an image: {exc}") from exc
            except Exception as exc:  # tifffile/imagecodecs raise their own types
                raise SlideOpenError(f"cannot decode {self.path} as an image: {exc}") from exc

    def _load(self) -> tuple[np.ndarray, PixelFormat]:
        with open(self.path, "rb") as f:
            head = f.read(32)
        if head[:4] in _TIFF_MAGIC:
            return self._load_tiff()
        if head[:8] == _PNG_MAGIC and head[24] == 16:  # IHDR bit depth: Pillow drops the low byte
            return self._load_png16()
        with Image.open(self.path) as img:
            self._check_size(img.width, img.height)
            img.load()
            if img.mode in _PIL_16BIT:
                return np.asarray(img).astype(np.uint16), PixelFormat("16-bit grey", 1, bits=16)
            if img.mode in _PIL_REFUSED:
                raise refuse(self.path, describe_samples(32, _PIL_REFUSED[img.mode], 1))
            mode = "RGBA" if ("A" in img.getbands() or "transparency" in img.info) else "RGB"
            return np.asarray(img.convert(mode)), RGB8

    def _load_tiff(self) -> tuple[np.ndarray, PixelFormat]:
        import tifffile

        with tifffile.TiffFile(self.path) as tf:
            page = tf.series[0].levels[0].keyframe
            fmt = from_tiff_page(page, self.path)
            fmt.check_reader("image", self.path)
            tile_index([page], self.path)  # refuse implausible headers before allocating
            self._check_size(int(page.imagewidth), int(page.imagelength))
            return page.asarray(), fmt

    def _load_png16(self) -> tuple[np.ndarray, PixelFormat]:
        import imagecodecs

        arr = imagecodecs.png_decode(self.path.read_bytes())
        bands = 1 if arr.ndim == 2 else arr.shape[2]
        self._check_size(arr.shape[1], arr.shape[0])
        colour = 1 if bands <= 2 else 3
        alpha = "unassoc" if bands in (2, 4) else None
        name = "16-bit " + ("grey" if colour == 1 else "RGB") + ("+alpha" if alpha else "")
        return arr, PixelFormat(name, colour, alpha, bits=16, max_value=65535)

    def _check_size(self, width: int, height: int) -> None:
        if width * height > _MAX_PIXELS:
            raise SlideOpenError(
                f"{self.path} is a {width}x{height} plain image, too large to read "
                f"whole; convert it to a tiled pyramidal TIFF (vips tiffsave --tile --pyramid)"
            )

    def _describe(self, handle: tuple[np.ndarray, PixelFormat]) -> LevelLayout:
        arr, fmt = handle
        h, w = arr.shape[:2]
        return LevelLayout(((w, h),), None, "image", {}, (), pixels=fmt)

    def _read_level(
        self,
        handle: tuple[np.ndarray, PixelFormat],
        level: int,
        lv_x: int,
        lv_y: int,
        lv_w: int,
        lv_h: int,
    ) -> np.ndarray:
        return handle[0][lv_y : lv_y + lv_h, lv_x : lv_x + lv_w]

    def _read_associated(self, handle: Any, name: str) -> np.ndarray:
        raise KeyError(name)

    def _close(self, handle: Any) -> None:
        pass
