"""DeepZoom image pyramids (``<stem>.dzi`` + ``<stem>_files/``) written by libvips ``dzsave``.

A pyramid is made from an open :class:`~slidestream.io.Slide` at full resolution (level 0, or
capped at ``finest_mpp``) or from an ``(H, W, 3) uint8`` array. Slide pixels always come from
:meth:`Slide.read`, so the pyramid shows exactly what every other part of slidestream reads
(white background, alpha composited over white, 16-bit scaled, whichever backend opened the
file). Two routes, same pixels:

- a slide opened by the pyvips backend with plain 8-bit RGB samples and no cap is handed to
  ``dzsave`` straight from its libvips loader (the decoder :class:`PyvipsSlide` reads with);
- any other slide is streamed band by band through :meth:`Slide.read` into a temporary tiled,
  deflate-compressed TIFF beside the output (one band of 512 rows in memory at a time), which
  ``dzsave`` then tiles. The temporary file is removed afterwards.

Memory grows with the slide's width, not its area. Measured by ``benchmarks/viewer_pyramid.py``
on a generated 20000 × 15000 px slide (2 CPU cores shared with other jobs): the pyvips route 11.5 s
(26 level-0 Mpx/s, RSS +117 MB), the streamed route 29 s (10 Mpx/s, RSS +180 MB); 82 MB of JPEG
tiles.

Level ``L`` of a DeepZoom pyramid of ``(W, H)`` px is ``ceil(W / 2^(N-L)) × ceil(H / 2^(N-L))``
px with ``N = ceil(log2(max(W, H)))``; level ``N`` is the full-resolution image.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidestream.errors import ConfigError, SlideReadError
from slidestream.io import Slide
from slidestream.io.base import import_backend

__all__ = ["DeepZoom", "dz_levels", "write_deepzoom"]

log = logging.getLogger(__name__)

TILE_FORMATS = {"jpeg": ".jpeg[Q={q}]", "png": ".png"}
_BAND_ROWS = 512  # rows of the slide read per Slide.read call on the streamed route


@dataclass(frozen=True)
class DeepZoom:
    """A DeepZoom pyramid on disk.

    ``width``/``height`` are px of its finest level; ``downsample`` is level-0 px of the slide
    per pyramid px (1.0 at full resolution), so the pyramid spans ``width · downsample`` level-0
    px; ``mpp`` is µm per pyramid px at the finest level (None when the slide has no mpp).
    """

    dzi: Path
    width: int
    height: int
    tile_size: int
    overlap: int
    tile_format: str
    downsample: float
    mpp: float | None

    @property
    def tiles(self) -> Path:
        """The ``<stem>_files/`` folder: one sub-folder per level, tiles named ``col_row``."""
        return self.dzi.with_name(self.dzi.stem + "_files")

    @property
    def max_level(self) -> int:
        """Index of the finest (full-resolution) level."""
        return len(dz_levels(self.width, self.height)) - 1

    def tile_source(self, url: str) -> dict[str, Any]:
        """OpenSeadragon's inline DZI tile source, tiles under ``url`` (relative to the page)."""
        return {
            "Image": {
                "xmlns": "http://schemas.microsoft.com/deepzoom/2008",
                "Url": url,
                "Format": self.tile_format,
                "Overlap": str(self.overlap),
                "TileSize": str(self.tile_size),
                "Size": {"Width": str(self.width), "Height": str(self.height)},
            }
        }


