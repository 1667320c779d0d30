from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import slidestream as ss
from slidestream.io import open_slide
from slidestream.tissue import TissueMask, create_detector, detect_tissue, qc_overlay


@pytest.mark.parametrize("method", ["otsu", "hsv"])
def test_fraction_matches_synthetic_truth(slides, method):
    s = open_slide(slides["pyramid"])
    truth = json.loads(slides["pyramid"].with_suffix(".truth.json").read_text())
    mask = detect_tissue(s, method)
    assert mask.slide_dimensions == (2048, 1536)
    assert mask.mpp == pytest.approx(8.0, rel=0.02)
    assert mask.fraction == pytest.approx(truth["tissue_fraction"], abs=0.05)


def test_all_background_slide_gives_empty_mask(tmp_path):
    rng = np.random.default_rng(0)
    blank = (243 + rng.normal(0, 2, (400, 500, 3))).clip(0, 255).astype(np.uint8)
    Image.fromarray(blank).save(tmp_path / "blank.png")
    s = open_slide(tmp_path / "blank.png", mpp=0.5)
    for method in ("otsu", "hsv"):
        mask = detect_tissue(s, method)
        assert mask.is_empty and mask.fraction == 0.0 and mask.bbox() is None


def test_slide_without_mpp_still_gets_a_mask(slides):
    mask = detect_tissue(open_slide(slides["nompp"]))
    assert mask.mpp is None and 0.2 < mask.fraction < 0.7


def test_region_fraction_is_area_weighted():
    m = np.zeros((4, 4), bool)
    m[:, :2] = True  # left half is tissue; each mask px = 10 level-0 px
    tm = TissueMask(m, (40, 40))
    assert tm.fraction == 0.5
    assert tm.region_fraction(0, 0, 20, 40) == pytest.approx(1.0)
    assert tm.region_fraction(15, 0, 10, 10) == pytest.approx(0.5)  # straddles the edge
    assert tm.region_fraction(0, 0, 25, 40) == pytest.approx(0.8)
    assert tm.region_fraction(-40, 0, 80, 40) == pytest.approx(0.25)  # outside = background
    got = tm.region_fraction(np.array([0, 20, 12.5]), 0, 10, 10)
    np.testing.assert_allclose(got, [1.0, 0.0, 0.75])


def test_coordinate_mapping_and_bbox():
    m = np.zeros((10, 20), bool)
    m[2:5, 3:8] = True
    tm = TissueMask(m, (200, 100), mpp=5.0)
    assert tm.downsample == (10.0, 10.0)
    assert tm.to_mask(35, 20) == (3.5, 2.0) and tm.to_level0(3.5, 2.0) == (35, 20)
    assert tm.bbox() == (30, 20, 50, 30)


def test_save_load_roundtrip(tmp_path, slides):
    mask = detect_tissue(open_slide(slides["pyramid"]))
    path = mask.save(tmp_path / "p.tissue.png", slide="p")
    with Image.open(path) as img:
        assert img.mode == "1"  # 1-bit PNG
    meta = json.loads((tmp_path / "p.tissue.json").read_text())
    assert {"method", "params", "mask_mpp", "slide_size", "fraction"} <= set(meta)
    back = TissueMask.load(path)
    np.testing.assert_array_equal(back.mask, mask.mask)
    assert back.slide_dimensions == mask.slide_dimensions and back.mpp == mask.mpp
    assert back.method == "otsu" and back.params == mask.params


def test_concurrent_saves_of_the_same_mask(tmp_path, slides):
    """Workers that make the same mask at once (two loaders, DDP ranks) must not trip over each
    other's temporary files; once done, only the mask and its sidecar remain."""
    from concurrent.futures import ThreadPoolExecutor

    mask = detect_tissue(open_slide(slides["small"]))
    target = tmp_path / "s.tissue.png"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: mask.save(target), range(64)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tissue.json", "s.tissue.png"]
    np.testing.assert_array_equal(TissueMask.load(target).mask, mask.mask)


def test_cache_reuses_and_keys_on_parameters(tmp_path, slides, monkeypatch):
    s = open_slide(slides["pyramid"])
    first = detect_tissue(s, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.tissue.png"))) == 1

    def boom(self, slide):
        raise AssertionError("should have used the cache")

    from slidestream.tissue.base import TissueDetector

    with monkeypatch.context() as mp:
        mp.setattr(TissueDetector, "detect", boom)
        again = detect_tissue(s, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.mask, first.mask)
    detect_tissue(s, cache_dir=tmp_path, blur_um=4.0)
    assert len(list(tmp_path.glob("*.tissue.png"))) == 2


def test_bad_detector_arguments():
    with pytest.raises(ss.ConfigError, match="method must be one of"):
        create_detector("magic")
    with pytest.raises(ss.ConfigError, match="bad parameter"):
        create_detector("otsu", nonsense=1)
    with pytest.raises(ss.ConfigError, match="mask_mpp must be positive"):
        create_detector("otsu", mask_mpp=0)


def test_qc_overlay_draws_outline(slides):
    s = open_slide(slides["pyramid"])
    thumb = s.thumbnail(400)
    out = qc_overlay(thumb, detect_tissue(s))
    assert out.shape == thumb.shape
    green = (out[..., 0] == 0) & (out[..., 1] == 200) & (out[..., 2] == 0)
    assert 0.005 < green.mean() < 0.2
