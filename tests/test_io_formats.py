"""Pixel formats other than 8-bit RGB: every reader gives the same pixels or the same refusal.

Expected pixels are computed here from the stored samples by the documented rules
(slidestream.io._pixels), independently of the readers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import slidestream as ss
from slidestream.io import open_slide
from slidestream.io._pixels import PixelFormatError

READERS = ["pyvips", "tiffslide", "openslide", "image"]
H, W = 150, 200
_rng = np.random.default_rng(7)


def _scale(v: np.ndarray, top: int) -> np.ndarray:
    """round(v * 255 / top), halves up, capped at 255."""
    return np.minimum((v.astype(np.int64) * 510 + top) // (2 * top), 255).astype(np.uint8)


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    c, a = colour.astype(np.int64), alpha.astype(np.int64)[..., None]
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _grey(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2)


def _u8(*shape: int) -> np.ndarray:
    return _rng.integers(0, 256, (H, W, *shape), dtype=np.uint8)


def _u16(*shape: int) -> np.ndarray:
    return _rng.integers(0, 65536, (H, W, *shape), dtype=np.uint16)


def _cases() -> dict[str, tuple[np.ndarray, dict, np.ndarray | str, set[str]]]:
    """name -> (samples, tifffile options, expected RGB or refusal text, readers that must read)."""
    g8, ga8, g16, rgb16, rgba16 = _u8(), _u8(2), _u16(), _u16(3), _u16(4)
    rgba8 = _u8(4)
    g12 = _rng.integers(0, 4096, (H, W), dtype=np.uint16)
    idx = _u8()
    cmap16 = _rng.integers(0, 65536, (3, 256), dtype=np.uint16)
    cmap8 = _rng.integers(0, 256, (3, 256), dtype=np.uint16)
    tiled = {"pyvips", "tiffslide", "image"}
    grey = dict(photometric="minisblack")
    return {
        "grey8": (g8, grey, _grey(g8), tiled | {"openslide"}),
        "grey8_stripped": (
            g8,
            dict(grey, tile=None, rowsperstrip=16),
            _grey(g8),
            {"tiffslide", "image"},
        ),
        "grey_alpha8": (
            ga8,
            dict(grey, extrasamples=["unassalpha"]),
            _over_white(_grey(ga8[..., 0]), ga8[..., 1]),
            tiled,
        ),
        "miniswhite8": (g8, dict(photometric="miniswhite"), _grey(255 - g8), tiled | {"openslide"}),
        "grey16": (g16, grey, _grey(_scale(g16, 65535)), tiled),
        "grey16_smax4095": (
            g12,
            dict(grey, extratags=[(281, "H", 1, 4095, True)]),
            _grey(_scale(g12, 4095)),
            tiled,
        ),
        "grey12": (
            g12,
            dict(grey, bitspersample=12, compression=None),
            _grey(_scale(g12, 4095)),
            {"tiffslide", "image"},
        ),
        "miniswhite16": (
            g16,
            dict(photometric="miniswhite"),
            _grey(_scale(65535 - g16, 65535)),
            tiled,
        ),
        "rgb16": (rgb16, dict(photometric="rgb"), _scale(rgb16, 65535), tiled),
        "rgb16_stripped": (
            rgb16,
            dict(photometric="rgb", tile=None, rowsperstrip=7),
            _scale(rgb16, 65535),
            {"tiffslide", "image"},
        ),
        "rgba16": (
            rgba16,
            dict(photometric="rgb", extrasamples=["unassalpha"]),
            _over_white(_scale(rgba16[..., :3], 65535), _scale(rgba16[..., 3], 65535)),
            tiled,
        ),
        "rgba8": (
            rgba8,
            dict(photometric="rgb", extrasamples=["unassalpha"]),
            _over_white(rgba8[..., :3], rgba8[..., 3]),
            tiled,
        ),
        "rgba8_premultiplied": (
            rgba8,
            dict(photometric="rgb", extrasamples=["assocalpha"]),
            np.minimum(rgba8[..., :3].astype(int) + 255 - rgba8[..., 3:].astype(int), 255).astype(
                np.uint8
            ),
            {"tiffslide", "image"},
        ),
        "palette16": (
            idx,
            dict(photometric="palette", colormap=cmap16),
            (cmap16 >> 8).T.astype(np.uint8)[idx],
            tiled | {"openslide"},
        ),
        "palette8": (
            idx,
            dict(photometric="palette", colormap=cmap8),
            cmap8.T.astype(np.uint8)[idx],
            tiled | {"openslide"},
        ),
        "float32": (
            _rng.random((H, W)).astype(np.float32),
            grey,
            "32-bit floating-point greyscale pixels",
            set(),
        ),
        "two_channel8": (
            _u8(2),
            dict(grey, planarconfig="contig"),
            "8-bit unsigned 2-channel",
            set(),
        ),
        "four_channel8": (
            _u8(4),
            dict(grey, planarconfig="contig"),
            "8-bit unsigned 4-channel",
            set(),
        ),
        "fluorescence16": (
            _u16(5),
            dict(grey, planarconfig="contig"),
            "16-bit unsigned 5-channel",
            set(),
        ),
        "rgb_plus_extra8": (
            _u8(4),
            dict(photometric="rgb", extrasamples=["unspecified"]),
            "4-channel",
            set(),
        ),
        "signed16": (g16.astype(np.int16), grey, "16-bit signed greyscale", set()),
    }


CASES = _cases()


@pytest.fixture(scope="module")
def format_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("formats")
    out = {}
    for name, (arr, options, _, _) in CASES.items():
        options = {"tile": (64, 64), **options}
        if options["tile"] is None:
            del options["tile"]
        out[name] = d / f"{name}.tiff"
        options.setdefault("compression", "zlib")
        tifffile.imwrite(out[name], arr, **options)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_reader_gives_the_same_pixels_or_refuses(format_files, name):
    _, _, want, must_read = CASES[name]
    path = format_files[name]
    for backend in READERS + ["auto"]:
        try:
            s = open_slide(path, backend=backend)
        except ss.SlideOpenError as exc:
            assert backend not in must_read, f"{backend} refused {name}: {exc}"
            assert backend != "auto" or isinstance(want, str), f"auto refused {name}: {exc}"
            assert "\n" not in str(exc) and "corrupt" not in str(exc)
            if isinstance(want, str):
                assert isinstance(exc, PixelFormatError) or backend == "image", (backend, exc)
                assert want in str(exc) or backend == "image", str(exc)
            continue
        assert not isinstance(want, str), f"{backend} opened {name}, which must be refused"
        got = s.read(0, 0, W, H)
        np.testing.assert_array_equal(got, want, err_msg=f"{backend} on {name}")
        np.testing.assert_array_equal(s.read_level(0, 37, 21, 90, 70), want[21:91, 37:127])


def test_refusal_says_what_the_file_holds(format_files):
    with pytest.raises(PixelFormatError) as info:
        open_slide(format_files["fluorescence16"])
    msg = str(info.value)
    assert "fluorescence16.tiff holds 16-bit unsigned 5-channel" in msg
    assert "not a brightfield RGB slide" in msg and "\n" not in msg
    assert isinstance(info.value, ss.SlideOpenError)


def test_auto_moves_on_when_a_reader_cannot_deliver_the_pixels(format_files):
    # OpenSlide reduces 16-bit samples its own way: it refuses, with a hint
    with pytest.raises(ss.SlideOpenError, match=r"grey16\.tiff.*backend='pyvips' or 'tiffslide'"):
        open_slide(format_files["grey16"], backend="openslide")
    assert open_slide(format_files["grey16"]).backend == "pyvips"
    assert open_slide(format_files["grey8_stripped"]).backend == "tiffslide"


def _png_cases(d: Path) -> dict[str, tuple[Path, np.ndarray]]:
    import imagecodecs

    g8, ga8, g16, rgb16, rgba16 = _u8(), _u8(2), _u16(), _u16(3), _u16(4)
    idx = _u8()
    pal = _rng.integers(0, 256, (256, 3), dtype=np.uint8)
    out = {}
    Image.fromarray(g8).save(d / "g8.png")
    out["g8"] = (d / "g8.png", _grey(g8))
    Image.fromarray(ga8, "LA").save(d / "ga8.png")
    out["ga8"] = (d / "ga8.png", _over_white(_grey(ga8[..., 0]), ga8[..., 1]))
    p = Image.fromarray(idx, "P")
    p.putpalette(pal.ravel().tolist())
    p.save(d / "pal.png")
    out["pal"] = (d / "pal.png", pal[idx])
    for name, arr, want in (
        ("g16", g16, _grey(_scale(g16, 65535))),
        ("rgb16", rgb16, _scale(rgb16, 65535)),
        (
            "rgba16",
            rgba16,
            _over_white(_scale(rgba16[..., :3], 65535), _scale(rgba16[..., 3], 65535)),
        ),
    ):
        (d / f"{name}.png").write_bytes(imagecodecs.png_encode(arr))
        out[name] = (d / f"{name}.png", want)
    return out


def test_png_formats_through_the_image_reader(tmp_path):
    for name, (path, want) in _png_cases(tmp_path).items():
        s = open_slide(path)
        assert s.backend == "image"
        np.testing.assert_array_equal(s.read(0, 0, W, H), want, err_msg=name)


def test_16bit_png_and_tiff_agree(tmp_path, format_files):
    import imagecodecs

    samples = CASES["rgb16"][0]
    (tmp_path / "rgb16.png").write_bytes(imagecodecs.png_encode(samples))
    np.testing.assert_array_equal(
        open_slide(tmp_path / "rgb16.png").read(0, 0, W, H),
        open_slide(format_files["rgb16"]).read(0, 0, W, H),
    )


def test_float_png_like_modes_are_refused(tmp_path):
    Image.fromarray(_rng.random((H, W)).astype(np.float32), "F").save(tmp_path / "f.tiff")
    with pytest.raises(PixelFormatError, match="floating-point"):
        open_slide(tmp_path / "f.tiff", backend="image")


def test_16bit_pyramid_levels_and_scaled_reads_agree(tmp_path):
    rng = np.random.default_rng(11)
    path = tmp_path / "pyr16.tiff"
    base = rng.integers(0, 65536, (384, 512, 3), dtype=np.uint16)
    with tifffile.TiffWriter(path) as tw:
        tw.write(base, tile=(64, 64), photometric="rgb", compression="zlib")
        tw.write(base[::2, ::2], tile=(64, 64), photometric="rgb", subfiletype=1)
    reads = []
    for backend in ("pyvips", "tiffslide", "image", "auto"):
        s = open_slide(path, backend=backend)
        reads.append((s.read(10, 20, 300, 200), s.read(0, 0, 200, 150, downsample=2.5)))
        if s.level_count > 1:
            np.testing.assert_array_equal(
                s.read_level(1, 0, 0, 256, 192), _scale(base[::2, ::2], 65535), err_msg=backend
            )
    np.testing.assert_array_equal(reads[0][0], _scale(base[20:220, 10:310], 65535))
    for other in reads[1:]:
        np.testing.assert_array_equal(other[0], reads[0][0])
    # levels differ between readers (the image reader has only level 0), so scaled reads of
    # the pyramid readers are compared with each other
    np.testing.assert_array_equal(reads[1][1], reads[0][1])


def test_uncompressed_ycbcr_is_left_to_openslide(tmp_path):
    path = tmp_path / "ycbcr.tiff"
    tifffile.imwrite(path, _u8(3), photometric="ycbcr", subsampling=(1, 1), tile=(64, 64))
    for backend in ("pyvips", "tiffslide", "image"):
        with pytest.raises(ss.SlideOpenError, match=r"YCbCr \(not JPEG-compressed\).*openslide"):
            open_slide(path, backend=backend)
    s = open_slide(path)
    assert s.backend == "openslide" and s.read(0, 0, W, H).shape == (H, W, 3)
