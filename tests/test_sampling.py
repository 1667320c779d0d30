from __future__ import annotations

import json

import numpy as np
import pytest

import slidestream as ss
from slidestream.io import open_slide
from slidestream.sampling import (
    AnnotationSampler,
    GridPatchSampler,
    RandomPatchSampler,
    load_annotations,
    load_cohort,
    slide_weights,
)
from slidestream.tissue import detect_tissue


@pytest.fixture(scope="module")
def pyramid(slides):
    s = open_slide(slides["pyramid"])
    return s, detect_tissue(s)


def test_cohort_csv_reports_bad_rows_and_keeps_the_rest(slides, tmp_path):
    csv = tmp_path / "cohort.csv"
    rel = slides["small"].relative_to(slides["small"].parent)
    (tmp_path / rel).write_bytes(slides["small"].read_bytes())
    csv.write_text(
        "slide,label,patient,mpp,split\n"
        f"{slides['pyramid']},tumour,p1,,train\n"
        f"{rel},normal,p2,0.5,val\n"
        "missing.svs,normal,p3,,train\n"
        f"{slides['odd']},normal,p4,abc,train\n"
        f"{slides['pyramid']},tumour,p1,,train\n"
    )
    cohort = load_cohort(csv)
    assert [s.path.name for s in cohort] == ["pyramid.tiff", "small.tiff"]
    assert cohort.slides[1].path == tmp_path / rel and cohort.slides[1].mpp == 0.5
    assert cohort.classes == ["normal", "tumour"] and cohort.label_index("tumour") == 1
    assert any("line 4" in p and "missing.svs" in p for p in cohort.problems)
    assert any("line 5" in p and "mpp" in p for p in cohort.problems)
    assert any("twice" in p for p in cohort.problems)
    assert [s.path.name for s in cohort.split("val")] == ["small.tiff"]


def test_cohort_tsv_paths_and_missing_column(slides, tmp_path):
    tsv = tmp_path / "c.tsv"
    tsv.write_text(f"slide\tlabel\n{slides['small']}\ta\n")
    assert load_cohort(tsv).slides[0].label == "a"
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nx.svs,1\n")
    with pytest.raises(ss.ConfigError, match="no 'slide' column"):
        load_cohort(bad)
    cohort = load_cohort([slides["small"].parent / "*.tiff", tmp_path / "nope.svs"])
    assert len(cohort) >= 4 and any("nope.svs" in p for p in cohort.problems)


def test_random_patches_have_enough_tissue_and_exact_pixels(pyramid):
    slide, mask = pyramid
    sampler = RandomPatchSampler(size=128, mpp=1.0, min_tissue=0.6)
    locs = [
        loc
        for _, loc in zip(
            range(200), sampler.iter_locations(slide, mask, np.random.default_rng(0)), strict=False
        )
    ]
    assert len(locs) == 200
    for loc in locs[:50]:
        assert loc.x % 2 == 0 and loc.y % 2 == 0  # aligned to level 1's grid
        assert mask.region_fraction(loc.x, loc.y, 256, 256) >= 0.6 - 1e-9
        assert loc.tissue_fraction >= 0.6 - 1e-9
    loc = locs[0]
    patch = sampler.read(slide, loc)
    np.testing.assert_array_equal(patch, slide.read_level(1, loc.x // 2, loc.y // 2, 128, 128))
    np.testing.assert_array_equal(patch, slide.read(loc.x, loc.y, 128, 128, mpp=1.0))


def test_random_sampler_is_deterministic_for_a_seed(pyramid):
    slide, mask = pyramid
    sampler = RandomPatchSampler(size=64, mpp=0.7)
    a = [
        (p.x, p.y)
        for _, p in zip(
            range(30), sampler.iter_locations(slide, mask, np.random.default_rng(3)), strict=False
        )
    ]
    b = [
        (p.x, p.y)
        for _, p in zip(
            range(30), sampler.iter_locations(slide, mask, np.random.default_rng(3)), strict=False
        )
    ]
    c = [
        (p.x, p.y)
        for _, p in zip(
            range(30), sampler.iter_locations(slide, mask, np.random.default_rng(4)), strict=False
        )
    ]
    assert a == b and a != c


def test_without_replacement_never_repeats_and_runs_dry(pyramid):
    slide, mask = pyramid
    sampler = RandomPatchSampler(size=128, mpp=1.0, min_tissue=0.5, replacement=False)
    locs = list(sampler.iter_locations(slide, mask, np.random.default_rng(0)))
    coords = [(p.x, p.y) for p in locs]
    assert 10 < len(coords) == len(set(coords))
    xs, ys = np.array(coords).T
    for i in range(len(xs)):  # non-overlapping grid cells
        overlap = (np.abs(xs - xs[i]) < 256) & (np.abs(ys - ys[i]) < 256)
        assert overlap.sum() == 1


def test_empty_mask_gives_no_patches(slides, tmp_path):
    from PIL import Image

    Image.fromarray(np.full((300, 300, 3), 245, np.uint8)).save(tmp_path / "blank.png")
    s = open_slide(tmp_path / "blank.png", mpp=0.5)
    locs = list(
        RandomPatchSampler(64, 0.5).iter_locations(s, detect_tissue(s), np.random.default_rng(0))
    )
    assert locs == []


def test_grid_sampler(pyramid):
    slide, mask = pyramid
    g = GridPatchSampler(size=128, mpp=1.0, min_tissue=0.0)
    assert g.grid_shape(slide) == (6, 8)
    locs = g.locations(slide, mask)
    assert len(locs) == 48
    assert list(locs[:3, 0]) == [0, 256, 512] and list(locs[:3, 1]) == [0, 0, 0]
    tissue_only = GridPatchSampler(size=128, mpp=1.0, min_tissue=0.5).locations(slide, mask)
    assert 0 < len(tissue_only) < 48 and (tissue_only[:, 2] >= 0.5).all()
    half = GridPatchSampler(size=128, mpp=1.0, overlap=64, min_tissue=0.0)
    assert half.grid_shape(slide) == (11, 15)
    with pytest.raises(ss.ConfigError, match="overlap"):
        GridPatchSampler(size=128, overlap=128)
    with pytest.raises(ss.ConfigError, match="min_tissue"):
        GridPatchSampler(size=128, min_tissue=2)


def _geojson(path, features):
    path.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "geometry": g,
                        "properties": {"classification": {"name": c}},
                    }
                    for c, g in features
                ],
            }
        )
    )
    return path


