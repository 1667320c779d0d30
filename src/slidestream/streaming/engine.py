"""The streaming engine: run a spatially local trunk tile by tile, transparently to autograd.

Forward computes every output tile from its input crop without a graph and stitches the
feature map. Backward (a custom autograd Function that takes the trunk's trainable parameters
as inputs) recomputes each crop with grad enabled and backpropagates only that tile's slice of
the output gradient; the per-tile parameter (and input) gradients are summed. Because each
tile's core depends only on its crop, the result equals ``trunk(x)`` and its gradients.

Crops that are entirely background share one computation per crop shape (identical inputs give
identical outputs); their output gradients are summed and backpropagated once for the
parameters. :class:`StagedStreamingModule` streams a deep trunk in stages over stitched
intermediate maps, which cuts the recomputation that wide receptive fields cause.
benchmarks/streaming.py measures both against conventional backprop.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from slidestream.errors import StreamingError
from slidestream.streaming.measure import check_streamable, probe_geometry
from slidestream.streaming.memory import fix_mmap_threshold, trim_heap
from slidestream.streaming.tiling import (
    Tile,
    TilePlan,
    TrunkGeometry,
    normalize_tile_size,
    output_size,
    plan_tiles,
)
from slidestream.streaming.verify import verify_first_use

__all__ = ["StreamingModule", "check_streamable", "trunk_geometry"]

logger = logging.getLogger(__name__)

_GEOMETRY: weakref.WeakKeyDictionary[nn.Module, dict[int, TrunkGeometry]] = (
    weakref.WeakKeyDictionary()
)


def _release_cpu_memory(run: _Run) -> None:
    """After a CPU tile: hand freed heap pages back so RSS follows one tile, not their history."""
    if run.module.release_memory and run.autocast[0] == "cpu":
        trim_heap()


def trunk_geometry(trunk: nn.Module, in_channels: int) -> TrunkGeometry:
    """Measured geometry of ``trunk`` (probed once per trunk and channel count, then cached)."""
    per_trunk = _GEOMETRY.setdefault(trunk, {})
    if in_channels not in per_trunk:
        dev = next((p.device.type for p in trunk.parameters()), "cpu")
        with torch.autocast("cpu", enabled=False), torch.autocast(dev, enabled=False):
            per_trunk[in_channels] = probe_geometry(trunk, in_channels)
        logger.info("streaming geometry of %s: %s", type(trunk).__name__, per_trunk[in_channels])
    return per_trunk[in_channels]


@dataclass
class _Group:
    """Tiles computed from one crop: a single tile, or all background tiles of one crop shape."""

    tiles: list[Tile]
    background: bool = False


@dataclass
class _Run:
    """Everything backward needs to replay one forward call."""

    module: StreamingModule
    plan: TilePlan
    groups: list[_Group]
    autocast: tuple[str, bool, torch.dtype]
    mask: torch.Tensor | None
    stats: dict = field(default_factory=dict)


class StreamingModule(nn.Module):
    """Run ``trunk`` tile by tile; ``forward(x)`` equals ``trunk(x)``, gradients included.

    Args:
        trunk: a spatially local network (convs, pools, pointwise ops, BatchNorm in eval mode).
        tile_size: output-aligned tile in input px, ``int`` or ``(h, w)``, a multiple of the
            trunk's output stride. Each crop adds the receptive-field margins to it.
        background: raw input value (scalar or per channel, before ``input_scale``/``mean``/
            ``std``) of uniform background; crops that are entirely background are computed
            once per crop shape. ``None`` disables background skipping.
        mean, std, input_scale: per-tile normalisation on the trunk's device,
            ``(x * input_scale - mean) / std``, so a uint8 image can stay on the CPU.
        channels_last: feed crops in channels-last memory format.
        geometry: dependency bounds to use instead of measuring them.
        verify_geometry: when ``geometry`` is given, measure anyway and refuse bounds that are
            too small (set False only to demonstrate what too small a margin does).
        check_first_use: for a trunk with a module outside ``torch.nn`` and the known
            torchvision blocks (``verify.KNOWN_BLOCKS``), before its first use with a given
            geometry and tile phase, stream one float64 step of a copy on a small test image
            and refuse the trunk when it differs from ordinary backprop (see :mod:`.verify`;
            cached per trunk). ``False`` skips it.
        release_memory: on CPU, return freed heap pages to the OS after each tile (glibc
            ``malloc_trim``) and fix glibc's mmap threshold at 4 MiB for the process (once;
            skipped when ``MALLOC_MMAP_THRESHOLD_`` is set in the environment); without it
            glibc keeps fragments of earlier crops and the process's peak RSS grows well
            beyond one tile's working set. ``False`` leaves the allocator alone.
    """

    def __init__(
        self,
        trunk: nn.Module,
        tile_size: int | tuple[int, int],
        *,
        background: float | Sequence[float] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        input_scale: float = 1.0,
        channels_last: bool = False,
        geometry: TrunkGeometry | None = None,
        verify_geometry: bool = True,
        release_memory: bool = True,
        check_first_use: bool = True,
    ) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise StreamingError("pass both mean and std, or neither")
        if std is not None and any(s <= 0 for s in std):
            raise StreamingError(f"std must be positive, got {tuple(std)}")
        self.trunk = trunk
        self.tile_size = tile_size
        self.background = background
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)
        self.input_scale = float(input_scale)
        self.channels_last = channels_last
        self._geometry = geometry
        self._verify = verify_geometry
        self.release_memory = release_memory
        self.check_first_use = check_first_use
        self._out_sizes: dict[tuple[int, int, int], tuple[int, int]] = {}
        self.last_stats: dict = {}

    # --- geometry ----------------------------------------------------------------------------
    def geometry(self, in_channels: int) -> TrunkGeometry:
        """Dependency geometry used for tiling (measured once per trunk, cached)."""
        check_streamable(self.trunk)
        if self._geometry is None:
            return trunk_geometry(self.trunk, in_channels)
        if self._verify:
            measured = trunk_geometry(self.trunk, in_channels)
            if not self._geometry.covers(measured):
                raise StreamingError(
                    f"the given margins {self._geometry} are smaller than the trunk needs "
                    f"({measured}); tiles would get wrong values at their edges"
                )
        return self._geometry

    def plan(self, in_channels: int, hw: tuple[int, int]) -> TilePlan:
        """The tile plan for an image of ``hw`` (h, w) input px."""
        geom = self.geometry(in_channels)
        tile = normalize_tile_size(self.tile_size, (geom.y.stride, geom.x.stride))
        if self.check_first_use:
            with torch.autocast(self._device().type, enabled=False):
                verify_first_use(self.trunk, in_channels, geom, tile, _checker)
        key = (in_channels, *hw)
        if key not in self._out_sizes:
            self._out_sizes[key] = output_size(self.trunk, in_channels, hw)
        return plan_tiles(geom, tuple(hw), self._out_sizes[key], tile)

    # --- input preparation -------------------------------------------------------------------
    def _device(self) -> torch.device:
        p = next(self.trunk.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _dtype(self) -> torch.dtype:
        for p in self.trunk.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    def _prepare(self, raw: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Move one raw crop to the trunk's device and normalise it there."""
        dev, dt = self._device(), self._dtype()
        c = raw.to(dev, non_blocking=True).to(dt)
        if mask is not None:
            c = torch.where(mask.to(dev, non_blocking=True), self._bg_tensor(c), c)
        if self.input_scale != 1.0:
            c = c * self.input_scale
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=dev, dtype=dt).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=dev, dtype=dt).view(1, -1, 1, 1)
            c = (c - mean) / std
        if self.channels_last:
            c = c.contiguous(memory_format=torch.channels_last)
        return c

    def _bg_tensor(self, like: torch.Tensor) -> torch.Tensor:
        bg = self.background
        vals = [float(bg)] if isinstance(bg, int | float) else [float(v) for v in bg]
        return torch.tensor(vals, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)

    def _crop(self, x: torch.Tensor, tile: Tile) -> torch.Tensor:
        ty, tx = tile.y, tile.x
        return x[..., ty.in_start : ty.in_stop, tx.in_start : tx.in_stop]

    def _is_background(self, x: torch.Tensor, mask: torch.Tensor | None, tile: Tile) -> bool:
        if mask is not None and bool(self._crop(mask, tile).all()):
            return True
        crop = self._crop(x, tile)
        return bool((crop == self._bg_tensor(crop)).all())

    def _groups(self, x: torch.Tensor, mask: torch.Tensor | None, plan: TilePlan) -> list[_Group]:
        """Singleton groups for tissue tiles; one group per crop shape for background tiles."""
        groups: list[_Group] = []
        by_shape: dict[tuple[int, int], _Group] = {}
        for tile in plan:
            if self.background is not None and self._is_background(x, mask, tile):
                if tile.crop_shape not in by_shape:
                    by_shape[tile.crop_shape] = _Group([], background=True)
                    groups.append(by_shape[tile.crop_shape])
                by_shape[tile.crop_shape].tiles.append(tile)
            else:
                groups.append(_Group([tile]))
        return groups

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, background_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return ``trunk(x)`` for ``x`` of shape (N, C, H, W), computed tile by tile.

        ``background_mask``: optional bool (H, W) or (N, 1, H, W) tensor; masked pixels are
        treated as the ``background`` value (the result is ``trunk`` of the painted image).
        """
        if x.dim() != 4:
            raise StreamingError(f"expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
        mask = self._check_mask(x, background_mask)
        plan = self.plan(x.shape[1], (x.shape[2], x.shape[3]))
        groups = self._groups(x, mask, plan)
        dev = self._device().type
        autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        run = _Run(self, plan, groups, autocast, mask)
        if self.release_memory and dev == "cpu":
            fix_mmap_threshold()
        self.last_stats = {
            "tiles": len(plan),
            "crops_computed": len(groups),
            "background_tiles": sum(len(g.tiles) for g in groups if g.background),
            "recompute_factor": plan.recompute_factor,
        }
        params = [p for p in self.trunk.parameters() if p.requires_grad]
        if torch.is_grad_enabled() and (x.requires_grad or params):
            return _StreamFunction.apply(run, x, *params)
        with torch.no_grad():
            return _forward_tiles(run, x)

    def _check_mask(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None:
            return None
        if self.background is None:
            raise StreamingError("background_mask needs a background value; pass background=")
        if mask.dtype != torch.bool or mask.shape[-2:] != x.shape[-2:]:
            raise StreamingError(
                f"background_mask must be a bool tensor of shape (H, W) = {tuple(x.shape[-2:])}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        return mask.view(1, 1, *mask.shape[-2:]) if mask.dim() == 2 else mask

    def extra_repr(self) -> str:
        return f"tile_size={self.tile_size}, background={self.background}"


def _checker(trunk: nn.Module, tile: tuple[int, int], geom: TrunkGeometry) -> StreamingModule:
    """The tiling under test in the first-use check, around a float64 copy of the trunk."""
    kw = {"verify_geometry": False, "release_memory": False, "check_first_use": False}
    return StreamingModule(trunk, tile, geometry=geom, **kw)


def _place(dst: torch.Tensor, src: torch.Tensor, tile: Tile) -> None:
    """Copy a tile's core from its crop output ``src`` into the full map ``dst``."""
    ty, tx = tile.y, tile.x
    dst[..., ty.out_start : ty.out_stop, tx.out_start : tx.out_stop] = src[
        ...,
        ty.crop_offset : ty.crop_offset + ty.out_size,
        tx.crop_offset : tx.crop_offset + tx.out_size,
    ]


