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


def _area(gj):
    return sum(shape(f["geometry"]).area for f in gj["features"])


@pytest.mark.parametrize("seed", range(4))
def test_exported_area_is_the_cells_area(seed):
    rng = np.random.default_rng(seed)
    grid = rng.random((20, 17))
    grid[rng.random(grid.shape) < 0.2] = np.nan
    gj = contours_geojson(grid, (5.0, 7.0, 12.0, 9.0), "tumour", 0.4)
    n = int((np.nan_to_num(grid, nan=-1) >= 0.4).sum())
    assert _area(gj) == pytest.approx(n * 12 * 9)
    assert sum(f["properties"]["area_px"] for f in gj["features"]) == pytest.approx(n * 108)


def test_one_cell_is_a_square_not_a_diamond():
    grid = np.full((3, 3), np.nan)
    grid[1, 1] = 0.8
    (feat,) = contours_geojson(grid, ORIGIN, "attention", 0.5)["features"]
    (ring,) = feat["geometry"]["coordinates"]
    assert len(ring) == 5 and ring[0] == ring[-1]
    assert sorted(map(tuple, ring[:4])) == [(110, 210), (110, 220), (120, 210), (120, 220)]
    assert shape(feat["geometry"]).area == 100


def test_cells_touching_at_a_corner_are_two_regions():
    grid = np.zeros((2, 2))
    grid[0, 0] = grid[1, 1] = 0.9
    feats = contours_geojson(grid, ORIGIN, "tumour")["features"]
    assert len(feats) == 2 and [f["properties"]["tiles"] for f in feats] == [1, 1]
    assert all(shape(f["geometry"]).is_valid and shape(f["geometry"]).area == 100 for f in feats)


def test_ring_keeps_its_hole_and_measurements():
    grid = np.full((5, 5), 0.2)
    grid[1:4, 1:4] = 0.6
    grid[1, 1] = 1.0
    grid[2, 2] = 0.1  # the hole
    (feat,) = contours_geojson(grid, ORIGIN, "tumour", 0.5, mpp=(0.5, 0.25))["features"]
    poly = shape(feat["geometry"])
    assert len(poly.interiors) == 1 and poly.area == 8 * 100
    props = feat["properties"]
    assert props["tiles"] == 8 and props["max_probability"] == 1.0
    assert props["probability"] == pytest.approx((7 * 0.6 + 1.0) / 8)
    assert props["area_um2"] == pytest.approx(800 * 0.5 * 0.25)
    assert props["measurements"]["area_um2"] == props["area_um2"]
    assert props["classification"] == {"name": "tumour", "color": [220, 50, 32]}
    assert "area_um2" not in contours_geojson(grid, ORIGIN, "tumour")["features"][0]["properties"]
