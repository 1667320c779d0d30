"""Plain images (PNG, JPEG, BMP, small non-pyramidal TIFF) read whole with Pillow.

They carry no trustworthy microns-per-pixel: give ``mpp=`` (``--mpp``) for mpp-based reads.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from slidestream.errors import SlideOpenError
from slidestream.io.base import LevelLayout, Slide

__all__ = ["ImageSlide"]

_MAX_PIXELS = 40_000 * 40_000


class ImageSlide(Slide):
    backend = "image"

    def _open(self) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about the odd TIFF tags of WSIs
            try:
                return self._load()
            except (
                UnidentifiedImageError,
                OSError,
                ValueError,
                Image.DecompressionBombError,
            ) as exc:
                raise SlideOpenError(f"Pillow cannot open {self.path} as an image: {exc}") from exc

    def _load(self) -> np.ndarray:
        with Image.open(self.path) as img:
            if img.width * img.height > _MAX_PIXELS:
                raise SlideOpenError(
                    f"{self.path} is a {img.width}x{img.height} plain image, too large to read "
                    f"whole; convert it to a tiled pyramidal TIFF (vips tiffsave --tile --pyramid)"
                )
            img.load()
            mode = "RGBA" if ("A" in img.getbands() or "transparency" in img.info) else "RGB"
            return np.asarray(img.convert(mode))

    def _describe(self, handle: np.ndarray) -> LevelLayout:
        h, w = handle.shape[:2]
        return LevelLayout(((w, h),), None, "image", {}, ())

    def _read_level(
        self, handle: np.ndarray, level: int, lv_x: int, lv_y: int, lv_w: int, lv_h: int
    ) -> np.ndarray:
        return handle[lv_y : lv_y + lv_h, lv_x : lv_x + lv_w]

    def _read_associated(self, handle: np.ndarray, name: str) -> np.ndarray:
        raise KeyError(name)

    def _close(self, handle: np.ndarray) -> None:
        pass
