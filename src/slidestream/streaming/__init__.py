"""Exact streaming of spatially local CNN trunks over images of any size.

``StreamingModule(trunk, tile_size)`` is a drop-in ``nn.Module`` whose output and gradients
equal ``trunk(x)``'s while only one tile's graph is held in memory at a time.
"""

from __future__ import annotations

from slidestream.streaming.engine import (
    StreamingModule,
    check_streamable,
    trunk_geometry,
)
from slidestream.streaming.measure import probe_geometry
from slidestream.streaming.staged import StagedStreamingModule
from slidestream.streaming.tiling import (
    AxisGeometry,
    TilePlan,
    TrunkGeometry,
    plan_tiles,
)

__all__ = [
    "StagedStreamingModule",
    "StreamingModule",
    "check_streamable",
    "trunk_geometry",
    "AxisGeometry",
    "TrunkGeometry",
    "TilePlan",
    "plan_tiles",
    "probe_geometry",
]
