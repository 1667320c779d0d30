"""First-use check: a streamed step equals ordinary backprop on a small float64 test image.

The analysis and the probes know convolutions, pools, interpolation, pixel (un)shuffle and
padding, and refuse the ops they know to be non-local; anything else a trunk's ``forward()``
does (a hand-written wrap-around shift, a size-dependent pad, randomness) is checked, not
trusted: before a trunk with a module outside ``torch.nn`` and :data:`KNOWN_BLOCKS` is
streamed for the first time with a given geometry and tile phase,
one forward + backward of a float64 copy is streamed and compared with ordinary autograd on
a test image built to exercise the margins (per axis: at least three tile cores plus both
margins, an odd remainder, the other axis as thin as the trunk allows). A mismatch is refused.
"""

from __future__ import annotations

import copy
import logging
import math
import weakref
from collections.abc import Callable

import torch
from torch import nn

from slidestream.errors import StreamingError
from slidestream.streaming.tiling import AxisGeometry, TrunkGeometry, _device, output_size

__all__ = ["VERIFY_TOLERANCE", "verify_first_use"]

logger = logging.getLogger(__name__)

#: Largest relative float64 error of the first-use check (a wrong margin gives > 1e-3).
VERIFY_TOLERANCE = 1e-8

_CHECKED: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()

#: Blocks outside ``torch.nn`` whose ``forward()`` only calls ops the analysis knows (convs,
#: norms, pointwise ops, a residual add, permutes); trunks made of these and of ``torch.nn``
#: modules are trusted to the analysis and the probes, everything else is checked.
KNOWN_BLOCKS = frozenset(
    {
        "torchvision.models.resnet.BasicBlock",
        "torchvision.models.resnet.Bottleneck",
        "torchvision.models.convnext.CNBlock",
        "torchvision.models.convnext.LayerNorm2d",
        "torchvision.models.mobilenetv2.InvertedResidual",
        "torchvision.ops.misc.Permute",
        "torchvision.ops.stochastic_depth.StochasticDepth",
    }
)


def unknown_module(trunk: nn.Module) -> str | None:
    """``'name' (Class)`` of the first module whose ``forward()`` is neither ``torch.nn``'s
    nor a :data:`KNOWN_BLOCKS` block's, or None."""
    for name, mod in trunk.named_modules():
        cls = type(mod)
        if cls.forward.__module__.startswith("torch.nn.modules."):
            continue
        if f"{cls.__module__}.{cls.__qualname__}" not in KNOWN_BLOCKS:
            return f"{name or '<trunk>'!r} ({cls.__name__})"
    return None


