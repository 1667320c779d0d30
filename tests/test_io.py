from __future__ import annotations

import multiprocessing as mp
import pickle

import numpy as np
import pytest
from PIL import Image

import slidestream as ss
from slidestream.io import base as io_base
from slidestream.io import open_slide

TIFF_BACKENDS = ["pyvips", "tiffslide", "openslide"]


def _read_in_child(slide: ss.Slide) -> np.ndarray:
    return slide.read(300, 200, 64, 48)


@pytest.mark.parametrize("backend", TIFF_BACKENDS + ["auto"])
def test_metadata_of_generated_pyramid(slides, backend):
    s = open_slide(slides["pyramid"], backend=backend)
    assert s.dimensions == (2048, 1536)
    assert s.level_count >= 4
    assert s.level_dimensions[1] == (1024, 768)
    assert s.level_downsamples[:4] == (1.0, 2.0, 4.0, 8.0)
    assert s.mpp == pytest.approx((0.5, 0.5))
    assert s.vendor == "generic-tiff"
    assert s.backend == ("pyvips" if backend == "auto" else backend)


def test_odd_sizes_snap_downsamples_to_integers(slides):
    s = open_slide(slides["odd"])
    assert s.level_dimensions[1] == (1500, 1001)
    assert s.level_downsamples[1] == 2.0  # not 3001/1500 = 2.00067


@pytest.mark.parametrize("name", ["pyramid", "odd", "aperio"])
def test_backends_return_identical_pixels(slides, name):
    reads = {}
    for b in TIFF_BACKENDS:
        s = open_slide(slides[name], backend=b)
        w, h = s.dimensions
        reads[b] = (
            s.read(0, 0, w, h),
            s.read(131, 77, 300, 200),
            s.read(40, 60, 200, 150, level=1) if name == "pyramid" else None,
        )
    for b in ("tiffslide", "openslide"):
        for got, want in zip(reads[b], reads["pyvips"], strict=True):
            if want is not None:
                np.testing.assert_array_equal(got, want, err_msg=f"{b} differs from pyvips")


def test_level_reads_agree_on_odd_pyramid_for_all_readers(slides):
    a = open_slide(slides["odd"], backend="pyvips").read_level(1, 333, 201, 257, 130)
    for backend in ("tiffslide", "openslide"):
        b = open_slide(slides["odd"], backend=backend).read_level(1, 333, 201, 257, 130)
        np.testing.assert_array_equal(a, b, err_msg=backend)


_ODD_PYRAMIDS = [
    [(1001, 767), (250, 191), (62, 47)],
    [(3001, 2003), (1500, 1001), (750, 500), (187, 125)],
    [(1234, 777), (400, 250), (100, 63)],
    [(2401, 1601), (1200, 800), (399, 266)],
]


@pytest.mark.parametrize("sizes", _ODD_PYRAMIDS, ids=lambda s: f"{s[0][0]}x{s[0][1]}")
def test_level_pixels_exactly_as_stored_on_every_reader(tmp_path, sizes, caplog):
    import tifffile

    rng = np.random.default_rng(sizes[0][0])
    path = tmp_path / "pyr.tiff"
    stored = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
    with tifffile.TiffWriter(path) as tw:
        for i, arr in enumerate(stored):
            tw.write(arr, tile=(64, 64), photometric="rgb", compression="zlib", subfiletype=i > 0)
    readers = [open_slide(path, backend=b) for b in ("pyvips", "tiffslide", "openslide")]
    assert readers[2].level_count == len(sizes)  # tifffile drops levels of odd ratios (4.01, 3.1)
    for level, want in enumerate(stored):
        h, w = want.shape[:2]
        boxes = [(0, 0, w, h)] + [
            (int(x), int(y), int(rng.integers(1, 80)), int(rng.integers(1, 80)))
            for x, y in zip(rng.integers(0, w - 1, 12), rng.integers(0, h - 1, 12), strict=True)
        ]
        for s in readers:
            if level >= s.level_count:
                continue
            for x, y, bw, bh in boxes:
                got = s.read_level(level, x, y, bw, bh)
                ref = np.full((bh, bw, 3), 255, np.uint8)
                ref[: max(0, min(bh, h - y)), : max(0, min(bw, w - x))] = want[
                    y : y + bh, x : x + bw
                ]
                np.testing.assert_array_equal(
                    got, ref, err_msg=f"{s.backend} level {level} {x},{y}"
                )
            np.testing.assert_array_equal(s.read(0, 0, w, h, level=level), want)
    assert "interpolated" not in caplog.text


def test_read_shape_dtype_and_white_padding(slides):
    s = open_slide(slides["pyramid"])
    a = s.read(2000, 1500, 100, 80)
    assert a.shape == (80, 100, 3) and a.dtype == np.uint8
    assert (a[36:, :] == 255).all() and (a[:, 48:] == 255).all()
    assert (a[:36, :48] != 255).any()
    assert (s.read(-500, -500, 64, 64) == 255).all()
    assert (s.read(5000, 10, 32, 32, mpp=2.0) == 255).all()


def test_read_at_mpp_matches_antialiased_resize_of_level0(slides):
    s = open_slide(slides["pyramid"])
    x, y, w, h = 512, 384, 250, 200
    got = s.read(x, y, w, h, mpp=0.8)  # factor 1.6: from level 0, resized
    assert got.shape == (h, w, 3)
    region = s.read(x, y, 400, 320)
    ref = np.asarray(Image.fromarray(region).resize((w, h), Image.Resampling.BILINEAR))
    inner = (slice(3, -3), slice(3, -3))  # ours also uses the pixels just outside the region
    diff = np.abs(got.astype(int) - ref.astype(int))[inner]
    assert diff.mean() < 0.6 and diff.max() <= 8


