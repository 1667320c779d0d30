"""The :class:`Slide` base class: one reader API over several backend libraries.

Coordinate planes: ``x, y`` are always level-0 pixels; ``lv_x, lv_y`` are pixels of a pyramid
level. Pixels leave this module as ``(H, W, 3) uint8`` RGB numpy arrays.

Backends implement four small hooks (``_open``, ``_describe``, ``_read_level``,
``_read_associated``); everything else — exact-mpp resampling, white padding, alpha handling,
thumbnails, pickling for DataLoader workers — is written once here.
"""

from __future__ import annotations

import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from slidestream.errors import (
    BackendUnavailableError,
    ConfigError,
    MissingMppError,
    SlideReadError,
)
from slidestream.io._pixels import RGB8, PixelFormat, to_rgb
from slidestream.io.remote import as_slide_path
from slidestream.types import SlideInfo

__all__ = ["Slide", "LevelLayout", "RESAMPLE_FILTERS", "snap_downsample", "plausible_mpp"]

log = logging.getLogger(__name__)

RESAMPLE_FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# Filter radius in source pixels at scale 1 (PIL's supports); used to read enough context.
_FILTER_SUPPORT = {"nearest": 0.5, "box": 0.5, "bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}
# Above this many level pixels a scaled read is done in horizontal bands to bound memory.
_BAND_PIXELS = 4096 * 4096
_MPP_RANGE = (0.01, 100.0)  # plausible microns per pixel for a slide scan


def import_backend(module: str, install: str) -> Any:
    """Import a reader library, or raise BackendUnavailableError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as exc:  # OSError: a shared library failed to load
        raise BackendUnavailableError(
            f"{module} is not usable ({exc}); install it with: pip install {install}"
        ) from exc


def plausible_mpp(value: Any) -> float | None:
    """``value`` as a float mpp if it is a plausible slide resolution (µm/px), else None."""
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1] else None


def snap_downsample(base: tuple[int, int], level: tuple[int, int]) -> float:
    """Level-0 pixels per level pixel, snapped to the integer the pyramid was built with.

    Pyramids are made by integer shrinks whose output sizes are floored or ceiled (3001 px → 1500
    px is a downsample of exactly 2, not 2.00067); a ratio that fits that pattern on both axes is
    returned as the integer, anything else as the mean of the two ratios (as OpenSlide does).
    """
    (w0, h0), (w, h) = base, level
    ratio = (w0 / w + h0 / h) / 2.0
    k = max(1, round(ratio))
    if all(n // k <= m <= -(-n // k) for n, m in ((w0, w), (h0, h))):
        return float(k)
    return ratio


@dataclass(frozen=True)
class LevelLayout:
    """What a backend reports about a file when it opens it."""

    level_dimensions: tuple[tuple[int, int], ...]
    mpp: tuple[float, float] | None
    vendor: str
    properties: Mapping[str, str] = field(default_factory=dict)
    associated: tuple[str, ...] = ()
    pixels: PixelFormat = RGB8  # how the samples _read_level returns become 8-bit RGB
    tiles: Any = None  # an io._integrity.TileIndex: checks tiles before a read, or None


class Slide(ABC):
    """A whole-slide image opened with one backend.

    Picklable: pickling keeps the path and options, and each process opens its own handle lazily,
    so a ``Slide`` can be handed to DataLoader workers under ``fork`` and ``spawn``. A handle is
    not shared between threads safely; use one ``Slide`` per thread.
    """

    backend: ClassVar[str] = ""

    def __init__(
        self, path: str | os.PathLike[str], *, mpp: float | None = None, resample: str = "bilinear"
    ) -> None:
        self.path: Any = as_slide_path(path)  # a Path, or a RemotePath for URLs
        if mpp is not None and plausible_mpp(mpp) is None:
            raise ConfigError(f"mpp must be a positive number of microns per pixel, got {mpp!r}")
        if resample not in RESAMPLE_FILTERS:
            raise ConfigError(
                f"resample must be one of {sorted(RESAMPLE_FILTERS)}, got {resample!r}"
            )
        self._mpp_override = float(mpp) if mpp is not None else None
        self.resample = resample
        self._handle: Any = None
        self._pid: int | None = None
        self._layout = self._describe(self._get_handle())
        dims = self._layout.level_dimensions
        self._downsamples = tuple(snap_downsample(dims[0], d) for d in dims)

    # ----------------------------------------------------------------- backend hooks
    @abstractmethod
    def _open(self) -> Any:
        """Open and return the library handle; raise SlideOpenError with the reason."""

    @abstractmethod
    def _describe(self, handle: Any) -> LevelLayout:
        """Levels, mpp, vendor and properties of the opened file."""

    @abstractmethod
    def _read_level(
        self, handle: Any, level: int, lv_x: int, lv_y: int, lv_w: int, lv_h: int
    ) -> np.ndarray:
        """Samples of an in-bounds rectangle of ``level``, as ``LevelLayout.pixels`` describes."""

    @abstractmethod
    def _read_associated(self, handle: Any, name: str) -> np.ndarray:
        """One associated image (label, macro, thumbnail) as an array."""

    def _close(self, handle: Any) -> None:
        close = getattr(handle, "close", None)
        if close is not None:
            close()

    # ----------------------------------------------------------------- handle lifecycle
    def _get_handle(self) -> Any:
        if self._handle is None or self._pid != os.getpid():
            self._handle = self._open()
            self._pid = os.getpid()
        return self._handle

    def close(self) -> None:
        """Release the library handle (it is reopened on the next read)."""
        if self._handle is not None and self._pid == os.getpid():
            self._close(self._handle)
        self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_remote_file", None)  # a URL's open file: each process opens its own
        state["_handle"] = None
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"{type(self).__name__}({str(self.path)!r}, {w}x{h}, mpp={self.mpp})"

    # ----------------------------------------------------------------- metadata
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return self._layout.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self._layout.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._layout.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Level-0 pixels per level pixel (integers where the pyramid was built by integer shrinks)."""
        return self._downsamples

    @property
    def mpp(self) -> tuple[float, float] | None:
        """(x, y) microns per level-0 pixel: the override if given, else the file's, else None."""
        if self._mpp_override is not None:
            return (self._mpp_override, self._mpp_override)
        return self._layout.mpp

    @property
    def vendor(self) -> str:
        return self._layout.vendor

    @property
    def properties(self) -> Mapping[str, str]:
        return self._layout.properties

    @property
    def associated_images(self) -> dict[str, np.ndarray]:
        """Label, macro and thumbnail images stored beside the pyramid, as (H, W, 3) uint8."""
        handle = self._get_handle()
        return {n: to_rgb(self._read_associated(handle, n)) for n in self._layout.associated}

    @property
    def info(self) -> SlideInfo:
        mpp = self.mpp
        w, h = self.dimensions
        return SlideInfo(
            path=str(self.path),
            width=w,
            height=h,
            level_count=self.level_count,
            level_dimensions=self.level_dimensions,
            level_downsamples=self.level_downsamples,
            mpp_x=mpp[0] if mpp else None,
            mpp_y=mpp[1] if mpp else None,
            vendor=self.vendor,
            backend=self.backend,
        )

    def require_mpp(self) -> tuple[float, float]:
        """The slide's mpp, or a :class:`MissingMppError` that says how to supply one."""
        mpp = self.mpp
        if mpp is None:
            raise MissingMppError(
                f"no microns-per-pixel in {self.path.name}; pass mpp= to open_slide "
                f"(--slide-mpp on the command line, or an mpp column in the cohort CSV)"
            )
        return mpp

    def best_level_for_downsample(self, downsample: float) -> int:
        """The finest level that is not coarser than ``downsample`` (level-0 px per output px)."""
        best = 0
        for i, ds in enumerate(self._downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = i
        return best

    # ----------------------------------------------------------------- reading
    def read(
        self,
        x: float,
        y: float,
        w: int,
        h: int,
        *,
        mpp: float | None = None,
        level: int | None = None,
        downsample: float | None = None,
    ) -> np.ndarray:
        """Read a region as ``(h, w, 3)`` uint8 RGB.

        ``(x, y)`` is the top-left corner in level-0 pixels; ``(w, h)`` is the output size in
        pixels at the requested resolution, given as exactly one of ``mpp`` (µm/px), ``level``
        (pyramid level) or ``downsample`` (level-0 px per output px); none means level 0. Output
        pixel ``(i, j)`` covers level-0 ``[x + i*s, x + (i+1)*s)``: the region is read from the
        finest level not coarser than the target and resized with an antialiasing filter, never
        snapped to the nearest level. Areas outside the slide and transparent pixels are white.
        """
        w, h = _check_size(w, h)
        if sum(v is not None for v in (mpp, level, downsample)) > 1:
            raise ConfigError("give at most one of mpp=, level= or downsample=")
        if mpp is not None:
            if not mpp > 0:
                raise ConfigError(f"mpp must be positive, got {mpp}")
            mpp_x, mpp_y = self.require_mpp()
            sx, sy = mpp / mpp_x, mpp / mpp_y
        elif level is not None:
            if not 0 <= level < self.level_count:
                raise ConfigError(f"level must be in [0, {self.level_count - 1}], got {level}")
            sx = sy = self._downsamples[level]
        else:
            sx = sy = float(downsample) if downsample is not None else 1.0
            if not sx > 0:
                raise ConfigError(f"downsample must be positive, got {downsample}")
        return self._read_scaled(float(x), float(y), w, h, sx, sy)

    def read_level(self, level: int, lv_x: int, lv_y: int, lv_w: int, lv_h: int) -> np.ndarray:
        """Pixels of ``level`` exactly as stored, in level coordinates, white outside the level."""
        if not 0 <= level < self.level_count:
            raise ConfigError(f"level must be in [0, {self.level_count - 1}], got {level}")
        lv_w, lv_h = _check_size(lv_w, lv_h)
        return self._read_padded(level, int(lv_x), int(lv_y), lv_w, lv_h)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide, resized so its longer side is ``max_size`` pixels, as (H, W, 3)."""
        width, height = self.dimensions
        scale = max(width, height) / float(max_size)
        out_w = max(1, round(width / scale))
        out_h = max(1, round(height / scale))
        return self._read_scaled(0.0, 0.0, out_w, out_h, width / out_w, height / out_h)

    def _read_scaled(self, x: float, y: float, w: int, h: int, sx: float, sy: float) -> np.ndarray:
        level = self.best_level_for_downsample(min(sx, sy))
        ds = self._downsamples[level]
        u0, v0, kx, ky = x / ds, y / ds, sx / ds, sy / ds
        if (
            abs(kx - 1) < 1e-9
            and abs(ky - 1) < 1e-9
            and abs(u0 - round(u0)) < 1e-6
            and abs(v0 - round(v0)) < 1e-6
        ):
            return self._read_padded(level, round(u0), round(v0), w, h)
        band = max(1, int(_BAND_PIXELS // max(1.0, w * kx * ky)))
        if band >= h:
            return self._resample(level, u0, v0, w, h, kx, ky)
        out = np.empty((h, w, 3), np.uint8)
        for r0 in range(0, h, band):
            r1 = min(h, r0 + band)
            out[r0:r1] = self._resample(level, u0, v0 + r0 * ky, w, r1 - r0, kx, ky)
        return out

    def _resample(
        self, level: int, u0: float, v0: float, w: int, h: int, kx: float, ky: float
    ) -> np.ndarray:
        """Resize level pixels ``[u0, u0 + w*kx) x [v0, v0 + h*ky)`` to (h, w), with context."""
        support = _FILTER_SUPPORT[self.resample]
        pad_x = math.ceil(support * max(kx, 1.0)) + 1
        pad_y = math.ceil(support * max(ky, 1.0)) + 1
        iu0, iv0 = math.floor(u0) - pad_x, math.floor(v0) - pad_y
        iu1, iv1 = math.ceil(u0 + w * kx) + pad_x, math.ceil(v0 + h * ky) + pad_y
        src = self._read_padded(level, iu0, iv0, iu1 - iu0, iv1 - iv0)
        box = (u0 - iu0, v0 - iv0, u0 + w * kx - iu0, v0 + h * ky - iv0)
        img = Image.fromarray(src).resize((w, h), RESAMPLE_FILTERS[self.resample], box=box)
        return np.asarray(img)

    def _read_padded(self, level: int, lv_x: int, lv_y: int, lv_w: int, lv_h: int) -> np.ndarray:
        """Read a level rectangle, clipping to the level and filling the rest with white."""
        lw, lh = self._layout.level_dimensions[level]
        cx0, cy0 = max(lv_x, 0), max(lv_y, 0)
        cx1, cy1 = min(lv_x + lv_w, lw), min(lv_y + lv_h, lh)
        inside = cx1 > cx0 and cy1 > cy0
        if inside and (cx0, cy0, cx1, cy1) == (lv_x, lv_y, lv_x + lv_w, lv_y + lv_h):
            return self._read_rgb(level, lv_x, lv_y, lv_w, lv_h)
        out = np.full((lv_h, lv_w, 3), 255, np.uint8)
        if inside:
            out[cy0 - lv_y : cy1 - lv_y, cx0 - lv_x : cx1 - lv_x] = self._read_rgb(
                level, cx0, cy0, cx1 - cx0, cy1 - cy0
            )
        return out

    def _read_rgb(self, level: int, lv_x: int, lv_y: int, lv_w: int, lv_h: int) -> np.ndarray:
        tiles = self._layout.tiles
        parts = tiles.check(self.path, level, lv_x, lv_y, lv_w, lv_h) if tiles else None
        if parts is None:  # damaged tiles raised SlideReadError before decoding
            return self._decode(level, lv_x, lv_y, lv_w, lv_h)
        out = np.full((lv_h, lv_w, 3), 255, np.uint8)  # empty (sparse) tiles are background
        for x, y, w, h in parts:
            out[y - lv_y : y - lv_y + h, x - lv_x : x - lv_x + w] = self._decode(level, x, y, w, h)
        return out

    def _decode(self, level: int, lv_x: int, lv_y: int, lv_w: int, lv_h: int) -> np.ndarray:
        handle = self._get_handle()
        try:
            arr = self._read_level(handle, level, lv_x, lv_y, lv_w, lv_h)
        except SlideReadError:
            raise
        except Exception as exc:  # the C libraries raise many types; name the file and region
            self.close()  # a library handle may be left unusable (OpenSlide): reopen next read
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise SlideReadError(
                f"cannot read {self.path} with {self.backend} (level {level}, region "
                f"x={lv_x} y={lv_y} w={lv_w} h={lv_h}): tile data there is damaged ({reason}); "
                f"other regions may still read: skip this one, or re-export or re-scan the slide"
            ) from exc
        return self._layout.pixels.to_rgb(arr)


def _check_size(w: int, h: int) -> tuple[int, int]:
    if int(w) != w or int(h) != h or w < 1 or h < 1:
        raise ConfigError(f"region size must be positive integers, got w={w}, h={h}")
    return int(w), int(h)