def _test_tile(g: AxisGeometry, tile: int) -> int:
    """A tile no larger than needed with the same phase (``tile mod align``) as ``tile``."""
    target = min(tile, max(g.stride, (g.hi - g.lo + 1) // 2))
    t = tile % g.align or g.align
    return t + max(0, math.ceil((target - t) / g.align)) * g.align


def _sizes(
    trunk: nn.Module, in_channels: int, g: AxisGeometry, other: AxisGeometry, t: int, axis: int
) -> list[tuple[int, int]]:
    """Candidate (h, w) test images: margins + 3 cores + an odd remainder along ``axis``
    (then without the remainder), the other axis as thin as gives an output (px)."""
    base = max(0, -g.lo) + max(0, g.hi) + 3 * t
    m = math.lcm(g.align, g.size_multiple)
    lengths = [-(-(base + g.align // 2 + 1) // g.size_multiple) * g.size_multiple]
    lengths.append(-(-base // m) * m)
    step = math.lcm(other.align, other.size_multiple)
    cross = step
    while cross < other.hi - other.lo + 1 + step:
        hw = (lengths[0], cross) if axis == 0 else (cross, lengths[0])
        try:
            if min(output_size(trunk, in_channels, hw)) >= 1:
                break
        except StreamingError:
            pass
        cross += step
    return [(n, cross) if axis == 0 else (cross, n) for n in lengths]


def _rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    return err / scale if scale > 0 else err


def _step(fn: Callable, trunk: nn.Module, x: torch.Tensor, w: torch.Tensor | None):
    """Output, input gradient and parameter gradients of ``sum(fn(x) * w)``."""
    x = x.detach().requires_grad_(True)
    out = fn(x)
    w = torch.randn_like(out) if w is None else w
    params = [p for p in trunk.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * w).sum(), [x, *params], allow_unused=True)
    return out.detach(), grads, w


def _check_axis(trunk, make, in_channels: int, geom: TrunkGeometry, tile, axis: int) -> None:
    g, other = (geom.y, geom.x) if axis == 0 else (geom.x, geom.y)
    t = _test_tile(g, tile[axis])
    gen = torch.Generator().manual_seed(0)
    for hw in _sizes(trunk, in_channels, g, other, t, axis):
        x = torch.randn(1, in_channels, *hw, generator=gen, dtype=torch.float64)
        x = x.to(_device(trunk))
        try:
            ref, ref_g, w = _step(trunk, trunk, x, None)
            break
        except RuntimeError as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    else:
        raise StreamingError(
            f"the first-use check cannot run the trunk on a {hw[1]}x{hw[0]} test image "
            f"({reason}); pass check_first_use=False if it only accepts special sizes"
        )
    tiles = (t, hw[1]) if axis == 0 else (hw[0], t)
    out, got_g, _ = _step(make(trunk, tiles, geom), trunk, x, w)
    errs = [_rel(out, ref), *(_rel(a, b) for a, b in zip(got_g, ref_g, strict=True))]
    worst = max(errs)
    if not worst <= VERIFY_TOLERANCE:
        names = [n for n, p in trunk.named_parameters() if p.requires_grad]
        bad = ["output", "input gradient", *(f"gradient of {n}" for n in names)][errs.index(worst)]
        raise StreamingError(
            f"cannot stream the trunk ({type(trunk).__name__}): on a {hw[1]}x{hw[0]} float64 test "
            f"image the streamed {bad} is off ordinary backprop by {worst:.1e} (relative), so an "
            "op in its forward() reads beyond the measured margins (e.g. wrap-around or "
            "size-dependent padding, randomness); stream only the layers before it "
            "(check_first_use=False skips this check)"
        )


def verify_first_use(
    trunk: nn.Module,
    in_channels: int,
    geom: TrunkGeometry,
    tile: tuple[int, int],
    make: Callable[[nn.Module, tuple[int, int], TrunkGeometry], nn.Module],
) -> None:
    """Run the first-use check once per trunk, channel count, geometry and tile phase.

    Trunks made only of ``torch.nn`` modules and :data:`KNOWN_BLOCKS` are trusted to the
    analysis and probes (no check); a trunk with any other module is checked.

    ``make(trunk64, (h, w), geom)`` builds the streaming wrapper to test around a float64 copy.
    Raises :class:`StreamingError` when the streamed output, input gradient or any parameter
    gradient differs from ordinary backprop by more than ``VERIFY_TOLERANCE`` (relative).
    """
    key = (in_channels, geom, _test_tile(geom.y, tile[0]), _test_tile(geom.x, tile[1]))
    done = _CHECKED.setdefault(trunk, set())
    if key in done:
        return
    unknown = unknown_module(trunk)
    if unknown is None:  # every module is torch.nn's or a known block: the analysis decides
        done.add(key)
        return
    logger.info("first-use check of %s (unknown module %s)", type(trunk).__name__, unknown)
    trunk64 = copy.deepcopy(trunk).to(torch.float64)
    with torch.enable_grad():
        for axis in (0, 1):
            _check_axis(trunk64, make, in_channels, geom, tile, axis)
    done.add(key)
    logger.info("first-use check of %s passed for %s", type(trunk).__name__, geom)
