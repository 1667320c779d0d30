"""Annotation geometry: order independence, holes and islands, repairs, other geometry types,
overlapping classes."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pytest

import slidestream as ss
from slidestream.io import open_slide
from slidestream.sampling import AnnotationSampler, load_annotations
from slidestream.tissue import TissueMask

LIKE = TissueMask(np.zeros((200, 200), bool), (2000, 2000))  # 10 level-0 px per mask px


def _box(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


ISLAND = [_box(800, 800, 1200, 1200)]
HOLED = [_box(200, 200, 1800, 1800), _box(600, 600, 1400, 1400)[::-1]]


def _write(path, features):
    feats = [
        {"type": "Feature", "geometry": g, "properties": {"classification": {"name": c}}}
        for c, g in features
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def _masks(path):
    ann = load_annotations(path)
    return ann, {c: ann.rasterize(c, LIKE).mask for c in ann.classes}


def _at(mask, x, y):
    return bool(mask[int(y // 10), int(x // 10)])


def _check_island_kept(mask):
    assert _at(mask, 1000, 1000)  # the island
    assert not _at(mask, 700, 700)  # the hole around it
    assert _at(mask, 300, 300) and not _at(mask, 1900, 1900)


@pytest.mark.parametrize("order", [0, 1])
def test_multipolygon_island_in_hole_either_order(tmp_path, order):
    """The issue's case: parts [island] then [outer with hole] erased the island."""
    parts = [ISLAND, HOLED] if order == 0 else [HOLED, ISLAND]
    _, masks = _masks(
        _write(tmp_path / "a.geojson", [("t", {"type": "MultiPolygon", "coordinates": parts})])
    )
    _check_island_kept(masks["t"])
    assert masks["t"].sum() == (160 * 160 - 80 * 80 + 40 * 40)


FEATURES = [
    ("tumour", {"type": "Polygon", "coordinates": ISLAND}),
    ("tumour", {"type": "Polygon", "coordinates": HOLED}),
    ("stroma", {"type": "Polygon", "coordinates": [_box(0, 0, 190, 1000)]}),
    ("stroma", {"type": "MultiPolygon", "coordinates": [[_box(1500, 1500, 1990, 1990)]]}),
    ("necrosis", {"type": "Polygon", "coordinates": [_box(1300, 100, 1700, 500)]}),
]


def test_feature_order_does_not_matter(tmp_path, slides):
    ref_ann, ref = _masks(_write(tmp_path / "ref.geojson", FEATURES))
    _check_island_kept(ref["tumour"])
    slide = open_slide(slides["pyramid"])
    full = TissueMask(np.ones((192, 256), bool), slide.dimensions, 8.0)
    sampler = AnnotationSampler(size=32, mpp=1.0, min_tissue=0.0)

    def draws(ann):
        it = sampler.iter_locations(slide, full, np.random.default_rng(3), ann)
        return [(p.x, p.y, p.label) for p in itertools.islice(it, 50)]

    ref_draws = draws(ref_ann)
    for k, perm in enumerate(itertools.islice(itertools.permutations(FEATURES), 0, None, 17)):
        ann, masks = _masks(_write(tmp_path / f"p{k}.geojson", list(perm)))
        assert masks.keys() == ref.keys()
        for c in ref:
            np.testing.assert_array_equal(masks[c], ref[c], err_msg=f"{c} in order {k}")
        assert draws(ann) == ref_draws


def test_bow_tie_is_repaired(tmp_path, caplog):
    bow = [[[0, 0], [1000, 1000], [1000, 0], [0, 1000], [0, 0]]]
    ann, masks = _masks(
        _write(tmp_path / "b.geojson", [("t", {"type": "Polygon", "coordinates": bow})])
    )
    m = masks["t"]
    assert _at(m, 100, 500) and _at(m, 900, 500)  # both lobes
    assert not _at(m, 500, 100) and not _at(m, 500, 900)
    assert ann.regions["t"].is_valid and ann.ignored == []


def test_other_geometry_types_are_used_or_reported(tmp_path, caplog):
    feats = [
        ("a", {"type": "Point", "coordinates": [10, 10]}),
        ("b", {"type": "LineString", "coordinates": [[0, 0], [50, 50]]}),
        ("c", {"type": "MultiPoint", "coordinates": [[1, 1], [2, 2]]}),
        (
            "d",
            {
                "type": "GeometryCollection",
                "geometries": [
                    {"type": "Polygon", "coordinates": [_box(100, 100, 500, 500)]},
                    {"type": "Point", "coordinates": [900, 900]},
                    {
                        "type": "GeometryCollection",
                        "geometries": [{"type": "Polygon", "coordinates": [_box(0, 0, 50, 50)]}],
                    },
                ],
            },
        ),
        ("e", {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [20, 20], [0, 0]]]}),
        ("f", None),
    ]
    path = _write(tmp_path / "o.geojson", feats)
    with caplog.at_level(logging.WARNING, "slidestream.sampling"):
        ann, masks = _masks(path)
    assert ann.classes == ["d"]
    assert _at(masks["d"], 300, 300) and _at(masks["d"], 20, 20)
    assert len(ann.ignored) == 6
    for i, kind in enumerate(["Point", "LineString", "Point", "Point", "", "no geometry"]):
        assert f"feature {i} " in ann.ignored[i] and kind in ann.ignored[i]
        assert f"feature {i} " in caplog.text
    assert str(path) in caplog.text


def test_overlapping_classes_smaller_wins(tmp_path):
    big = ("stroma", {"type": "Polygon", "coordinates": [_box(0, 0, 1000, 1000)]})
    small = ("tumour", {"type": "Polygon", "coordinates": [_box(400, 400, 600, 600)]})
    for k, feats in enumerate([[big, small], [small, big]]):
        ann, masks = _masks(_write(tmp_path / f"o{k}.geojson", feats))
        assert masks["tumour"].sum() == 400 and masks["stroma"].sum() == 10000 - 400
        assert not (masks["tumour"] & masks["stroma"]).any()
        assert ann.label_at(500, 500) == "tumour" and ann.label_at(100, 100) == "stroma"
        assert ann.label_at(1500, 100) is None


def test_malformed_coordinates_name_the_feature(tmp_path):
    bad = ("t", {"type": "Polygon", "coordinates": [[[0, 0], [1]]]})
    with pytest.raises(ss.ConfigError, match="feature 0"):
        load_annotations(_write(tmp_path / "m.geojson", [bad]))


def test_class_name_conventions(tmp_path):
    poly = {"type": "Polygon"}
    props = [{"classification": {"name": "A"}, "name": "x"}, {"class": "B"}, {"name": "C"}, {}]
    feats = [
        {
            "type": "Feature",
            "geometry": {**poly, "coordinates": [_box(200 * i, 0, 200 * i + 100, 100)]},
            "properties": p,
        }
        for i, p in enumerate(props)
    ]
    path = tmp_path / "n.geojson"
    path.write_text(json.dumps(feats))
    assert load_annotations(path).classes == ["A", "B", "C", "unclassified"]
