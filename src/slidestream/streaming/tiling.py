"""Tile geometry for streaming: output stride, dependency margins and the tile grid.

Coordinates are per axis. ``S`` is the trunk's output stride (input px per output px). Output
position ``o`` depends on input pixels inside ``[o*S + lo, o*S + hi]`` (input px, inclusive),
where ``lo <= 0 <= hi`` for usual trunks; the receptive field is ``hi - lo + 1`` px.

A tile owns an aligned block of output positions (its *core*); it is computed from the input
*crop* that covers the core's dependencies, clipped to the image. A crop that does not start
at the image's first pixel starts at a multiple of ``S``, so every layer of the trunk sees the
crop on the same grid as the full image, and a crop that reaches an image edge is padded by
the trunk's own layers exactly as the full image is. All functions here are pure and cached.
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
    """

    stride: int
    lo: int
    hi: int

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise StreamingError(f"stride must be >= 1, got {self.stride}")
        if self.hi < self.lo:
            raise StreamingError(f"hi must be >= lo, got lo={self.lo}, hi={self.hi}")

    @property
    def receptive_field(self) -> int:
        """Receptive field in input px."""
        return self.hi - self.lo + 1

    def covers(self, other: AxisGeometry) -> bool:
        """True when these bounds include every dependency of ``other`` (same stride)."""
        return self.stride == other.stride and self.lo <= other.lo and self.hi >= other.hi


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
    dependency margins, start at a multiple of the stride (or 0) and are clipped to the image.
    """
    s = geom.stride
    if tile % s:
        raise StreamingError(f"tile_size must be a multiple of {s}, got {tile}")
    if out_size < 1:
        raise StreamingError(f"image side of {size} px gives an empty output")
    step = tile // s
    tiles = []
    for o0 in range(0, out_size, step):
        o1 = min(o0 + step, out_size)
        a = max(0, (o0 * s + geom.lo) // s * s)  # floored to a multiple of the stride
        b = min(size, (o1 - 1) * s + geom.hi + 1)
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


# --- measuring a trunk -----------------------------------------------------------------------

_STRIDE_DELTA = 2**10 * 3**2 * 5 * 7  # input px; every stride dividing it is found exactly
_PROBE_MAX = 8192  # input px; a trunk whose dependencies do not fit is treated as non-local


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


def measure_strides(trunk: nn.Module, in_channels: int) -> tuple[int, int]:
    """Output stride (y, x) in input px per output px, from output sizes on the meta device."""
    base = 4096
    n1 = output_size(trunk, in_channels, (base, base))
    n2 = output_size(trunk, in_channels, (base + _STRIDE_DELTA, base + _STRIDE_DELTA))
    strides = []
    for a, b in zip(n1, n2, strict=True):
        if b <= a:
            raise StreamingError(
                f"the trunk is not spatially local: its output size does not grow with the input; "
                f"{find_spreader(trunk, in_channels)} pools over the whole image; move it to the head"
            )
        if _STRIDE_DELTA % (b - a):
            raise StreamingError(
                "the trunk's output size does not shrink by an integer stride "
                f"({a} -> {b} outputs for {_STRIDE_DELTA} more input px); upsampling cannot be streamed"
            )
        strides.append(_STRIDE_DELTA // (b - a))
    return strides[0], strides[1]


def _min_side(trunk: nn.Module, in_channels: int, axis: int, stride: int) -> int:
    """Smallest multiple of ``stride`` px along ``axis`` that gives a non-empty output."""
    for k in range(1, 65):
        hw = (4096, k * stride) if axis == 1 else (k * stride, 4096)
        try:
            if output_size(trunk, in_channels, hw)[axis] >= 1:
                return k * stride
        except StreamingError:
            continue
    raise StreamingError("could not find an input size the trunk accepts")


def _probe_axis(
    trunk: nn.Module, in_channels: int, axis: int, stride: int, cross: int
) -> AxisGeometry | None:
    """Measure (lo, hi) along ``axis`` (0 = y, 1 = x) with a band of NaN rows or columns."""
    dtype, device = _float_dtype(trunk), _device(trunk)
    n = max(256, 16 * stride)
    while n <= _PROBE_MAX:
        n = -(-n // stride) * stride
        hw = (n, cross) if axis == 0 else (cross, n)
        x = torch.zeros(1, in_channels, *hw, dtype=dtype, device=device)
        band = (n // 2 // stride) * stride
        x.narrow(2 + axis, band, stride).fill_(float("nan"))
        with torch.no_grad():
            out = trunk(x)
        hit = out.isnan().transpose(0, 2 + axis).reshape(out.shape[2 + axis], -1).any(dim=1)
        idx = hit.nonzero().flatten().tolist()
        if not idx:
            raise StreamingError("the trunk's output does not depend on its input (probe)")
        first, last, m = idx[0], idx[-1], hit.numel()
        lo, hi = axis_bounds_from_probe(stride, band, first, last)
        inside = first * stride + lo >= stride and last * stride + hi + stride < n
        if first > 0 and last < m - 1 and inside:
            return AxisGeometry(stride, lo, hi)
        n *= 2
    return None


def find_spreader(trunk: nn.Module, in_channels: int) -> str:
    """Name the first module whose output mixes a single NaN pixel into every position."""
    dtype, device = _float_dtype(trunk), _device(trunk)
    found: list[str] = []
    hooks = []
    for name, mod in trunk.named_modules():
        if next(mod.children(), None) is not None:
            continue

        def hook(m, inp, out, name=name):
            if found or not isinstance(out, torch.Tensor) or out.dim() < 3:
                return
            if out.numel() > 1 and bool(out.isnan().all()):
                found.append(f"{name!r} ({type(m).__name__})")

        hooks.append(mod.register_forward_hook(hook))
    try:
        x = torch.zeros(1, in_channels, 512, 512, dtype=dtype, device=device)
        x[:, :, 256, 256] = float("nan")
        with torch.no_grad():
            trunk(x)
    except Exception:  # noqa: BLE001 - only used to improve an error message
        pass
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else "an operation outside named modules"


_ALWAYS_REFUSED: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.GroupNorm, "GroupNorm normalises over the whole image; use BatchNorm in eval mode"),
    (nn.AdaptiveAvgPool2d, "adaptive/global pooling sees the whole image; move it to the head"),
    (nn.AdaptiveMaxPool2d, "adaptive/global pooling sees the whole image; move it to the head"),
    (nn.MultiheadAttention, "attention mixes all positions; move it to the head"),
    (
        nn.Flatten,
        "a flattened map (e.g. for a Linear layer) is not spatially local; move it to the head",
    ),
    (nn.Unflatten, "reshaping a map is not spatially local; move it to the head"),
)


def _refusal(mod: nn.Module) -> str | None:
    """Why ``mod`` cannot be streamed exactly, or None."""
    for cls, why in _ALWAYS_REFUSED:
        if isinstance(mod, cls):
            return why
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (
        mod.training or mod.running_mean is None
    ):
        return "batch statistics span the whole image; call .eval() on it (affine stays trainable)"
    if isinstance(mod, nn.modules.instancenorm._InstanceNorm) and (
        mod.training or mod.running_mean is None
    ):
        return "instance statistics span the whole image; use running statistics in eval mode"
    if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) > 1:
        return "LayerNorm over more than the channel axis spans the image"
    if "Attention" in type(mod).__name__:
        return "attention mixes all positions; move it to the head"
    dropout = isinstance(mod, nn.modules.dropout._DropoutNd) or type(mod).__name__ in (
        "StochasticDepth",
        "DropPath",
    )
    if dropout and mod.training and float(getattr(mod, "p", getattr(mod, "drop_prob", 0.0))) > 0:
        return "dropout in training mode draws a different mask per tile; call .eval() on it"
    return None


def check_streamable(trunk: nn.Module) -> None:
    """Raise :class:`StreamingError` naming the first module that is not spatially local."""
    for name, mod in trunk.named_modules():
        why = _refusal(mod)
        if why:
            raise StreamingError(f"cannot stream module {name!r} ({type(mod).__name__}): {why}")


def probe_geometry(trunk: nn.Module, in_channels: int) -> TrunkGeometry:
    """Measure a trunk's stride and dependency bounds on both axes (input px).

    NaN propagates through every arithmetic op regardless of weights, so the set of outputs a
    band of NaN input rows reaches is the trunk's structural dependency, independent of the
    weights, of dead ReLUs and of max-pool choices. Bounds are conservative by < stride px.
    """
    check_streamable(trunk)
    sy, sx = measure_strides(trunk, in_channels)
    y = _probe_axis(trunk, in_channels, 0, sy, _min_side(trunk, in_channels, 1, sx))
    x = _probe_axis(trunk, in_channels, 1, sx, _min_side(trunk, in_channels, 0, sy)) if y else None
    if y is None or x is None:
        raise StreamingError(
            f"the trunk is not spatially local: {find_spreader(trunk, in_channels)} lets one "
            f"pixel influence outputs more than {_PROBE_MAX // 2} px away; stream only the "
            "convolutional part and run pooling/attention in the head"
        )
    return TrunkGeometry(y, x)
