"""Contours of predicted cells: cells without a prediction are never inside one."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

import slidestream as ss
from slidestream.infer.export import contours_geojson

ORIGIN = (100.0, 200.0, 10.0, 10.0)


def _cell_centres(mask):
    rr, cc = np.nonzero(mask)
    return shapely.points(100 + (cc + 0.5) * 10, 200 + (rr + 0.5) * 10)


def _check(grid, threshold):
    gj = contours_geojson(grid, ORIGIN, "tumour", threshold)
    want = np.isfinite(grid) & (np.nan_to_num(grid, nan=-1) >= threshold)
    assert sum(f["properties"]["tiles"] for f in gj["features"]) == want.sum()
    polys = [shape(f["geometry"]) for f in gj["features"]]
    assert all(p.is_valid for p in polys)
    union = shapely.union_all(polys) if polys else shapely.Polygon()
    assert shapely.contains(union, _cell_centres(want)).all()
    assert not shapely.intersects(union, _cell_centres(~want)).any()
    return gj


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_unpredicted_cells_never_count(threshold):
    """The issue's case: 40 predicted tiles in a grid of 128 cells."""
    grid = np.full((8, 16), np.nan)
    rng = np.random.default_rng(0)
    grid[2:6, 3:13] = rng.random((4, 10))  # 40 predicted tiles
    _check(grid, threshold)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [0.0, 0.35, 0.7])
def test_random_grids_with_gaps(seed, threshold):
    rng = np.random.default_rng(seed)
    grid = rng.random((12, 15))
    grid[rng.random(grid.shape) < 0.3] = np.nan
    _check(grid, threshold)


def test_island_in_a_hole_is_counted_once():
    grid = np.zeros((9, 9))
    grid[1:8, 1:8] = 0.9
    grid[2:7, 2:7] = 0.1  # a hole ...
    grid[4, 4] = 0.95  # ... with an island
    grid[3, 3] = np.nan
    gj = _check(grid, 0.5)
    assert sorted(f["properties"]["tiles"] for f in gj["features"]) == [1, 24]


def test_threshold_must_be_a_number():
    with pytest.raises(ss.ConfigError, match="threshold"):
        contours_geojson(np.zeros((2, 2)), ORIGIN, "t", float("nan"))
