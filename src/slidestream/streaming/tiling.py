"""Tile geometry for streaming: output stride, dependency margins and the tile grid.

Coordinates are per axis. ``S`` is the trunk's output stride (input px per output px). Output
position ``o`` depends on input pixels inside ``[o*S + lo, o*S + hi]`` (input px, inclusive),
where ``lo <= 0 <= hi`` for usual trunks; the receptive field is ``hi - lo + 1`` px.

A tile owns an aligned block of output positions (its *core*); it is computed from the input
*crop* that covers the core's dependencies, clipped to the image. A crop that does not start
at the image's first pixel starts at a multiple of ``align`` (a multiple of ``S`` that is also
a multiple of every inner layer's stride, so every layer of the trunk sees the crop on the same
phase grid as the full image), and a crop that reaches an image edge is padded by the trunk's
own layers exactly as the full image is. All functions here are pure and cached.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from slidestream.errors import StreamingError

__all__ = [
    "AxisGeometry",
    "TrunkGeometry",
    "AxisTile",
    "Tile",
    "TilePlan",
    "axis_bounds_from_probe",
    "plan_axis",
    "plan_tiles",
    "normalize_tile_size",
]


@dataclass(frozen=True)
class AxisGeometry:
    """Dependency geometry of a trunk along one axis (all values in input px).

    Output position ``o`` depends only on input pixels ``[o*stride + lo, o*stride + hi]``.
    Crops that do not start at the image edge start on a multiple of ``align`` (0: the
    stride); crops that do not end at the image edge have a length that is a multiple of
    ``size_multiple`` (e.g. a ``PixelUnshuffle`` needs even lengths).
    """

    stride: int
    lo: int
    hi: int
    align: int = 0
    size_multiple: int = 1

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise StreamingError(f"stride must be >= 1, got {self.stride}")
        if self.hi < self.lo:
            raise StreamingError(f"hi must be >= lo, got lo={self.lo}, hi={self.hi}")
        if self.align == 0:
            object.__setattr__(self, "align", self.stride)
        if self.align % self.stride or self.size_multiple < 1:
            raise StreamingError(
                f"align must be a multiple of the stride {self.stride} and size_multiple "
                f"positive, got align={self.align}, size_multiple={self.size_multiple}"
            )

    @property
    def receptive_field(self) -> int:
        """Receptive field in input px."""
        return self.hi - self.lo + 1

    def covers(self, other: AxisGeometry) -> bool:
        """True when these bounds include every dependency of ``other`` (same stride) and
        keep its phase grid and crop-length rule."""
        return (
            self.stride == other.stride
            and self.lo <= other.lo
            and self.hi >= other.hi
            and self.align % other.align == 0
            and self.size_multiple % other.size_multiple == 0
        )


@dataclass(frozen=True)
class TrunkGeometry:
    """Dependency geometry of a trunk along y (rows) and x (columns)."""

    y: AxisGeometry
    x: AxisGeometry

    def covers(self, other: TrunkGeometry) -> bool:
        return self.y.covers(other.y) and self.x.covers(other.x)


@dataclass(frozen=True)
class AxisTile:
    """One tile along one axis.

    ``out_start:out_stop`` is the core in output px of the full map; ``in_start:in_stop`` the
    input crop in input px; ``crop_offset`` the core's first position in the crop's output.
    """

    out_start: int
    out_stop: int
    in_start: int
    in_stop: int
    crop_offset: int

    @property
    def crop_size(self) -> int:
        return self.in_stop - self.in_start

    @property
    def out_size(self) -> int:
        return self.out_stop - self.out_start


@dataclass(frozen=True)
class Tile:
    """A 2-D tile: the product of a row tile and a column tile."""

    y: AxisTile
    x: AxisTile

    @property
    def crop_shape(self) -> tuple[int, int]:
        """(h, w) of the input crop in px."""
        return (self.y.crop_size, self.x.crop_size)


@dataclass(frozen=True)
class TilePlan:
    """The tile grid of one image size: row tiles x column tiles."""

    rows: tuple[AxisTile, ...]
    cols: tuple[AxisTile, ...]
    in_size: tuple[int, int]  # (h, w) input px
    out_size: tuple[int, int]  # (h, w) output px

    def __iter__(self) -> Iterator[Tile]:
        for ty in self.rows:
            for tx in self.cols:
                yield Tile(ty, tx)

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def recompute_factor(self) -> float:
        """Input pixels processed by one pass over all crops / image pixels."""
        ys = sum(t.crop_size for t in self.rows)
        xs = sum(t.crop_size for t in self.cols)
        return ys * xs / (self.in_size[0] * self.in_size[1])


def normalize_tile_size(
    tile_size: int | tuple[int, int], stride: tuple[int, int]
) -> tuple[int, int]:
    """Return (h, w) tile size in input px, checking it is a positive multiple of the stride."""
    th, tw = (tile_size, tile_size) if isinstance(tile_size, int) else tuple(tile_size)
    for name, t, s in (("height", th, stride[0]), ("width", tw, stride[1])):
        if not isinstance(t, int) or t <= 0:
            raise StreamingError(f"tile {name} must be a positive int, got {t!r}")
        if t % s:
            raise StreamingError(
                f"tile_size must be a multiple of {s}, got {t} "
                f"({s} px is the trunk's output stride; try {max(s, round(t / s) * s)})"
            )
    return th, tw


def axis_bounds_from_probe(stride: int, band_start: int, first: int, last: int) -> tuple[int, int]:
    """Conservative ``(lo, hi)`` from a probe (input px).

    The probe marks input rows ``[band_start, band_start + stride)`` (NaN) and observes that
    exactly the outputs ``first..last`` change. For every output ``o`` the first and last
    input it depends on, ``o*S + lo`` and ``o*S + hi``, each form a progression of step ``S``
    that hits the band exactly once, so ``hi <= band_start + S - 1 - first*S`` and
    ``lo >= band_start - last*S``; these bounds are off by at most ``S - 1`` px.
    """
    lo = band_start - last * stride
    hi = band_start + stride - 1 - first * stride
    return lo, hi


@functools.lru_cache(maxsize=256)
def plan_axis(geom: AxisGeometry, size: int, out_size: int, tile: int) -> tuple[AxisTile, ...]:
    """Tiles along one axis of ``size`` input px whose full output has ``out_size`` px.

    ``tile`` (input px, a multiple of the stride) is the core each tile owns; crops add the
    dependency margins, start at a multiple of ``geom.align`` (or 0), have a length that is a
    multiple of ``geom.size_multiple`` (or end at the image edge) and are clipped to the image.
    """
    s, al, m = geom.stride, geom.align, geom.size_multiple
    if tile % s:
        raise StreamingError(f"tile_size must be a multiple of {s}, got {tile}")
    if out_size < 1:
        raise StreamingError(f"image side of {size} px gives an empty output")
    step = tile // s
    tiles = []
    for o0 in range(0, out_size, step):
        o1 = min(o0 + step, out_size)
        a = max(0, (o0 * s + geom.lo) // al * al)  # floored onto the phase grid
        b = min(size, (o1 - 1) * s + geom.hi + 1)
        if b < size and (b - a) % m:
            b = min(size, a + -(-(b - a) // m) * m)
        if b <= a:
            raise StreamingError(f"empty crop for output rows {o0}:{o1} of an image of {size} px")
        tiles.append(AxisTile(o0, o1, a, b, o0 - a // s))
    return tuple(tiles)


@functools.lru_cache(maxsize=256)
def plan_tiles(
    geom: TrunkGeometry, in_size: tuple[int, int], out_size: tuple[int, int], tile: tuple[int, int]
) -> TilePlan:
    """The 2-D tile plan of an image of ``in_size`` (h, w) input px, cached."""
    rows = plan_axis(geom.y, in_size[0], out_size[0], tile[0])
    cols = plan_axis(geom.x, in_size[1], out_size[1], tile[1])
    return TilePlan(rows, cols, tuple(in_size), tuple(out_size))


# --- sizes on the meta device ----------------------------------------------------------


def output_size(trunk: nn.Module, in_channels: int, hw: tuple[int, int]) -> tuple[int, int]:
    """Output (h, w) of ``trunk`` for an input of ``hw`` (h, w) px, computed on the meta device."""
    return output_shape(trunk, in_channels, hw)[1:]


def output_shape(trunk: nn.Module, in_channels: int, hw: tuple[int, int]) -> tuple[int, int, int]:
    """Output (c, h, w) of ``trunk`` for an input of ``hw`` (h, w) px, on the meta device."""
    state = {
        k: torch.empty_like(v, device="meta")
        for k, v in (*trunk.named_parameters(), *trunk.named_buffers())
    }
    x = torch.empty(1, in_channels, *hw, device="meta", dtype=_float_dtype(trunk))
    try:
        with torch.no_grad():
            out = torch.func.functional_call(trunk, state, (x,))
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise StreamingError(
            f"cannot infer the trunk's output size for a {hw[1]}x{hw[0]} input "
            f"({type(exc).__name__}: {exc}); is the input large enough for the trunk?"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise StreamingError("the trunk must map (N, C, H, W) to a 4-D feature map (N, C, h, w)")
    return int(out.shape[1]), int(out.shape[2]), int(out.shape[3])


def _float_dtype(trunk: nn.Module) -> torch.dtype:
    for p in trunk.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _device(trunk: nn.Module) -> torch.device:
    for p in trunk.parameters():
        return p.device
    return torch.device("cpu")