def test_read_at_mpp_is_not_snapped_to_a_level(slides):
    s = open_slide(slides["pyramid"])
    at_level1 = s.read(600, 400, 128, 128, level=1)
    np.testing.assert_array_equal(s.read(600, 400, 128, 128, mpp=1.0), at_level1)
    near = s.read(600, 400, 128, 128, mpp=0.9)
    assert not np.array_equal(near, at_level1)
    # 0.9 µm/px covers 230.4 level-0 px: compare with a direct resize of level 0
    ref = np.asarray(
        Image.fromarray(s.read(600, 400, 231, 231)).resize(
            (128, 128), Image.Resampling.BILINEAR, box=(0, 0, 230.4, 230.4)
        )
    )
    assert np.abs(near.astype(int) - ref.astype(int))[3:-3, 3:-3].mean() < 1.0


def test_coarse_read_uses_pyramid_and_matches_level0(slides):
    s = open_slide(slides["pyramid"])
    got = s.read(256, 256, 200, 150, mpp=2.0)  # level 2 exactly
    ref = np.asarray(
        Image.fromarray(s.read(256, 256, 800, 600)).resize((200, 150), Image.Resampling.BOX)
    )
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 6.0  # level 2 is re-encoded JPEG
    np.testing.assert_array_equal(got, s.read_level(2, 64, 64, 200, 150))


def test_banded_reads_equal_single_pass(slides, monkeypatch):
    s = open_slide(slides["pyramid"])
    whole = s.read(0, 0, 700, 500, mpp=0.7)
    monkeypatch.setattr(io_base, "_BAND_PIXELS", 5000)
    banded = s.read(0, 0, 700, 500, mpp=0.7)
    diff = np.abs(banded.astype(int) - whole.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05  # PIL's fixed-point rounding only


def test_thumbnail(slides):
    t = open_slide(slides["pyramid"]).thumbnail(512)
    assert t.shape == (384, 512, 3)


def test_missing_mpp_and_override(slides):
    s = open_slide(slides["nompp"])
    assert s.mpp is None
    s.read(0, 0, 16, 16)  # level reads need no mpp
    with pytest.raises(ss.MissingMppError, match=r"nompp\.tiff.*mpp="):
        s.read(0, 0, 16, 16, mpp=1.0)
    s2 = open_slide(slides["nompp"], mpp=0.5)
    assert s2.mpp == (0.5, 0.5)
    assert s2.read(0, 0, 16, 16, mpp=1.0).shape == (16, 16, 3)


def test_plain_images_and_alpha(slides):
    s = open_slide(slides["png"])
    assert s.backend == "image" and s.mpp is None and s.dimensions == (800, 600)
    np.testing.assert_array_equal(
        s.read(0, 0, 800, 600), open_slide(slides["pyramid"]).read(0, 0, 800, 600)
    )
    rgba = open_slide(slides["rgba"], mpp=0.5)
    hole = rgba.read(100, 100, 200, 100)
    assert (hole == 255).all()
    assert rgba.read(0, 0, 50, 50, mpp=1.0).shape == (50, 50, 3)


def test_auto_picks_fastest_reader(slides, shared_data):
    assert open_slide(slides["pyramid"]).backend == "pyvips"
    assert open_slide(slides["png"]).backend == "image"
    assert open_slide(shared_data / "boxes_0.dcm").backend == "openslide"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_slide_is_picklable_for_worker_processes(slides, method):
    s = open_slide(slides["pyramid"])
    want = _read_in_child(s)
    clone = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(_read_in_child(clone), want)
    with mp.get_context(method).Pool(1) as pool:
        np.testing.assert_array_equal(pool.apply(_read_in_child, (s,)), want)


def test_bad_arguments_are_config_errors(slides):
    s = open_slide(slides["pyramid"])
    with pytest.raises(ss.ConfigError, match="positive integers"):
        s.read(0, 0, 0, 10)
    with pytest.raises(ss.ConfigError, match="at most one"):
        s.read(0, 0, 10, 10, mpp=1.0, level=1)
    with pytest.raises(ss.ConfigError, match="level must be"):
        s.read(0, 0, 10, 10, level=99)
    with pytest.raises(ss.ConfigError, match="backend must be"):
        open_slide(slides["pyramid"], backend="nope")
    with pytest.raises(ss.ConfigError, match="mpp must be"):
        open_slide(slides["pyramid"], mpp=-1)


def test_open_errors_name_the_file(tmp_path):
    with pytest.raises(ss.SlideOpenError, match="not found: .*missing.svs"):
        open_slide(tmp_path / "missing.svs")
    with pytest.raises(ss.SlideOpenError, match="folder"):
        open_slide(tmp_path)
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"this is not a slide" * 100)
    with pytest.raises(ss.SlideOpenError, match=r"junk\.svs.*pyvips.*tiffslide.*openslide"):
        open_slide(junk)


def test_truncated_slide_fails_cleanly_on_read(slides, tmp_path):
    data = slides["pyramid"].read_bytes()
    cut = tmp_path / "cut.tiff"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ss.SlideStreamError, match=r"cut\.tiff"):
        s = open_slide(cut)
        s.read(0, 0, 2048, 1536)