def _run_crop(mod: StreamingModule, crop: torch.Tensor, tile: Tile) -> torch.Tensor:
    """``trunk(crop)``; a trunk that rejects the crop's size raises a one-line StreamingError."""
    try:
        return mod.trunk(crop)
    except RuntimeError as exc:
        (h, w), ty, tx = tile.crop_shape, tile.y, tile.x
        raise StreamingError(
            f"cannot stream the trunk: it fails on the {w}x{h} px crop at x={tx.in_start}, "
            f"y={ty.in_start} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "it needs input sizes that crops do not keep (e.g. multiples of a factor)"
        ) from exc


def _forward_tiles(run: _Run, x: torch.Tensor) -> torch.Tensor:
    mod, out = run.module, None
    for group in run.groups:
        rep = group.tiles[0]
        mask = None if run.mask is None else mod._crop(run.mask, rep)
        y = _run_crop(mod, mod._prepare(mod._crop(x, rep), mask), rep)
        if out is None:
            fmt = torch.channels_last if mod.channels_last else torch.contiguous_format
            shape = (y.shape[0], y.shape[1], *run.plan.out_size)
            out = torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=fmt)
        for tile in group.tiles:
            _place(out, y, tile)
        del y
        _release_cpu_memory(run)
    return out


def _backward_group(
    run: _Run, x: torch.Tensor, grad: torch.Tensor, tiles: list[Tile], inputs: list[torch.Tensor]
) -> tuple[torch.Tensor | None, ...]:
    """Recompute one crop with grad and backpropagate the summed gradient of ``tiles``."""
    mod, rep = run.module, tiles[0]
    leaf = mod._crop(x, rep).detach()
    if inputs and inputs[-1] is x:
        leaf.requires_grad_(True)
    mask = None if run.mask is None else mod._crop(run.mask, rep)
    dev, enabled, dtype = run.autocast
    with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
        y = _run_crop(mod, mod._prepare(leaf, mask), rep)
    g = torch.zeros_like(y)
    for tile in tiles:
        ty, tx = tile.y, tile.x
        g[
            ...,
            ty.crop_offset : ty.crop_offset + ty.out_size,
            tx.crop_offset : tx.crop_offset + tx.out_size,
        ] += grad[..., ty.out_start : ty.out_stop, tx.out_start : tx.out_stop].to(g.dtype)
    targets = [t if t is not x else leaf for t in inputs]
    return torch.autograd.grad(y, targets, g, allow_unused=True)


