"""``--tile-size auto``: the largest streaming tile whose training step fits a memory budget.

Larger tiles recompute less of each crop's receptive-field margin (ResNet-34: ~450 px a side),
so they are faster, until the step no longer fits. The probe runs real forward and backward
passes of the model on a synthetic image of the training size, from the largest candidate
down, and keeps the first whose peak device memory stays within the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from slidestream.models.slide import SlideClassifier

__all__ = ["CPU_TILE", "auto_tile_size", "tile_candidates"]

log = logging.getLogger(__name__)

CPU_TILE = 1024  # on the CPU, "auto" is this fixed tile: host memory cannot be probed safely


def tile_candidates(image_hw: Sequence[int], stride: int = 32, smallest: int = 256) -> list[int]:
    """Tile sizes to try, largest first: the image's longer side (one tile), then halving
    steps, each a multiple of ``stride``, down to ``smallest``."""
    top = -(-max(image_hw) // stride) * stride
    out, t = [], top
    while t >= smallest:
        for c in (t, t * 3 // 4):
            c = c // stride * stride
            if c >= smallest and c not in out:
                out.append(c)
        t //= 2
    return sorted(out, reverse=True)


def _probe_step(
    model: SlideClassifier, image_hw: Sequence[int], device: torch.device, dtype: torch.dtype | None
) -> int:
    """Peak bytes of one training step at the model's current tile size."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    x = torch.randint(0, 255, (1, 3, *image_hw), dtype=torch.uint8, device=device)
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(x)
    out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def auto_tile_size(
    model: SlideClassifier,
    image_hw: Sequence[int],
    device: torch.device,
    *,
    budget_gb: float | None = None,
    dtype: torch.dtype | None = None,
    measure: Callable[[SlideClassifier], int] | None = None,
    candidates: Sequence[int] | None = None,
) -> int:
    """The largest tile (input px) whose step on an image of ``image_hw`` (h, w) peaks within
    ``budget_gb`` GB (default: 85% of the device's free memory), measured on ``device``;
    leaves the model configured with it. On the CPU: :data:`CPU_TILE`, no probe.

    ``measure(model) -> peak bytes`` replaces the CUDA probe (tests). Raises
    :class:`~slidestream.errors.ConfigError` when not even the smallest candidate fits.
    """
    from slidestream.errors import ConfigError

    if device.type != "cuda" and measure is None:
        model.configure(CPU_TILE, model.stages, model.channels_last)
        return CPU_TILE
    if budget_gb is None:
        free, _ = torch.cuda.mem_get_info(device)
        budget_gb = 0.85 * free / 2**30
    budget = budget_gb * 2**30
    measure = measure or (lambda m: _probe_step(m, image_hw, device, dtype))
    tried = []
    for tile in candidates or tile_candidates(image_hw):
        model.configure(tile, model.stages, model.channels_last)
        try:
            peak = measure(model)
        except torch.OutOfMemoryError:
            peak = float("inf")
        tried.append(f"{tile}: {peak / 2**30:.1f} GB")
        if peak <= budget:
            log.info(
                "tile size %d px: step peaks at %.2f GB of a %.1f GB budget",
                tile,
                peak / 2**30,
                budget_gb,
            )
            return tile
    raise ConfigError(
        f"no tile fits the memory budget of {budget_gb:.1f} GB ({'; '.join(tried)}): lower "
        "--image-size, add --stages layer2, or raise --memory-budget"
    )
