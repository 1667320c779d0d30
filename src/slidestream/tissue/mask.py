"""``TissueMask``: a binary tissue map that knows where it lies on the slide.

Coordinate planes: ``x, y, w, h`` are level-0 pixels; ``mask_x, mask_y`` are mask pixels. A mask
pixel ``(i, j)`` covers level-0 ``[i * dx, (i + 1) * dx) x [j * dy, (j + 1) * dy)`` where
``(dx, dy) = downsample``.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from slidestream.errors import ConfigError

__all__ = ["TissueMask", "qc_overlay"]


@dataclass(frozen=True, eq=False)
class TissueMask:
    """Boolean tissue mask of a slide.

    ``slide_dimensions`` is the slide's level-0 (width, height); ``mpp`` is microns per mask
    pixel along x, or None when the slide's mpp is unknown; ``method`` and ``params`` record how
    the mask was made.
    """

    mask: np.ndarray
    slide_dimensions: tuple[int, int]
    mpp: float | None = None
    method: str = "unknown"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mask.ndim != 2:
            raise ConfigError(f"mask must be 2-D, got shape {self.mask.shape}")
        if self.mask.dtype != bool:
            object.__setattr__(self, "mask", self.mask.astype(bool))
        w0, h0 = self.slide_dimensions
        if w0 < 1 or h0 < 1:
            raise ConfigError(f"slide_dimensions must be positive, got {self.slide_dimensions}")

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the mask array."""
        return self.mask.shape  # type: ignore[return-value]

    @property
    def downsample(self) -> tuple[float, float]:
        """Level-0 pixels per mask pixel along x and y."""
        (w0, h0), (h, w) = self.slide_dimensions, self.mask.shape
        return w0 / w, h0 / h

    @property
    def fraction(self) -> float:
        """Fraction of the slide area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def is_empty(self) -> bool:
        return not bool(self.mask.any())

    @cached_property
    def _integral(self) -> np.ndarray:
        # float32 holds every count exactly below 2**24 pixels, at half the memory
        dtype = np.float32 if self.mask.size < 2**24 else np.float64
        sat = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype)
        sat[1:, 1:] = self.mask.cumsum(0).cumsum(1)
        return sat

    def _area(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Tissue area in mask pixels of [0, u) x [0, v), exact for fractional u, v."""
        h, w = self.mask.shape
        u, v = np.clip(u, 0, w), np.clip(v, 0, h)
        u0, v0 = (
            np.minimum(np.floor(u).astype(int), w - 1),
            np.minimum(np.floor(v).astype(int), h - 1),
        )
        fu, fv = u - u0, v - v0
        s = self._integral
        return (
            (1 - fu) * (1 - fv) * s[v0, u0]
            + fu * (1 - fv) * s[v0, u0 + 1]
            + (1 - fu) * fv * s[v0 + 1, u0]
            + fu * fv * s[v0 + 1, u0 + 1]
        )

    def region_fraction(self, x: Any, y: Any, w: Any, h: Any) -> Any:
        """Tissue fraction of level-0 rectangles (scalars or arrays), area-weighted exactly.

        Parts of a rectangle outside the slide count as background.
        """
        dx, dy = self.downsample
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        w, h = np.asarray(w, np.float64), np.asarray(h, np.float64)
        u0, v0, u1, v1 = x / dx, y / dy, (x + w) / dx, (y + h) / dy
        area = self._area(u1, v1) - self._area(u0, v1) - self._area(u1, v0) + self._area(u0, v0)
        frac = area / np.maximum((u1 - u0) * (v1 - v0), 1e-12)
        frac = np.clip(frac, 0.0, 1.0)
        return float(frac) if frac.ndim == 0 else frac

    def to_mask(self, x: float, y: float) -> tuple[float, float]:
        """Level-0 (x, y) → mask (mask_x, mask_y)."""
        dx, dy = self.downsample
        return x / dx, y / dy

    def to_level0(self, mask_x: float, mask_y: float) -> tuple[float, float]:
        """Mask (mask_x, mask_y) → level-0 (x, y)."""
        dx, dy = self.downsample
        return mask_x * dx, mask_y * dy

    def bbox(self) -> tuple[int, int, int, int] | None:
        """Level-0 (x, y, w, h) bounding box of all tissue, or None for an empty mask."""
        if self.is_empty:
            return None
        rows, cols = np.flatnonzero(self.mask.any(1)), np.flatnonzero(self.mask.any(0))
        dx, dy = self.downsample
        x0, y0 = int(cols[0] * dx), int(rows[0] * dy)
        x1, y1 = int(np.ceil((cols[-1] + 1) * dx)), int(np.ceil((rows[-1] + 1) * dy))
        return x0, y0, x1 - x0, y1 - y0

    # ------------------------------------------------------------------ persistence
    def metadata(self) -> dict[str, Any]:
        h, w = self.mask.shape
        return {
            "method": self.method,
            "params": self.params,
            "mask_mpp": self.mpp,
            "mask_size": [w, h],
            "slide_size": list(self.slide_dimensions),
            "downsample": list(self.downsample),
            "fraction": self.fraction,
        }

    def save(self, path: str | os.PathLike[str], **extra: Any) -> Path:
        """Write ``path`` as a 1-bit PNG and a JSON sidecar (``.png`` → ``.json``); atomic, also
        when several processes (DataLoader workers, DDP ranks) save the same mask at once."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta_path = path.with_suffix(".json")
        tag = f"{os.getpid()}.{secrets.token_hex(4)}.tmp"  # each writer its own temporary files
        tmp_png, tmp_json = (
            path.with_name(f".{path.name}.{tag}"),
            meta_path.with_name(f".{meta_path.name}.{tag}"),
        )
        try:
            Image.fromarray(self.mask).save(tmp_png, format="PNG")  # optimize=True: 5x slower
            tmp_json.write_text(json.dumps({**self.metadata(), **extra}, indent=2))
            os.replace(tmp_png, path)
            os.replace(tmp_json, meta_path)
        finally:
            tmp_png.unlink(missing_ok=True)
            tmp_json.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TissueMask:
        """Read a mask written by :meth:`save`."""
        path = Path(path)
        meta_path = path.with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text())
            with Image.open(path) as img:
                mask = np.asarray(img.convert("1"), dtype=bool)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load tissue mask {path} (+ {meta_path.name}): {exc}"
            ) from exc
        return cls(
            mask,
            tuple(meta["slide_size"]),
            meta.get("mask_mpp"),
            meta.get("method", "?"),
            meta.get("params", {}),
        )


def qc_overlay(
    image: np.ndarray,
    mask: TissueMask,
    color: tuple[int, int, int] = (0, 200, 0),
    thickness: int = 2,
) -> np.ndarray:
    """``image`` (a thumbnail of the whole slide) with the tissue outline drawn on it."""
    from scipy import ndimage

    h, w = image.shape[:2]
    resized = np.asarray(Image.fromarray(mask.mask).resize((w, h), Image.Resampling.NEAREST))
    edge = resized ^ ndimage.binary_erosion(resized, iterations=max(1, thickness), border_value=0)
    out = image.copy()
    out[edge] = color
    return out