def test_annotation_sampler_labels_and_balance(pyramid, tmp_path):
    slide, mask = pyramid
    square = [[[300, 300], [900, 300], [900, 900], [300, 900], [300, 300]]]
    ring = [
        [[1100, 300], [1900, 300], [1900, 1300], [1100, 1300], [1100, 300]],
        [[1300, 500], [1700, 500], [1700, 1100], [1300, 1100], [1300, 500]],
    ]
    ann = load_annotations(
        _geojson(
            tmp_path / "a.geojson",
            [
                ("tumour", {"type": "Polygon", "coordinates": square}),
                ("stroma", {"type": "MultiPolygon", "coordinates": [ring]}),
            ],
        )
    )
    assert ann.classes == ["stroma", "tumour"]
    sampler = AnnotationSampler(size=32, mpp=1.0, min_tissue=0.0, min_overlap=1.0)
    locs = [
        p
        for _, p in zip(
            range(300),
            sampler.iter_locations(slide, mask, np.random.default_rng(0), ann),
            strict=False,
        )
    ]
    labels = [p.label for p in locs]
    assert 0.35 < labels.count("tumour") / len(labels) < 0.65
    for p in locs:
        cx, cy = p.x + 32, p.y + 32
        if p.label == "tumour":
            assert 300 <= cx <= 900 and 300 <= cy <= 900
        else:
            assert 1100 <= cx <= 1900 and not (1300 < cx < 1700 and 500 < cy < 1100)  # hole


def test_annotation_sampler_needs_annotations(pyramid):
    slide, mask = pyramid
    with pytest.raises(ss.ConfigError, match="annotations"):
        next(AnnotationSampler().iter_locations(slide, mask, np.random.default_rng(0)))


def test_slide_weights():
    np.testing.assert_allclose(slide_weights(["a", "a", "b"]), [1 / 3] * 3)
    np.testing.assert_allclose(slide_weights(["a", "a", "b"], "balanced"), [0.25, 0.25, 0.5])
    np.testing.assert_allclose(
        slide_weights(["a", "b", "b"], {"a": 3, "b": 1}), [0.75, 0.125, 0.125]
    )
    with pytest.raises(ss.ConfigError, match="not in the cohort"):
        slide_weights(["a"], {"z": 1})


def test_sampler_arguments_are_checked():
    with pytest.raises(ss.ConfigError, match="size must be"):
        RandomPatchSampler(size=0)
    with pytest.raises(ss.ConfigError, match="mpp must be"):
        RandomPatchSampler(mpp=-1)