class _StreamFunction(torch.autograd.Function):
    """Tiled forward without a graph; tile-wise recomputation in backward."""

    @staticmethod
    def forward(ctx, run: _Run, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.run = run
        ctx.save_for_backward(x)
        with torch.no_grad():
            return _forward_tiles(run, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        run: _Run = ctx.run
        if torch.is_grad_enabled():
            raise StreamingError(
                "double backward (create_graph=True) through a StreamingModule is not supported"
            )
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[1]
        params = [p for p in run.module.trunk.parameters() if p.requires_grad]
        inputs = params + ([x] if need_x else [])
        acc: list[torch.Tensor | None] = [None] * len(params)
        x_grad = torch.zeros_like(x) if need_x else None
        for group in run.groups:
            # The input gradient differs per tile position: background tiles share a
            # backward pass only when x needs no gradient.
            batches = [group.tiles] if not need_x else [[t] for t in group.tiles]
            for tiles in batches:
                grads = _backward_group(run, x, grad, tiles, inputs)
                for i, g in enumerate(grads[: len(params)]):
                    if g is not None:
                        acc[i] = g if acc[i] is None else acc[i].add_(g)
                if need_x and grads[-1] is not None:
                    ty, tx = tiles[0].y, tiles[0].x
                    x_grad[..., ty.in_start : ty.in_stop, tx.in_start : tx.in_stop] += grads[-1]
                del grads
                _release_cpu_memory(run)
        return (None, x_grad, *acc)
