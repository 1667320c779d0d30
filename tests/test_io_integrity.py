"""Damaged tiles raise SlideReadError for that region on every reader; implausible headers are
refused at open with one line."""

from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile

import slidestream as ss
from slidestream.io import open_slide
from slidestream.io._integrity import jpeg_damage, tile_index
from slidestream.io._pixels import RefusedFileError

READERS = ["pyvips", "tiffslide", "openslide"]
T = 128  # tile size of the generated files; tile (1, 1) is the damaged one


def _image(size: int = 512) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 40, (size, size, 3))
    base = np.dstack([(xx // 2) % 216, (yy // 2) % 216, ((xx + yy) // 4) % 216])
    return (base + noise).astype(np.uint8)


def _write(path: Path, compression: str) -> tuple[int, int]:
    """A 512x512 RGB TIFF in 128 px tiles, plus a 256x256 level; (offset, bytes) of tile (1, 1)."""
    img = _image()
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(T, T), photometric="rgb", compression=compression)
        tw.write(
            img[::2, ::2], tile=(T, T), photometric="rgb", compression=compression, subfiletype=1
        )
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        return int(page.dataoffsets[5]), int(page.databytecounts[5])


def _damage(path: Path, kind: str, offset: int, count: int) -> None:
    data = bytearray(path.read_bytes())
    tile = bytes(data[offset : offset + count])
    if kind == "zeroed":  # header intact, entropy-coded data (and end marker) zeroed
        sos = tile.rfind(b"\xff\xda")
        start = sos + 2 + int.from_bytes(tile[sos + 2 : sos + 4], "big")
        if tile[:2] != b"\xff\xd8":
            start = 4  # deflate/LZW: keep a few bytes
        data[offset + start : offset + count] = bytes(count - start)
    elif kind == "zeroed_tail":  # only the last bytes (the JPEG end marker) are gone
        data[offset + count - 2 : offset + count] = b"\0\0"
    elif kind == "garbage":  # the middle overwritten, start and end intact
        rng = np.random.default_rng(0)
        a, b = offset + count // 3, offset + 2 * count // 3
        data[a:b] = rng.integers(0, 256, b - a, dtype=np.uint8).tobytes()
    elif kind == "missing":  # an empty (sparse) tile entry: offset and byte count 0
        with tifffile.TiffFile(path) as tf:
            tags = tf.pages[0].tags
            off_pos = tags["TileOffsets"].valueoffset + 5 * 4
            cnt_pos = tags["TileByteCounts"].valueoffset + 5 * 4
        data[off_pos : off_pos + 4] = bytes(4)
        data[cnt_pos : cnt_pos + 4] = bytes(4)
    path.write_bytes(bytes(data))


DAMAGE = [
    ("jpeg", "zeroed"),
    ("jpeg", "zeroed_tail"),
    ("jpeg", "garbage"),
    ("zlib", "zeroed"),
    ("zlib", "garbage"),
    ("lzw", "zeroed"),
    ("lzw", "garbage"),
]


@pytest.mark.parametrize(("compression", "kind"), DAMAGE)
def test_damaged_tile_raises_for_its_region_only(tmp_path, compression, kind):
    good = tmp_path / "good.tiff"
    _write(good, compression)
    bad = tmp_path / f"{kind}.tiff"
    offset, count = _write(bad, compression)
    _damage(bad, kind, offset, count)
    for backend in READERS:
        ref = open_slide(good, backend=backend)
        s = open_slide(bad, backend=backend)
        for _ in range(2):  # every time, not just the first (libvips caches failed tiles)
            with pytest.raises(ss.SlideReadError) as info:
                s.read(100, 100, 100, 100)  # touches tiles (0..1, 0..1)
            msg = str(info.value)
            assert f"{bad}" in msg and "level 0" in msg and "\n" not in msg, msg
            assert "x=100 y=100 w=100 h=100" in msg, msg
            assert "damaged" in msg, msg
        # the slide is not dead: intact regions (also after the error) read exactly
        for x, y in ((0, 0), (300, 0), (0, 300), (260, 260)):
            np.testing.assert_array_equal(
                s.read(x, y, 120, 120), ref.read(x, y, 120, 120), err_msg=f"{backend} {x},{y}"
            )
        np.testing.assert_array_equal(
            s.read_level(1, 0, 0, 256, 256), ref.read_level(1, 0, 0, 256, 256)
        )


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_empty_tiles_read_as_white_background(tmp_path, compression):
    good, sparse = tmp_path / "good.tiff", tmp_path / "sparse.tiff"
    _write(good, compression)
    offset, count = _write(sparse, compression)
    _damage(sparse, "missing", offset, count)
    for backend in READERS:
        ref = open_slide(good, backend=backend).read(0, 0, 512, 512)
        want = ref.copy()
        want[T : 2 * T, T : 2 * T] = 255
        s = open_slide(sparse, backend=backend)
        np.testing.assert_array_equal(s.read(0, 0, 512, 512), want, err_msg=backend)
        np.testing.assert_array_equal(s.read(100, 100, 100, 100), want[100:200, 100:200])
        np.testing.assert_array_equal(s.read(130, 140, 20, 30), want[140:170, 130:150])


def test_damaged_tile_of_a_coarser_level(tmp_path):
    path, good = tmp_path / "level1.tiff", tmp_path / "good.tiff"
    _write(path, "jpeg")
    _write(good, "jpeg")
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[1]
        offset, count = int(page.dataoffsets[3]), int(page.databytecounts[3])  # tile (1, 1)
    _damage(path, "zeroed", offset, count)
    for backend in READERS:
        s = open_slide(path, backend=backend)
        with pytest.raises(ss.SlideReadError, match=r"level1\.tiff.*level 1.*damaged"):
            s.read_level(1, 120, 120, 20, 20)
        with pytest.raises(ss.SlideReadError, match="level 1"):
            s.read(250, 250, 40, 40, downsample=2)
        ref = open_slide(good, backend=backend).read_level(1, 0, 0, 128, 128)
        np.testing.assert_array_equal(s.read_level(1, 0, 0, 128, 128), ref)
        assert s.read(0, 0, 512, 512).shape == (512, 512, 3)  # level 0 is intact


def test_file_cut_short_is_refused_at_open(tmp_path):
    path = tmp_path / "cut.tiff"
    offset, count = _write(path, "jpeg")
    with tifffile.TiffFile(path) as tf:
        end = int(tf.pages[0].dataoffsets[-1])  # cut inside level 0's last tile
    path.write_bytes(path.read_bytes()[: end + 10])
    for backend in ("pyvips", "tiffslide", "auto"):
        with pytest.raises(RefusedFileError, match=r"cut\.tiff is cut short: a \d+-byte file"):
            open_slide(path, backend=backend)
    with pytest.raises(ss.SlideOpenError, match=r"cut\.tiff"):  # libtiff stops at the cut IFD
        open_slide(path, backend="openslide")


def _claimed_bigtiff(path: Path, width: int, height: int, tile: bytes | None) -> None:
    """A BigTIFF claiming ``width`` x ``height`` px in 256 px JPEG tiles; every tile entry
    points at the same ``tile`` bytes, or is empty (sparse) when ``tile`` is None."""
    n = -(-width // 256) * -(-height // 256)
    entries = [(256, 16, 1, width), (257, 16, 1, height), (258, 3, 3, None), (259, 3, 1, 7)]
    entries += [(262, 3, 1, 2), (277, 3, 1, 3), (284, 3, 1, 1), (322, 3, 1, 256), (323, 3, 1, 256)]
    ifd = 16
    data_at = ifd + 8 + 20 * (len(entries) + 2) + 8
    tile_at = data_at + 16 * n
    offsets = np.full(n, tile_at if tile else 0, np.uint64)
    counts = np.full(n, len(tile) if tile else 0, np.uint64)
    out = bytearray(b"II" + struct.pack("<HHHQ", 43, 8, 0, ifd))
    out += struct.pack("<Q", len(entries) + 2)
    for tag, typ, cnt, val in entries:
        value = struct.pack("<HHHH", 8, 8, 8, 0) if val is None else struct.pack("<Q", val)
        out += struct.pack("<HHQ", tag, typ, cnt) + value
    out += struct.pack("<HHQQ", 324, 16, n, data_at) + struct.pack(
        "<HHQQ", 325, 16, n, data_at + 8 * n
    )
    out += struct.pack("<Q", 0)
    assert len(out) == data_at
    out += offsets.tobytes() + counts.tobytes() + (tile or b"")
    path.write_bytes(bytes(out))


@pytest.mark.parametrize("sparse", [True, False])
def test_header_claiming_far_more_pixels_than_the_file_holds_is_refused(tmp_path, sparse):
    import imagecodecs

    tile = None if sparse else imagecodecs.jpeg8_encode(np.full((256, 256, 3), 255, np.uint8))
    path = tmp_path / "huge.tiff"
    _claimed_bigtiff(path, 200_000, 200_000, tile)
    assert path.stat().st_size < 11_000_000
    for backend in READERS + ["auto"]:
        with pytest.raises(RefusedFileError) as info:
            open_slide(path, backend=backend)
        msg = str(info.value)
        assert "huge.tiff claims 200000x200000 px but is a" in msg and "\n" not in msg, msg
        assert f"{path.stat().st_size}-byte file" in msg


def test_header_whose_tile_table_does_not_fit_its_dimensions_is_refused(tmp_path):
    path = tmp_path / "patched.tiff"
    _write(path, "jpeg")
    with tifffile.TiffFile(path) as tf:  # claim 20000 px wide with level 0's 16-tile table
        pos = tf.pages[0].tags["ImageWidth"].valueoffset
        kind = tf.pages[0].tags["ImageWidth"].dtype
    data = bytearray(path.read_bytes())
    data[pos : pos + (2 if kind == 3 else 4)] = (20000).to_bytes(2 if kind == 3 else 4, "little")
    path.write_bytes(bytes(data))
    for backend in READERS + ["auto"]:
        with pytest.raises(ss.SlideOpenError, match=r"patched\.tiff"):
            open_slide(path, backend=backend)
    with pytest.raises(RefusedFileError, match=r"claims 20000x512 px at level 0, which needs"):
        open_slide(path, backend="tiffslide")


def _page(width: int, height: int, counts: np.ndarray, tile: int = 256) -> SimpleNamespace:
    offsets = 1000 + np.cumsum(counts) - counts
    return SimpleNamespace(
        imagewidth=width,
        imagelength=height,
        is_tiled=True,
        tilewidth=tile,
        tilelength=tile,
        rowsperstrip=None,
        dataoffsets=offsets,
        databytecounts=counts,
        compression=7,
        is_ndpi=False,
        planarconfig=1,
        imagedepth=1,
    )


def test_real_sized_slides_pass_the_plausibility_floor():
    n = -(-100_000 // 256) * -(-80_000 // 256)
    # 500 MB, mostly white background: 90 % of tiles at 1.1 kB, tissue tiles at ~35 kB
    counts = np.where(np.arange(n) % 10 == 0, 35_000, 1_100).astype(np.int64)
    assert 300e6 < counts.sum() < 600e6
    tile_index([_page(100_000, 80_000, counts)], "big.svs", file_size=int(counts.sum()) + 2000)
    # a scan that is 99.9 % blank (deflate background, 370 px per byte) still passes
    counts = np.where(np.arange(n) % 1000 == 0, 35_000, 177).astype(np.int64)
    tile_index([_page(100_000, 80_000, counts)], "blank.svs", file_size=int(counts.sum()) + 2000)
    # the same table claiming 400x the area does not
    with pytest.raises(RefusedFileError, match="claims 2000000x1600000 px"):
        tile_index([_page(2_000_000, 1_600_000, counts, tile=5120)], "x.svs", file_size=10**9)


def test_jpeg_damage_detector_accepts_whole_streams():
    import imagecodecs

    whole = imagecodecs.jpeg8_encode(_image(256))
    assert jpeg_damage(whole) is None
    assert jpeg_damage(whole + bytes(100)) is None  # padding after the end marker
    assert jpeg_damage(whole + b"\xff" * 3) is None
    assert "end-of-image" in jpeg_damage(whole[: len(whole) // 2])
    assert "start-of-image" in jpeg_damage(bytes(len(whole)))
    scan = b"\xff\xd8\xff\xda\x00\x02"  # SOI, then SOS with an empty header
    assert jpeg_damage(scan + b"ab\xff\xff\xd0cd\xff\xff\x00\xff\xd9") is None  # fill, RST
    assert "stray" in jpeg_damage(scan + b"ab\xff\xff\x3fcd\xff\xd9")
    assert "stray" in jpeg_damage(scan + b"ab\xff\x3fcd\xff\xd9")


def test_real_files_still_open_and_read(shared_data):
    for name in ("cmu_small_region.svs", "small.svs", "boxes.tiff", "boxes_0.dcm"):
        s = open_slide(shared_data / name)
        w, h = s.dimensions
        assert s.read(0, 0, min(w, 256), min(h, 256)).shape[2] == 3
        for backend in ("pyvips", "tiffslide", "openslide") if name != "boxes_0.dcm" else ():
            open_slide(shared_data / name, backend=backend).read(0, 0, 16, 16)
    with pytest.raises(ss.SlideOpenError, match=r"unopenable\.tiff.*compression"):
        open_slide(shared_data / "unopenable.tiff")
    with pytest.raises(ss.SlideReadError, match=r"unreadable\.svs"):
        open_slide(shared_data / "unreadable.svs").read(0, 0, 16, 16)


def test_slide_file_gone_after_open_is_a_read_error(tmp_path):
    path = tmp_path / "gone.tiff"
    _write(path, "jpeg")
    for backend in READERS:
        s = open_slide(path, backend=backend)
        path.rename(tmp_path / "moved.tiff")
        try:
            with pytest.raises(ss.SlideReadError, match=r"gone\.tiff"):
                s.read(0, 0, 64, 64)
        finally:
            (tmp_path / "moved.tiff").rename(path)
