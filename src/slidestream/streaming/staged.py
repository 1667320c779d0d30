"""``StagedStreamingModule``: deep trunks streamed in stages over stitched feature maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slidestream.errors import StreamingError
from slidestream.streaming.engine import StreamingModule
from slidestream.streaming.tiling import TilePlan, output_shape

__all__ = ["StagedStreamingModule"]


class StagedStreamingModule(nn.Module):
    """Stream a Sequential trunk in stages, each over the stitched output of the previous.

    A deep trunk needs wide margins (ResNet-34: ~450 px per side), so one tile grid recomputes
    much of the image. Cutting it after, e.g., ``layer2`` keeps that stage's stitched feature
    map (and, in backward, its gradient) and streams the rest over it with margins in feature
    px. Outputs and gradients stay exact. ``tile_size`` (input px) must be a multiple of the
    cumulative stride at every cut; background skipping and normalisation act on stage 1.
    """

    def __init__(
        self, trunk: nn.Sequential, tile_size: int, split_after: Sequence[str], **kwargs
    ) -> None:
        super().__init__()
        names = [n for n, _ in trunk.named_children()]
        bad = [s for s in split_after if s not in names[:-1]]
        if bad or not split_after:
            raise StreamingError(
                f"split_after must name children of the trunk {names[:-1]}, got {bad}"
            )
        cuts = [0, *sorted(names.index(s) + 1 for s in split_after), len(names)]
        later = {
            k: v
            for k, v in kwargs.items()
            if k in ("channels_last", "release_memory", "check_first_use")
        }
        self.tile_size = tile_size
        self.stages = nn.ModuleList(
            StreamingModule(trunk[a:b], tile_size, **(kwargs if i == 0 else later))
            for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False))
        )
        self.last_stats: list[dict] = []

    def plan(self, in_channels: int, hw: tuple[int, int]) -> list[TilePlan]:
        """Measure every stage once and set its tile size; returns the stages' tile plans."""
        th, tw = (self.tile_size,) * 2 if isinstance(self.tile_size, int) else self.tile_size
        scale, c, plans = (1, 1), in_channels, []
        for i, stage in enumerate(self.stages):
            geom = stage.geometry(c)
            end = (scale[0] * geom.y.stride, scale[1] * geom.x.stride)
            if th % end[0] or tw % end[1]:
                raise StreamingError(
                    f"tile_size must be a multiple of {max(end)}, got {self.tile_size} "
                    f"({max(end)} px is the trunk's stride at the end of stage {i + 1})"
                )
            stage.tile_size = (th // scale[0], tw // scale[1])
            plans.append(stage.plan(c, hw))
            c, *hw = output_shape(stage.trunk, c, hw)
            scale = end
        return plans

    def forward(self, x: torch.Tensor, background_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return ``trunk(x)`` for ``x`` of shape (N, C, H, W), stage by stage."""
        self.plan(x.shape[1], (x.shape[2], x.shape[3]))
        y = x
        for i, stage in enumerate(self.stages):
            y = stage(y, background_mask) if i == 0 else stage(y)
        self.last_stats = [stage.last_stats for stage in self.stages]
        return y
