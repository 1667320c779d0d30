"""Measuring a trunk: refusals, analytic bounds and two probes that cannot be fooled alone.

:func:`probe_geometry` combines three views of a trunk's dependencies and keeps their union:
the analytic bounds of :mod:`slidestream.streaming.analysis` (every tap of every known op), a
float64 *gradient probe* (the support of the input gradient of a band of output positions:
weights and data are real, so a ``torch.where`` that turns NaN into 0 cannot hide a tap) and a
*NaN probe* (a band of NaN input rows reaches every output that depends on it through any
arithmetic, even where a gradient is zero). Each probe image is sized from the analytic
extent, so a dilation of 1300 px is measured on an image that contains its taps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from slidestream.errors import StreamingError
from slidestream.streaming.analysis import AxisBounds, analyse_trunk
from slidestream.streaming.tiling import (
    AxisGeometry,
    TrunkGeometry,
    _device,
    _float_dtype,
    output_size,
)

__all__ = ["check_streamable", "find_spreader", "probe_geometry"]

_PROBE_MAX = 8192  # input px; beyond max(this, 4x the analytic extent): not spatially local
_BIG = 2**4 * 3**3 * 5 * 7  # input px on the meta device, divisible by every small factor
_BLIND, _EDGE = "blind", "edge"  # a probe saw no dependency / one that reaches its edge


def _check_grows(trunk: nn.Module, in_channels: int) -> None:
    """Refuse a trunk whose output size does not grow with its input (a global op)."""
    n1 = output_size(trunk, in_channels, (_BIG // 2, _BIG // 2))
    n2 = output_size(trunk, in_channels, (_BIG, _BIG))
    if n2[0] <= n1[0] or n2[1] <= n1[1]:
        raise StreamingError(
            f"the trunk is not spatially local: its output size does not grow with the input; "
            f"{find_spreader(trunk, in_channels)} pools over the whole image; move it to the head"
        )


def _min_side(trunk: nn.Module, in_channels: int, axis: int, b: AxisBounds) -> int:
    """Smallest multiple of the stride px along ``axis`` that gives a non-empty output."""
    stride = int(b.stride)
    rf = -(-(b.hi - b.lo + 1) // stride)
    for k in sorted({*range(1, 65), *range(rf, rf + 65)}):
        hw = (_BIG, k * stride) if axis == 1 else (k * stride, _BIG)
        try:
            if output_size(trunk, in_channels, hw)[axis] >= 1:
                return k * stride
        except StreamingError:
            continue
    raise StreamingError("could not find an input size the trunk accepts")


def _span(hit: torch.Tensor) -> tuple[int, int] | None:
    idx = hit.nonzero().flatten()
    return (int(idx[0]), int(idx[-1])) if idx.numel() else None


def _along(t: torch.Tensor, axis: int) -> torch.Tensor:
    """(positions along ``axis``, everything else) view of an (N, C, H, W) tensor."""
    return t.transpose(0, 2 + axis).reshape(t.shape[2 + axis], -1)


def _grad_probe(trunk: nn.Module, x: torch.Tensor, axis: int, s: int, phases: int):
    """(lo, hi) of outputs ``m .. m + phases - 1`` from their input-gradient support, or None."""
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        out = trunk(x)
        m = out.shape[2 + axis] // 2
        g = torch.zeros_like(out)
        band = g.narrow(2 + axis, m, min(phases, out.shape[2 + axis] - m))
        band.copy_(torch.randn(band.shape, dtype=band.dtype, device=band.device))
        (grad,) = torch.autograd.grad(out, x, g)
    span = _span(_along(grad, axis).ne(0).any(dim=1))
    if span is None:
        return _BLIND
    if span[0] == 0 or span[1] == x.shape[2 + axis] - 1:
        return _EDGE
    return span[0] - (m + phases - 1) * s, span[1] - m * s


def _nan_probe(trunk: nn.Module, x: torch.Tensor, axis: int, s: int, align: int):
    """(lo, hi) from the outputs a band of NaN input rows reaches, or None (see module doc)."""
    n = x.shape[2 + axis]
    x = x.clone()
    band = (n // 2 // align) * align
    x.narrow(2 + axis, band, align).fill_(float("nan"))
    with torch.no_grad():
        out = trunk(x)
    span = _span(_along(out, axis).isnan().any(dim=1))
    if span is None:  # e.g. torch.where(x > 0, x, 0) turns NaN into 0: the gradient decides
        return _BLIND
    if span[0] == 0 or span[1] == out.shape[2 + axis] - 1:
        return _EDGE
    return band - span[1] * s, band + align - 1 - span[0] * s


def _probe_axis(
    trunk: nn.Module, in_channels: int, axis: int, b: AxisBounds, cross: int
) -> AxisGeometry | None:
    """Union of the analytic bounds and both probes along ``axis`` (0 = y, 1 = x)."""
    s, al = int(b.stride), b.align
    extent = b.hi - b.lo + 1
    n = max(64, extent + 4 * al)  # the middle output's taps fit; doubled if they do not
    limit = max(_PROBE_MAX, 4 * extent + 16 * al)
    dtype, device = _float_dtype(trunk), _device(trunk)
    gen = torch.Generator(device="cpu").manual_seed(0)
    while n <= limit:
        n = -(-n // al) * al
        hw = (n, cross) if axis == 0 else (cross, n)
        x = torch.randn(1, in_channels, *hw, generator=gen, dtype=torch.float64)
        x = x.to(device=device, dtype=dtype)
        seen = [_grad_probe(trunk, x, axis, s, al // s), _nan_probe(trunk, x, axis, s, al)]
        if _EDGE not in seen:
            spans = [(b.lo, b.hi), *(p for p in seen if p != _BLIND)]
            if len(spans) == 1:
                raise StreamingError("the trunk's output does not depend on its input (probe)")
            lo, hi = min(p[0] for p in spans), max(p[1] for p in spans)
            return AxisGeometry(s, lo, hi, al, b.size_multiple)
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
    if getattr(mod, "padding_mode", "zeros") == "circular":
        return "circular padding wraps onto the opposite image edge, which a crop does not see"
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


def _float64_copy(trunk: nn.Module) -> nn.Module:
    """A float64 copy of ``trunk`` on its device for the probes (the trunk itself if that fails)."""
    try:
        return copy.deepcopy(trunk).to(torch.float64)
    except Exception:  # noqa: BLE001 - e.g. a trunk holding a non-copyable handle
        return trunk


def probe_geometry(trunk: nn.Module, in_channels: int) -> TrunkGeometry:
    """Measure a trunk's stride, phase grid and dependency bounds on both axes (input px).

    The bounds are the union of the analytic bounds (every tap of every convolution, pooling,
    interpolation, pixel (un)shuffle and padding op, see :mod:`.analysis`), of the support
    of the float64 input gradient of a band of outputs and of the outputs a band of NaN input
    rows reaches; the probe images are sized from the analytic extent. Raises
    :class:`StreamingError` naming the module when the trunk cannot be streamed exactly.
    """
    check_streamable(trunk)
    by, bx = analyse_trunk(trunk, in_channels, _float_dtype(trunk))
    _check_grows(trunk, in_channels)
    probe = _float64_copy(trunk)
    y = _probe_axis(probe, in_channels, 0, by, _min_side(trunk, in_channels, 1, bx))
    x = _probe_axis(probe, in_channels, 1, bx, _min_side(trunk, in_channels, 0, by)) if y else None
    if y is None or x is None:
        raise StreamingError(
            f"the trunk is not spatially local: {find_spreader(trunk, in_channels)} lets one "
            "pixel influence outputs farther away than the probe images reach; stream only the "
            "convolutional part and run pooling/attention in the head"
        )
    return TrunkGeometry(y, x)
