"""tiffslide backend: pure-Python TIFF reader (tifffile + imagecodecs + zarr).

Reads SVS, generic pyramidal TIFF and other TIFF-family formats without C libraries beyond
imagecodecs; handles strip-based (non-tiled) TIFFs that OpenSlide refuses.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from slidestream.errors import SlideOpenError
from slidestream.io._integrity import tile_index
from slidestream.io._pixels import PixelFormat, from_tiff_page
from slidestream.io.base import LevelLayout, Slide, import_backend, plausible_mpp
from slidestream.io.remote import RemotePath, open_remote

__all__ = ["TiffSlideSlide"]


def _import() -> Any:
    return import_backend("tiffslide", "tiffslide")


class TiffSlideSlide(Slide):
    backend = "tiffslide"

    def _open(self) -> Any:
        tiffslide = _import()
        remote = open_remote(self.path) if isinstance(self.path, RemotePath) else None
        try:
            handle = tiffslide.TiffSlide(remote if remote is not None else str(self.path))
        except Exception as exc:  # tifffile raises TiffFileError, ValueError, KeyError, ...
            if remote is not None:
                remote.close()
            raise SlideOpenError(f"tiffslide cannot open {self.path}: {exc}") from exc
        if remote is not None:
            self._remote_file = remote  # closed with the handle
        return handle

    def _close(self, handle: Any) -> None:
        handle.close()
        remote = self.__dict__.pop("_remote_file", None)
        if remote is not None:
            remote.close()

    def _describe(self, handle: Any) -> LevelLayout:
        levels = _check_decodable(handle, self.path)
        pixels = level_pixel_format(levels, self.path)
        pixels.check_reader("tiffslide", self.path)
        props = {k: str(v) for k, v in handle.properties.items() if v is not None}
        mpp_x = plausible_mpp(props.get("tiffslide.mpp-x"))
        mpp_y = plausible_mpp(props.get("tiffslide.mpp-y"))
        vendor = props.get("tiffslide.vendor") or "generic-tiff"
        return LevelLayout(
            level_dimensions=tuple(tuple(map(int, d)) for d in handle.level_dimensions),
            mpp=(mpp_x, mpp_y if mpp_y else mpp_x) if mpp_x else None,
            vendor="generic-tiff" if vendor == "generic" else vendor,
            properties=props,
            associated=tuple(handle.associated_images.keys()),
            pixels=pixels,
            # a URL's tiles are not pre-checked (that reads the file's raw bytes); damaged
            # ones still fail their decode with SlideReadError
            tiles=None if isinstance(self.path, RemotePath) else tile_index(levels, self.path),
        )

    def _read_level(
        self, handle: Any, level: int, lv_x: int, lv_y: int, lv_w: int, lv_h: int
    ) -> np.ndarray:
        # tiffslide maps level-0 location to level pixels with int(loc / downsample); pick the
        # smallest level-0 integer that maps exactly to (lv_x, lv_y).
        ds = handle.level_downsamples[level]
        loc = tuple(_level0_for(v, ds) for v in (lv_x, lv_y))
        return handle.read_region(loc, level, (lv_w, lv_h), as_array=True, padding=False)

    def _read_associated(self, handle: Any, name: str) -> np.ndarray:
        return np.asarray(handle.associated_images[name])


def _check_decodable(handle: Any, path: Any) -> list[Any]:
    """The series' level keyframes; SlideOpenError if tifffile/imagecodecs cannot decode them."""
    import tifffile

    try:
        series = handle.ts_tifffile.series[handle.properties.get("tiffslide.series-index", 0)]
        pages = [level.keyframe for level in series.levels]
        compressions = {int(page.compression) for page in pages}
    except Exception as exc:
        raise SlideOpenError(f"tiffslide cannot parse the TIFF structure of {path}: {exc}") from exc
    unknown = sorted(c for c in compressions if c not in tifffile.TIFF.DECOMPRESSORS)
    if unknown:
        raise SlideOpenError(f"tiffslide: unsupported TIFF compression {unknown[0]} in {path}")
    return pages


def level_pixel_format(pages: list[Any], path: Any) -> PixelFormat:
    """The pixel format shared by all levels (tifffile keyframes), or SlideOpenError."""
    formats = [from_tiff_page(page, path) for page in pages]
    if len({f.name for f in formats}) > 1:
        raise SlideOpenError(
            f"levels of {path} store different pixel formats "
            f"({formats[0].name} and {formats[-1].name}); re-export it as one pyramid"
        )
    return formats[0]


def _level0_for(lv: int, ds: float) -> int:
    loc = math.ceil(lv * ds)
    while int(loc / ds) > lv:
        loc -= 1
    while int(loc / ds) < lv:
        loc += 1
    return loc
