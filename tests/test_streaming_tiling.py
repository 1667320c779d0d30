"""Pure tile geometry and the NaN probe that measures a trunk's dependency bounds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slidestream.errors import StreamingError
from slidestream.streaming.measure import probe_geometry
from slidestream.streaming.tiling import (
    AxisGeometry,
    TrunkGeometry,
    axis_bounds_from_probe,
    normalize_tile_size,
    output_size,
    plan_axis,
    plan_tiles,
)

torch.set_num_threads(1)


def _conv(k, s=1, p=0, d=1, c=2):
    return nn.Conv2d(c, c, k, stride=s, padding=p, dilation=d)


def _first_conv():
    return nn.Conv2d(3, 2, 1)


# Trunks with analytically known (stride, lo, hi) per axis: lo/hi in input px.
KNOWN = [
    (nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), _conv(3, p=1)), (1, -2, 2), (1, -2, 2)),
    (nn.Sequential(nn.Conv2d(3, 2, 3, stride=2, padding=1), _conv(3, p=1)), (2, -3, 3), (2, -3, 3)),
    (nn.Sequential(nn.Conv2d(3, 2, 3, padding=4, dilation=4)), (1, -4, 4), (1, -4, 4)),
    (nn.Sequential(nn.Conv2d(3, 2, (1, 7), padding=(0, 3))), (1, 0, 0), (1, -3, 3)),
    (nn.Sequential(nn.Conv2d(3, 2, 3), nn.MaxPool2d(2)), (2, 0, 3), (2, 0, 3)),
    (nn.Sequential(_first_conv(), _conv(1, s=2), _conv(3, s=2, p=1)), (4, -2, 2), (4, -2, 2)),
]


@pytest.mark.parametrize(("trunk", "gy", "gx"), KNOWN)
def test_probe_bounds_cover_truth_and_are_tight(trunk, gy, gx):
    geom = probe_geometry(trunk.eval(), 3)
    for measured, (s, lo, hi) in ((geom.y, gy), (geom.x, gx)):
        truth = AxisGeometry(s, lo, hi)
        assert measured.covers(truth), (measured, truth)
        assert measured.lo > lo - s and measured.hi < hi + s  # conservative by < stride


def test_probe_resnet_like_stride_and_receptive_field():
    # conv7/2 + maxpool3/2: receptive field 7 + 2*2 = 11 px, stride 4.
    trunk = nn.Sequential(nn.Conv2d(3, 4, 7, 2, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1)).eval()
    geom = probe_geometry(trunk, 3)
    assert geom.y.stride == geom.x.stride == 4
    assert 11 <= geom.y.receptive_field < 11 + 2 * 4


def test_axis_bounds_from_probe_arithmetic():
    # S = 4, band rows 100..103 reach outputs 20..30.
    assert axis_bounds_from_probe(4, 100, 20, 30) == (100 - 120, 103 - 80)


@pytest.mark.parametrize("size", [1, 31, 32, 33, 100, 257])
@pytest.mark.parametrize(("lo", "hi"), [(-20, 19), (0, 3), (-3, 40)])
def test_plan_axis_partitions_output_and_covers_dependencies(size, lo, hi):
    geom = AxisGeometry(8, lo, hi)
    out = max(1, size // 8)
    tiles = plan_axis(geom, size, out, 16)
    assert tiles[0].out_start == 0 and tiles[-1].out_stop == out
    for a, b in zip(tiles, tiles[1:], strict=False):
        assert a.out_stop == b.out_start
    for t in tiles:
        assert t.in_start == 0 or t.in_start % 8 == 0
        assert t.in_start <= max(0, t.out_start * 8 + lo)
        assert t.in_stop >= min(size, (t.out_stop - 1) * 8 + hi + 1)
        assert 0 <= t.in_start < t.in_stop <= size
        assert t.crop_offset == t.out_start - t.in_start // 8


def test_plan_tiles_is_cached_and_counts_pixels():
    g = TrunkGeometry(AxisGeometry(4, -6, 5), AxisGeometry(4, -6, 5))
    p1 = plan_tiles(g, (100, 60), (25, 15), (40, 40))
    assert p1 is plan_tiles(g, (100, 60), (25, 15), (40, 40))
    assert len(p1) == len(p1.rows) * len(p1.cols) == 3 * 2
    assert p1.recompute_factor > 1.0
    whole = plan_tiles(g, (100, 60), (25, 15), (200, 200))
    assert len(whole) == 1 and whole.recompute_factor == 1.0


def test_tile_size_must_be_multiple_of_stride():
    with pytest.raises(StreamingError, match="tile_size must be a multiple of 32, got 500"):
        normalize_tile_size(500, (32, 32))
    assert normalize_tile_size((64, 96), (32, 32)) == (64, 96)
    with pytest.raises(StreamingError, match="positive"):
        normalize_tile_size(0, (1, 1))


def test_axis_geometry_validates():
    with pytest.raises(StreamingError, match="stride must be >= 1"):
        AxisGeometry(0, 0, 0)
    with pytest.raises(StreamingError, match="hi must be >= lo"):
        AxisGeometry(1, 2, 1)


def test_output_size_uses_meta_device_only():
    trunk = nn.Sequential(nn.Conv2d(3, 2, 3, stride=2, padding=1))
    assert output_size(trunk, 3, (10_001, 20_000)) == (5001, 10_000)


class _GlobalMean(nn.Module):
    def forward(self, x):
        return x - x.mean(dim=(2, 3), keepdim=True)


class _Pool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.conv(x))


def test_probe_refuses_functional_global_op_and_names_module():
    trunk = nn.Sequential(nn.Conv2d(3, 2, 3), _GlobalMean())
    with pytest.raises(StreamingError, match=r"not spatially local: '1' \(_GlobalMean\)"):
        probe_geometry(trunk, 3)


def test_probe_refuses_global_pooling():
    with pytest.raises(StreamingError, match=r"'pool' \(AdaptiveAvgPool2d\)"):
        probe_geometry(_Pool(), 3)