def dz_levels(width: int, height: int) -> list[tuple[int, int]]:
    """(w, h) px of each DeepZoom level, level 0 (1×1 px) first, the full image last."""
    if width < 1 or height < 1:
        raise ConfigError(f"image size must be positive, got {width}x{height}")
    top = math.ceil(math.log2(max(width, height))) if max(width, height) > 1 else 0
    return [(-(-width // 2 ** (top - i)), -(-height // 2 ** (top - i))) for i in range(top + 1)]


def _pyvips() -> Any:
    return import_backend("pyvips", "pyvips pyvips-binary")


def _plain_level0(slide: Slide) -> bool:
    """True if level 0 stores 8-bit RGB without alpha and with no empty (sparse) tiles."""
    fmt = slide._layout.pixels
    plain = (fmt.colour, fmt.alpha, fmt.bits, fmt.max_value, fmt.invert) == (3, None, 8, 255, False)
    if not plain or fmt.colormap is not None or fmt.raw_ycbcr:
        return False
    tiles = slide._layout.tiles
    level0 = tiles.levels[0] if tiles is not None and tiles.levels else None
    return level0 is None or not level0.empty.any()


def _direct_image(slide: Slide) -> Any | None:
    """The slide's level 0 as a libvips image when that decodes exactly as ``Slide.read``:
    the pyvips backend (same libvips loader), plain 8-bit RGB, no sparse tiles."""
    if slide.backend != "pyvips" or not _plain_level0(slide):
        return None
    page, subifd = slide._pages[0]  # type: ignore[attr-defined]
    kwargs: dict[str, Any] = {"page": page, "access": "sequential", "fail_on": "warning"}
    if subifd is not None:
        kwargs["subifd"] = subifd
    image = _pyvips().Image.tiffload(str(slide.path), **kwargs)
    if (image.width, image.height, image.bands, image.format) != (*slide.dimensions, 3, "uchar"):
        return None
    return image


def _bands(slide: Slide, size: tuple[int, int], downsample: float, tile: int) -> Iterator:
    """Tiles (tile, tile, 3) of the slide at ``downsample``, row by row, white past the edge."""
    width, height = size
    cols = -(-width // tile)
    for r0 in range(0, height, tile):
        rows = min(tile, height - r0)
        band = np.full((tile, cols * tile, 3), 255, np.uint8)
        band[:rows, :width] = slide.read(0, r0 * downsample, width, rows, downsample=downsample)
        for c in range(cols):
            yield band[:, c * tile : (c + 1) * tile]


def _streamed_image(slide: Slide, size: tuple[int, int], downsample: float, tmp: Path) -> Any:
    """Write the slide at ``downsample`` to a temporary tiled TIFF and open it with libvips."""
    import tifffile

    path = tmp / "level.tif"
    tifffile.imwrite(
        path,
        data=_bands(slide, size, downsample, _BAND_ROWS),
        shape=(size[1], size[0], 3),
        dtype=np.uint8,
        tile=(_BAND_ROWS, _BAND_ROWS),
        photometric="rgb",
        compression="zlib",  # deflate: libvips' libtiff (pyvips-binary) has no zstd
        compressionargs={"level": 1},
        bigtiff=True,
    )
    return _pyvips().Image.tiffload(str(path), access="sequential", fail_on="warning")


def _array_image(image: np.ndarray) -> Any:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise ConfigError(
            f"image must be an (H, W, 3) uint8 array, got shape {image.shape} {image.dtype}"
        )
    vips = _pyvips().Image.new_from_array(np.ascontiguousarray(image))
    return vips.copy(interpretation="srgb")


def _resolution(slide: Slide, finest_mpp: float | None) -> tuple[float, tuple[int, int]]:
    """Level-0 px per pyramid px, and the pyramid's (w, h) px, for a cap of ``finest_mpp``."""
    w0, h0 = slide.dimensions
    mpp = slide.mpp
    if finest_mpp is None or mpp is None or finest_mpp <= min(mpp):
        if finest_mpp is not None and mpp is None:
            log.warning("%s has no mpp: finest_mpp=%s ignored", slide.path.name, finest_mpp)
        return 1.0, (w0, h0)
    downsample = finest_mpp / min(mpp)
    return downsample, (max(1, math.ceil(w0 / downsample)), max(1, math.ceil(h0 / downsample)))


def write_deepzoom(
    dest: str | os.PathLike[str],
    image: Slide | np.ndarray,
    *,
    finest_mpp: float | None = None,
    tile_format: str = "jpeg",
    quality: int = 90,
    tile_size: int = 254,
    overlap: int = 1,
) -> DeepZoom:
    """Write a DeepZoom pyramid ``dest.dzi`` + ``dest_files/`` and describe it.

    Args:
        dest: path of the pyramid without suffix (``out/slide`` → ``out/slide.dzi``,
            ``out/slide_files/``); an older pyramid there is replaced only once the new one is
            complete.
        image: an open Slide (→ the pyramid of level 0, or of ``finest_mpp``) or an
            (H, W, 3) uint8 array.
        finest_mpp: finest resolution kept, µm/px; a slide scanned finer is resampled to it by
            ``Slide.read`` (ignored, with a warning, for a slide without mpp). Disk cost: the
            pyramid holds about 4/3 of the finest level's pixels; JPEG tiles at Q=90 take about
            0.1–0.3 bytes per tissue px and far less for blank background (a 0.25 µm/px
            100 000 × 80 000 px scan: roughly 1–2 GB; at ``finest_mpp=0.5``, a quarter of it).
            The streamed route also needs a temporary TIFF of the finest level beside ``dest``
            while it runs (deflate level 1, roughly 1 byte per px of tissue).
        tile_format: ``"jpeg"`` (lossy, small) or ``"png"`` (lossless: tiles hold exactly the
            pixels ``Slide.read`` returns). ``quality``: JPEG Q (1–100).
        tile_size, overlap: DeepZoom tile size and overlap in px.

    Raises:
        ConfigError: bad arguments. SlideReadError: the slide or libvips failed, naming the file.
    """
    if tile_format not in TILE_FORMATS:
        raise ConfigError(f"tile_format must be one of {sorted(TILE_FORMATS)}, got {tile_format!r}")
    if finest_mpp is not None and not finest_mpp > 0:
        raise ConfigError(f"finest_mpp must be a positive µm/px, got {finest_mpp!r}")
    if not 1 <= quality <= 100 or tile_size < 16 or not 0 <= overlap < tile_size // 2:
        raise ConfigError(
            f"need quality in 1..100, tile_size >= 16 and 0 <= overlap < tile_size / 2, got "
            f"quality={quality}, tile_size={tile_size}, overlap={overlap}"
        )
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as tmp_name:
        tmp = Path(tmp_name)
        if isinstance(image, np.ndarray):
            vips, downsample, mpp = _array_image(image), 1.0, None
        else:
            downsample, size = _resolution(image, finest_mpp)
            vips = _direct_image(image) if downsample == 1.0 else None
            if vips is None:
                vips = _streamed_image(image, size, downsample, tmp)
            mpp = min(image.mpp) * downsample if image.mpp else None
        suffix = TILE_FORMATS[tile_format].format(q=quality)
        try:
            vips.dzsave(
                str(tmp / dest.name), suffix=suffix, tile_size=tile_size, overlap=overlap,
                keep="none",
            )  # fmt: skip
        except _pyvips().Error as exc:
            where = getattr(image, "path", "the image")
            reason = " ".join(str(exc).split())
            raise SlideReadError(f"cannot write the DeepZoom pyramid of {where}: {reason}") from exc
        (tmp / f"{dest.name}_files" / "vips-properties.xml").unlink(missing_ok=True)
        _replace(tmp / dest.name, dest)
    return DeepZoom(
        dest.with_name(dest.name + ".dzi"), vips.width, vips.height, tile_size, overlap,
        tile_format, downsample, mpp,
    )  # fmt: skip


def _replace(src: Path, dest: Path) -> None:
    """Move a finished pyramid ``src.dzi`` + ``src_files`` over ``dest``'s."""
    files = dest.with_name(dest.name + "_files")
    if files.exists():
        shutil.rmtree(files)
    os.replace(src.with_name(src.name + "_files"), files)
    os.replace(src.with_name(src.name + ".dzi"), dest.with_name(dest.name + ".dzi"))
