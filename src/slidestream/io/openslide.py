"""OpenSlide backend (SVS, NDPI, MRXS, SCN, DICOM, VMS, BIF, generic tiled TIFF).

Uses ``openslide-bin`` wheels, so no system OpenSlide is needed. Level pixels are read exactly
as stored: for a level whose downsample is not an integer the read starts at a level pixel
that a level-0 address hits exactly (up to ``_SEARCH_PX`` pixels before the region, which are
read and dropped); where there is none within that distance — downsamples within about 1e-3 of
an integer, far from the level's origin — OpenSlide's interpolated pixels are returned and a
warning is logged once per level.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import numpy as np

from slidestream.errors import SlideOpenError
from slidestream.io._integrity import TileIndex, tile_index
from slidestream.io._pixels import RGBA8, RefusedFileError, from_tiff_page
from slidestream.io.base import LevelLayout, Slide, import_backend, plausible_mpp

__all__ = ["OpenSlideSlide"]

log = logging.getLogger(__name__)

# cairo/pixman weigh bilinear neighbours in 1/128 steps: offsets (fx, fy) with |fx| + |fy|
# below about 0.0035 px leave every pixel unchanged (measured on random pixels; 0.0015 per axis
# keeps a margin).
_EXACT_FRACTION = 0.0015
_SEARCH_PX = 2048  # how far left/up of a region to look for an exact start (extra pixels read)


def _import() -> Any:
    return import_backend("openslide", "openslide-python openslide-bin")


class OpenSlideSlide(Slide):
    backend = "openslide"

    def _open(self) -> Any:
        openslide = _import()
        try:
            return openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideOpenError(f"openslide does not recognise the format of {self.path}") from exc
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideOpenError(f"openslide cannot open {self.path}: {exc}") from exc

    def _describe(self, handle: Any) -> LevelLayout:
        props = dict(handle.properties)
        mpp_x = plausible_mpp(props.get("openslide.mpp-x"))
        mpp_y = plausible_mpp(props.get("openslide.mpp-y"))
        dims = tuple(tuple(map(int, d)) for d in handle.level_dimensions)
        return LevelLayout(
            level_dimensions=dims,
            mpp=(mpp_x, mpp_y if mpp_y else mpp_x) if mpp_x else None,
            vendor=props.get("openslide.vendor", "unknown"),
            properties=props,
            associated=tuple(handle.associated_images.keys()),
            pixels=RGBA8,  # OpenSlide always returns 8-bit RGBA (transparent where no tiles)
            tiles=_tiff_tiles(self.path, dims),
        )

    def _read_level(
        self, handle: Any, level: int, lv_x: int, lv_y: int, lv_w: int, lv_h: int
    ) -> np.ndarray:
        # OpenSlide takes level-0 coordinates and paints level pixels from (x0 / ds, y0 / ds);
        # a fractional part there is interpolated (bilinear, by cairo). Start the read at the
        # nearest level pixel at or before the region that a level-0 integer hits exactly.
        ds = handle.level_downsamples[level]
        kx, x0 = _exact_start(lv_x, ds)
        ky, y0 = _exact_start(lv_y, ds)
        if kx is None or ky is None:
            self._warn_inexact(level, ds)
            loc = (round(lv_x * ds), round(lv_y * ds))
            return np.asarray(handle.read_region(loc, level, (lv_w, lv_h)))
        size = (lv_w + lv_x - kx, lv_h + lv_y - ky)
        arr = np.asarray(handle.read_region((x0, y0), level, size))
        return arr[lv_y - ky :, lv_x - kx :]

    def _warn_inexact(self, level: int, ds: float) -> None:
        warned = self.__dict__.setdefault("_inexact_levels", set())
        if level not in warned:
            warned.add(level)
            log.warning(
                "openslide cannot address level %d of %s (downsample %.6g) exactly near some "
                "positions; pixels there are interpolated by OpenSlide (a few grey levels off): "
                "use backend='pyvips' or 'tiffslide' for exact level pixels",
                level,
                self.path,
                ds,
            )

    def _read_associated(self, handle: Any, name: str) -> np.ndarray:
        return np.asarray(handle.associated_images[name])


@functools.lru_cache(maxsize=65536)
def _exact_start(lv: int, ds: float) -> tuple[int | None, int]:
    """(k, x0): the largest level pixel ``k <= lv`` within ``_SEARCH_PX`` with a level-0 address
    ``x0`` that OpenSlide maps to ``k + f``, ``|f|`` too small to move a bilinear weight; k is
    None if there is none."""
    if ds == int(ds):
        return lv, lv * int(ds)
    for k in range(lv, max(-1, lv - _SEARCH_PX), -1):
        x0 = math.floor(k * ds)
        for cand in (x0, x0 + 1):
            if abs(cand / ds - k) < _EXACT_FRACTION:
                return k, cand
    return None, 0


def _tiff_tiles(path: Any, dims: tuple[tuple[int, int], ...]) -> TileIndex | None:
    """For a TIFF-family file tifffile parses: refuse pixel formats OpenSlide cannot deliver
    exactly as 8-bit RGB, check the tile tables, and index the levels tifffile and OpenSlide
    agree on. Files whose pyramid tifffile does not find as OpenSlide does are left to it."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            pages = _matching_levels(tf, dims)
            if not pages:
                return None
            fmt = from_tiff_page(pages[0], path)
            tiles = tile_index(pages, path)
    except (RefusedFileError, SlideOpenError):
        raise
    except Exception:  # not a TIFF (MRXS, DICOM, VMS, ...): OpenSlide's own checks apply
        return None
    if fmt.bits != 8 or fmt.alpha is not None:
        raise SlideOpenError(
            f"openslide: {path} holds {fmt.name} pixels, which OpenSlide reduces to 8-bit RGBA "
            f"its own way; open it with backend='pyvips' or 'tiffslide'"
        )
    if tiles is not None:  # levels tifffile left out (odd size ratios) are not checked here
        tiles.levels += [None] * (len(dims) - len(tiles.levels))
    return tiles


def _matching_levels(tf: Any, dims: tuple[tuple[int, int], ...]) -> list[Any]:
    """Keyframes of the tifffile series whose levels are OpenSlide's first levels, in order."""
    for series in tf.series:
        pages = [level.keyframe for level in series.levels]
        found = [(int(p.imagewidth), int(p.imagelength)) for p in pages]
        if found and tuple(found) == dims[: len(found)]:
            return pages
    return []
