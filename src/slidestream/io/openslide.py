"""OpenSlide backend (SVS, NDPI, MRXS, SCN, DICOM, VMS, BIF, generic tiled TIFF).

Uses ``openslide-bin`` wheels, so no system OpenSlide is needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slidestream.errors import SlideOpenError
from slidestream.io._integrity import TileIndex, tile_index
from slidestream.io._pixels import RGBA8, RefusedFileError, from_tiff_page
from slidestream.io.base import LevelLayout, Slide, import_backend, plausible_mpp

__all__ = ["OpenSlideSlide"]


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
        # OpenSlide takes level-0 coordinates; with integer downsamples this lands exactly on
        # the level's pixel grid (non-integer ones are resampled by OpenSlide itself).
        ds = handle.level_downsamples[level]
        loc = (round(lv_x * ds), round(lv_y * ds))
        return np.asarray(handle.read_region(loc, level, (lv_w, lv_h)))

    def _read_associated(self, handle: Any, name: str) -> np.ndarray:
        return np.asarray(handle.associated_images[name])


def _tiff_tiles(path: Any, dims: tuple[tuple[int, int], ...]) -> TileIndex | None:
    """For a TIFF-family file tifffile parses: refuse pixel formats OpenSlide cannot deliver
    exactly as 8-bit RGB, check the tile tables, and index them when they are OpenSlide's levels.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            pages = [level.keyframe for level in tf.series[0].levels]
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
    level_dims = tuple((int(p.imagewidth), int(p.imagelength)) for p in pages)
    return tiles if level_dims == dims else None
