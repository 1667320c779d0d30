from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import slidestream as ss
from slidestream.io import open_slide
from slidestream.synthetic import write_synthetic_slide


def test_deterministic_for_a_seed(tmp_path):
    a = write_synthetic_slide(tmp_path / "a.tiff", 700, 500, mpp=0.5, seed=7, tumour=True)
    b = write_synthetic_slide(tmp_path / "b.tiff", 700, 500, mpp=0.5, seed=7, tumour=True)
    c = write_synthetic_slide(tmp_path / "c.tiff", 700, 500, mpp=0.5, seed=8, tumour=True)
    ra, rb, rc = (open_slide(p).read(0, 0, 700, 500) for p in (a, b, c))
    np.testing.assert_array_equal(ra, rb)
    assert np.abs(ra.astype(int) - rc.astype(int)).mean() > 5


def test_pyramid_layout_and_truth_files(slides):
    s = open_slide(slides["pyramid"])
    assert s.level_dimensions[-1][0] <= 256
    truth = json.loads(slides["pyramid"].with_suffix(".truth.json").read_text())
    assert truth["spec"]["seed"] == 1 and 0.3 < truth["tissue_fraction"] < 0.6
    tumour = np.asarray(Image.open(slides["pyramid"].with_suffix(".tumour.png")))
    assert 0.02 < tumour.mean() < 0.2


def test_tumour_regions_look_different(slides):
    s = open_slide(slides["pyramid"])
    truth = json.loads(slides["pyramid"].with_suffix(".truth.json").read_text())
    tumour = np.asarray(Image.open(slides["pyramid"].with_suffix(".tumour.png")))
    ds = truth["mask_downsample"]
    thumb = s.read(0, 0, tumour.shape[1], tumour.shape[0], downsample=ds).astype(float)
    grey = thumb.mean(axis=2)
    mask = ss.detect_tissue(s).mask
    mask = np.asarray(Image.fromarray(mask).resize(tumour.shape[::-1], Image.Resampling.NEAREST))
    normal = mask & ~tumour
    assert grey[tumour].mean() < grey[normal].mean() - 20  # denser, darker nuclei


def test_aperio_variant(slides):
    for backend in ("pyvips", "tiffslide", "openslide"):
        s = open_slide(slides["aperio"], backend=backend)
        assert s.vendor == "aperio" and s.mpp == pytest.approx((0.499, 0.499))
        assert s.level_count >= 3 and "thumbnail" in s.associated_images


def test_bad_arguments(tmp_path):
    with pytest.raises(ss.ConfigError, match="size must be at least"):
        write_synthetic_slide(tmp_path / "x.tiff", 4, 4)
    with pytest.raises(ss.ConfigError, match="mpp must be"):
        write_synthetic_slide(tmp_path / "x.tiff", 100, 100, mpp=0)
