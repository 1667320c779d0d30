"""Analytic dependency bounds of a trunk: every spatial op traced once on the meta device.

The trunk runs on a meta tensor that is huge along one axis (``_N`` px) under a
``TorchFunctionMode`` that sees every functional call, so ops written in a ``forward()`` count
as much as modules. Each spatial op (convolution, transposed convolution, pooling,
interpolation, pixel (un)shuffle, padding) has an exact rule: its output position ``r`` reads
inputs at ``r*J_out + [lo, hi]`` (input px), where ``J_in``/``J_out`` (input px per position of
its input/output) follow from the traced sizes. Summing the negative ``lo`` and the positive
``hi`` of all ops bounds every path through the graph, residual branches included. Crops must
start on a multiple of every ``J``'s numerator (the *phase grid*: an inner upsampling by 2 after
a stride of 4 needs crops on multiples of 4, not of the net stride 2). Ops that cannot be
streamed exactly are refused in one line naming the innermost module that called them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from slidestream.errors import StreamingError

__all__ = ["AxisBounds", "analyse_trunk"]

_N = 2**20 * 3**4 * 5**2 * 7  # traced axis, input px: every jump with small factors is exact
_CROSS = 2**4 * 3**3 * 5 * 7  # the other axis, input px
_SPATIAL = {"conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "interpolate"}
_SPATIAL |= {"pixel_shuffle", "pixel_unshuffle", "pad"}
_REFUSED = {
    "roll": "torch.roll wraps around the image edges",
    "flip": "flipping maps each position to a far-away one",
    "fliplr": "flipping maps each position to a far-away one",
    "flipud": "flipping maps each position to a far-away one",
    "rot90": "rotation maps each position to a far-away one",
    "grid_sample": "grid_sample reads positions given by data",
    "affine_grid": "affine_grid builds position-dependent inputs",
    "arange": "torch.arange builds a position-dependent input",
    "linspace": "torch.linspace builds a position-dependent input",
    "meshgrid": "torch.meshgrid builds a position-dependent input",
    "adaptive_avg_pool2d": "adaptive pooling sees the whole image; move it to the head",
    "adaptive_max_pool2d": "adaptive pooling sees the whole image; move it to the head",
    "group_norm": "GroupNorm normalises over the whole image; use BatchNorm in eval mode",
    "scaled_dot_product_attention": "attention mixes all positions; move it to the head",
    "fft_fft2": "a Fourier transform mixes all positions",
    "fft_rfft2": "a Fourier transform mixes all positions",
    "fractional_max_pool2d": "fractional max pooling draws random regions per call",
    "fold": "fold/unfold re-arranges positions; use convolutions",
    "unfold": "fold/unfold re-arranges positions; use convolutions",
}


@dataclass(frozen=True)
class AxisBounds:
    """Analytic bounds along one axis (input px): deps of output ``o`` lie in
    ``[o*stride + lo, o*stride + hi]``; crops start on multiples of ``align`` and their length
    is a multiple of ``size_multiple`` unless they end at the image edge."""

    stride: Fraction
    lo: int
    hi: int
    align: int
    size_multiple: int


def _pair(v: Any, axis: int) -> Any:
    if isinstance(v, list | tuple):
        return v[axis] if len(v) > 1 else v[0]
    return v


def _slices_space(args: tuple) -> bool:
    """True when ``tensor[index]`` on an (N, C, H, W) tensor selects along H or W."""
    if len(args) < 2 or not isinstance(args[0], torch.Tensor) or args[0].dim() != 4:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    if any(i is Ellipsis for i in index):
        k = index.index(Ellipsis)
        fill = 4 - (len(index) - 1 - sum(i is None for i in index))
        index = (*index[:k], *[slice(None)] * fill, *index[k + 1 :])
    return any(i != slice(None) for i in index[2:4])


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


class _Tracer(TorchFunctionMode):
    """Records (lo, hi) of each spatial op along ``axis`` and the jumps it sees."""

    def __init__(self, axis: int, names: list[str]) -> None:
        super().__init__()
        self.axis, self.names = axis, names
        self.lo, self.hi = Fraction(0), Fraction(0)
        self.jumps: set[Fraction] = set()
        self.size_multiple = 1
        self.final = Fraction(1)

    def where(self) -> str:
        return self.names[-1] if self.names else "the trunk's forward()"

    def refuse(self, why: str) -> None:
        raise StreamingError(f"cannot stream module {self.where()}: {why}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _REFUSED:
            self.refuse(_REFUSED[name])
        if name == "rrelu" and _arg(args, kwargs, 3, "training", False):
            self.refuse("RReLU in training mode draws random slopes per call; call .eval() on it")
        if name == "__getitem__" and _slices_space(args):
            self.refuse(
                "indexing or slicing a feature map along H/W is not shift-invariant; "
                "use a strided conv or pool"
            )
        out = func(*args, **kwargs)
        if name in _SPATIAL and isinstance(out, torch.Tensor) and out.dim() == 4:
            self._record(name, args, kwargs, out)
        return out

    def _jump(self, t: torch.Tensor) -> Fraction:
        return Fraction(_N, int(t.shape[2 + self.axis])).limit_denominator(1024)

    def _record(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        j_in, j_out = self._jump(args[0]), self._jump(out)
        lo, hi = getattr(self, "_" + name)(args, kwargs, j_in, j_out)
        self.lo += min(Fraction(0), lo)
        self.hi += max(Fraction(0), hi)
        self.jumps |= {j_in, j_out}

    # --- per-op rules: (lo, hi) of output r relative to r * j_out, input px --------------------
    def _window(self, k: int, s: Any, p: Any, d: Any, j_in: Fraction) -> tuple[Fraction, Fraction]:
        a = self.axis
        s, p, d = int(_pair(s, a)), _pair(p, a), int(_pair(d, a))
        extent = (k - 1) * d + 1
        if p == "valid":
            p = 0
        elif p == "same":
            p = (extent - 1) // 2
        return -int(p) * j_in, (extent - 1 - int(p)) * j_in

    def _conv2d(self, args, kwargs, j_in, j_out):
        k = int(_arg(args, kwargs, 1, "weight", None).shape[2 + self.axis])
        s = _arg(args, kwargs, 3, "stride", 1)
        p, d = _arg(args, kwargs, 4, "padding", 0), _arg(args, kwargs, 5, "dilation", 1)
        return self._window(k, s, p, d, j_in)

    def _conv_transpose2d(self, args, kwargs, j_in, j_out):
        a = self.axis
        k = int(_arg(args, kwargs, 1, "weight", None).shape[2 + a])
        p = int(_pair(_arg(args, kwargs, 4, "padding", 0), a))
        d = int(_pair(_arg(args, kwargs, 7, "dilation", 1), a))
        return (p - (k - 1) * d) * j_out, p * j_out

    def _max_pool2d(self, args, kwargs, j_in, j_out):
        k = int(_pair(_arg(args, kwargs, 1, "kernel_size", None), self.axis))
        p, d = _arg(args, kwargs, 3, "padding", 0), _arg(args, kwargs, 4, "dilation", 1)
        return self._window(k, 1, p, d, j_in)

    def _avg_pool2d(self, args, kwargs, j_in, j_out):
        k = int(_pair(_arg(args, kwargs, 1, "kernel_size", None), self.axis))
        return self._window(k, 1, _arg(args, kwargs, 3, "padding", 0), 1, j_in)

    def _interpolate(self, args, kwargs, j_in, j_out):
        size, scale = (
            _arg(args, kwargs, 1, "size", None),
            _arg(args, kwargs, 2, "scale_factor", None),
        )
        mode = _arg(args, kwargs, 3, "mode", "nearest")
        factor = j_in / j_out
        if size is not None or scale is None or factor.denominator != 1 or factor < 1:
            self.refuse(
                f"interpolation to a given size or by a non-integer scale (x{factor}) is not "
                "shift-invariant; upsample by an integer scale_factor"
            )
        if float(_pair(scale, self.axis)) != float(factor):
            self.refuse(f"scale_factor {scale} does not match the traced sizes (x{factor})")
        if _arg(args, kwargs, 4, "align_corners", None):
            self.refuse("align_corners=True scales by the image size; use align_corners=False")
        if mode == "nearest":  # output r reads input floor(r / factor)
            return -(factor - 1) * j_out, Fraction(0)
        if mode in ("nearest-exact", "bilinear", "bicubic"):  # taps within 2 (3) input px
            return -(3 if mode == "bicubic" else 2) * j_in, 2 * j_in
        self.refuse(f"interpolation mode {mode!r} is not supported inside a streamed trunk")
        raise AssertionError  # unreachable

    def _pixel_shuffle(self, args, kwargs, j_in, j_out):
        return -(j_in - j_out), Fraction(0)

    def _pixel_unshuffle(self, args, kwargs, j_in, j_out):
        self.size_multiple = math.lcm(self.size_multiple, j_out.numerator)
        return Fraction(0), j_out - j_in

    def _pad(self, args, kwargs, j_in, j_out):
        pads = list(_arg(args, kwargs, 1, "pad", ()))
        mode = _arg(args, kwargs, 2, "mode", "constant")
        i = 2 * (1 - self.axis)  # F.pad lists the last dim first
        left, right = (pads[i], pads[i + 1]) if len(pads) > i + 1 else (0, 0)
        if mode == "circular" and (left or right):
            self.refuse(
                "circular padding wraps onto the opposite image edge, which a crop does not see"
            )
        if mode in ("reflect", "replicate"):  # mirrored reads stay within pad px of the edge
            return -(left + 2 * right) * j_in, left * j_in
        return -left * j_in, -left * j_in


def _meta_state(trunk: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: torch.empty_like(v, device="meta")
        for k, v in (*trunk.named_parameters(), *trunk.named_buffers())
    }


def _name_hooks(trunk: nn.Module, names: list[str]) -> list:
    hooks = []
    for name, mod in trunk.named_modules():
        label = f"{name or '<trunk>'!r} ({type(mod).__name__})"

        def push(m, inp, label=label):
            names.append(label)

        def pop(m, inp, out):
            names.pop()

        hooks += [mod.register_forward_pre_hook(push), mod.register_forward_hook(pop)]
    return hooks


def _trace_axis(trunk: nn.Module, in_channels: int, axis: int, dtype: torch.dtype) -> _Tracer:
    names: list[str] = []
    tracer = _Tracer(axis, names)
    hw = (_N, _CROSS) if axis == 0 else (_CROSS, _N)
    x = torch.empty(1, in_channels, *hw, device="meta", dtype=dtype)
    hooks = _name_hooks(trunk, names)
    try:
        with torch.no_grad(), tracer:
            out = torch.func.functional_call(trunk, _meta_state(trunk), (x,))
    except StreamingError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise StreamingError(
            f"cannot trace the trunk on a {hw[1]}x{hw[0]} meta image at {tracer.where()} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "stream only the convolutional part"
        ) from exc
    finally:
        for h in hooks:
            h.remove()
    tracer.final = tracer._jump(out)
    tracer.jumps.add(tracer.final)
    return tracer


def analyse_trunk(
    trunk: nn.Module, in_channels: int, dtype: torch.dtype
) -> tuple[AxisBounds, AxisBounds]:
    """Analytic (y, x) bounds of ``trunk`` (input px), from one meta-device trace per axis.

    Raises :class:`StreamingError` naming the module of an op that cannot be streamed
    exactly, or when the trunk's output stride is not a whole number of px.
    """
    axes = []
    for axis in (0, 1):
        t = _trace_axis(trunk, in_channels, axis, dtype)
        if t.final.denominator != 1:
            raise StreamingError(
                f"cannot stream the trunk: its output stride along {'yx'[axis]} is {t.final} px, "
                "not a whole number (it upsamples overall); tiles need a whole-px stride"
            )
        align = math.lcm(*(j.numerator for j in t.jumps))
        axes.append(AxisBounds(t.final, math.floor(t.lo), math.ceil(t.hi), align, t.size_multiple))
    return axes[0], axes[1]
