"""Real files from ../shared/data (skipped when the folder is absent)."""

from __future__ import annotations

import numpy as np
import pytest

import slidestream as ss
from slidestream.io import open_slide
from slidestream.tissue import detect_tissue

BACKENDS = ["pyvips", "tiffslide", "openslide"]


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_svs_metadata(shared_data, backend):
    s = open_slide(shared_data / "cmu_small_region.svs", backend=backend)
    assert s.dimensions == (2220, 2967)
    assert s.level_count == 1
    assert s.mpp == pytest.approx((0.499, 0.499))
    assert s.vendor == "aperio"
    assoc = s.associated_images
    assert {"label", "macro", "thumbnail"} <= set(assoc)
    assert all(a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8 for a in assoc.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_generic_tiff_metadata(shared_data, backend):
    s = open_slide(shared_data / "boxes.tiff", backend=backend)
    assert s.level_dimensions == ((300, 250), (150, 125), (75, 62), (37, 31))
    assert s.level_downsamples == (1.0, 2.0, 4.0, 8.0)
    assert s.vendor == "generic-tiff"


def test_dicom_metadata(shared_data):
    s = open_slide(shared_data / "boxes_0.dcm")
    assert (s.backend, s.vendor, s.dimensions) == ("openslide", "dicom", (16, 16))
    assert s.mpp == pytest.approx((0.499, 0.499))
    assert s.read(0, 0, 16, 16).shape == (16, 16, 3)


@pytest.mark.parametrize("name", ["cmu_small_region.svs", "boxes.tiff", "small.svs"])
def test_all_backends_same_pixels(shared_data, name):
    reads = []
    for b in BACKENDS:
        s = open_slide(shared_data / name, backend=b)
        w, h = s.dimensions
        reads.append(
            (
                s.read(0, 0, w, h),
                s.read(w // 3, h // 4, w // 2, h // 3, level=0),
                s.read_level(s.level_count - 1, 0, 0, 20, 10),
            )
        )
    for other in reads[1:]:
        for got, want in zip(other, reads[0], strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_unopenable_raises_open_error(shared_data, backend):
    with pytest.raises(ss.SlideOpenError, match=r"unopenable\.tiff.*compression"):
        open_slide(shared_data / "unopenable.tiff", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_unreadable_raises_read_error_every_time(shared_data, backend):
    s = open_slide(shared_data / "unreadable.svs", backend=backend)
    for _ in range(2):  # a retry must not return the black pixels libvips cached
        with pytest.raises(ss.SlideReadError, match=r"unreadable\.svs"):
            s.read(0, 0, 16, 16)


def test_tissue_fraction_of_real_svs_is_plausible(shared_data):
    s = open_slide(shared_data / "cmu_small_region.svs")
    for method in ("otsu", "hsv"):
        mask = detect_tissue(s, method)
        assert 0.25 < mask.fraction < 0.55, method
        x, y, w, h = mask.bbox()
        # the skin section in the middle, and a faint strand of it reaching the left edge
        assert x < 700 and w > 1000 and h > 2500
