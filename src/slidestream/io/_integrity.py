"""Tile tables of TIFF-family slides: implausible headers refused at open, damaged tiles at read.

At open, :func:`tile_index` checks each level's tile (or strip) table against the file: the
table must have one entry per tile of the stated dimensions, no tile may point past the end of
the file (a file cut short), and the distinct tiles of level 0 must hold at least one byte per
``_MIN_PX_PER_BYTE`` pixels. Blank background tiles compress to 40 (JPEG) to 370 (deflate,
WebP) pixels per byte, tissue to about 2, and a real 100000x80000 px, 500 MB slide stores one
byte per 16 pixels; a 10 MB file claiming 200000x200000 px would need 4000 per byte.

At read, :meth:`TileIndex.check` looks at each tile a region touches, once per process: a JPEG
tile that is not one whole JPEG stream (no end marker: zeroed or cut short; bytes that are not
valid entropy-coded data: overwritten) raises :class:`SlideReadError` for that region. Tiles
with no data (offset or byte count 0: "sparse" TIFFs such as Philips exports leave background
out) read as white on every reader; the floor above counts them as 0 bytes. The decoders catch the rest
(deflate/LZW errors, JPEG headers), and the readers turn their errors into SlideReadError too.
Not detectable by anyone: uncompressed tiles overwritten with other bytes, and JPEG tiles
damaged in the middle whose end marker survived and whose bytes still decode.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from slidestream.errors import SlideReadError
from slidestream.io._pixels import RefusedFileError

__all__ = ["TileIndex", "tile_index"]

_MIN_PX_PER_BYTE = 16384  # a level 0 storing less than this is not a real slide
_JPEG = 7
# In JPEG entropy-coded data 0xFF is only followed by 0x00 (stuffing) or a restart marker.
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # candidates; 0xFF fill bytes are checked after
_ALLOWED_AFTER_FF = frozenset([0x00, *range(0xD0, 0xD8)])


@dataclass
class _Level:
    offsets: np.ndarray  # (rows, cols) int64 file offsets of the tiles
    counts: np.ndarray  # (rows, cols) int64 byte counts
    tile_w: int
    tile_h: int
    jpeg: bool
    ok: np.ndarray  # (rows, cols) bool: tile checked already
    empty: np.ndarray  # (rows, cols) bool: no data (offset or byte count 0): background


class TileIndex:
    """Per-level tile tables of a TIFF file; checks the tiles of a region before it is read."""

    def __init__(self, levels: list[_Level | None]) -> None:
        self.levels = levels

    def check(
        self, path: Any, level: int, lv_x: int, lv_y: int, lv_w: int, lv_h: int
    ) -> list[tuple[int, int, int, int]] | None:
        """Check the tiles under an in-bounds level rectangle, each once per process.

        Raises SlideReadError if one is damaged. Returns None when all hold data, else the
        ``(lv_x, lv_y, lv_w, lv_h)`` parts of the rectangle that do (runs of tiles per tile row;
        the rest lies on empty tiles, which are background).
        """
        lv = self.levels[level] if level < len(self.levels) else None
        if lv is None:
            return None
        c0, c1 = lv_x // lv.tile_w, (lv_x + lv_w - 1) // lv.tile_w + 1
        r0, r1 = lv_y // lv.tile_h, (lv_y + lv_h - 1) // lv.tile_h + 1
        if lv.ok[r0:r1, c0:c1].all():
            return None
        todo = ~lv.ok[r0:r1, c0:c1] & ~lv.empty[r0:r1, c0:c1]
        if todo.any():
            self._inspect(path, level, lv, (lv_x, lv_y, lv_w, lv_h), r0, c0, todo)
        empty = lv.empty[r0:r1, c0:c1]
        if not empty.any():
            return None
        parts = []
        for r, row in enumerate(~empty):
            y0 = max(lv_y, (r0 + r) * lv.tile_h)
            y1 = min(lv_y + lv_h, (r0 + r + 1) * lv.tile_h)
            for start, stop in _runs(row):
                x0 = max(lv_x, (c0 + start) * lv.tile_w)
                x1 = min(lv_x + lv_w, (c0 + stop) * lv.tile_w)
                parts.append((x0, y0, x1 - x0, y1 - y0))
        return parts

    def _inspect(
        self, path: Any, level: int, lv: _Level, box: tuple, r0: int, c0: int, todo: np.ndarray
    ) -> None:
        where = f"{path} (level {level}, region x={box[0]} y={box[1]} w={box[2]} h={box[3]})"
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below, errors wrapped
        except OSError as exc:
            raise SlideReadError(f"cannot read {where}: {exc.strerror or exc}") from exc
        with f:
            for r, c in zip(*np.nonzero(todo), strict=True):
                row, col = r0 + int(r), c0 + int(c)
                offset, count = int(lv.offsets[row, col]), int(lv.counts[row, col])
                problem = jpeg_damage(os.pread(f.fileno(), count, offset)) if lv.jpeg else None
                if problem:
                    raise SlideReadError(
                        f"cannot read {where}: tile {col},{row} {problem}; other regions may "
                        f"still read: skip this one, or re-export or re-scan the slide"
                    )
                lv.ok[row, col] = True


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index runs of True in a 1-D bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flags.astype(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def jpeg_damage(data: bytes) -> str | None:
    """Why ``data`` is not one whole JPEG stream (tile data damaged), or None if it looks whole."""
    if data[:2] != b"\xff\xd8":
        return "has damaged JPEG data (no start-of-image marker)"
    end = len(data.rstrip(b"\0\xff"))  # writers may pad tiles after the end marker
    if data[end - 2 : end] != b"\xff\xd9":
        return "has damaged JPEG data (no end-of-image marker: zeroed or cut short)"
    sos = data.rfind(b"\xff\xda", 0, end - 2)
    if sos < 0:
        return "has damaged JPEG data (no start-of-scan marker)"
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    if _stray_marker(data, start, end - 2):
        return "has damaged JPEG data (stray bytes in the compressed data)"
    return None


def _stray_marker(data: bytes, start: int, stop: int) -> bool:
    """True if ``data[start:stop]`` (entropy-coded) has 0xFF followed, after any 0xFF fill
    bytes, by something other than a stuffed 0x00 or a restart marker."""
    pos = start
    while (m := _MARKER.search(data, pos, stop)) is not None:
        j = m.start() + 1
        while j < stop and data[j] == 0xFF:
            j += 1
        if j < stop and data[j] not in _ALLOWED_AFTER_FF:
            return True
        pos = j + 1
    return False


def tile_index(pages: list[Any], path: Any, file_size: int | None = None) -> TileIndex | None:
    """Check the tile tables of a pyramid's levels (tifffile keyframes) and index them.

    Raises SlideOpenError, naming the file, the claimed size and the file size, when a table is
    implausible. Returns None for layouts it does not index (NDPI, planar or 3-D pages).
    """
    size = os.path.getsize(path) if file_size is None else file_size
    levels = []
    for i, page in enumerate(pages):
        if page.is_ndpi or int(page.planarconfig) != 1 or int(page.imagedepth) != 1:
            return None
        levels.append(_level(page, path, size, i))
    first = levels[0]
    offsets, at = np.unique(first.offsets, return_index=True)  # tiles may share data (dedup)
    stored = int(first.counts.ravel()[at][offsets > 0].sum())
    w, h = int(pages[0].imagewidth), int(pages[0].imagelength)
    if stored * _MIN_PX_PER_BYTE < w * h:
        raise RefusedFileError(
            f"{path} claims {w}x{h} px but is a {size}-byte file storing {stored} bytes of "
            f"level-0 data ({stored / (w * h):.2g} byte/px): its header or tile table is "
            f"implausible; re-export or re-scan the slide"
        )
    return TileIndex(levels)


def _level(page: Any, path: Any, size: int, level: int) -> _Level:
    w, h = int(page.imagewidth), int(page.imagelength)
    if page.is_tiled:
        tw, th = int(page.tilewidth), int(page.tilelength)
    else:
        tw, th = w, max(1, min(int(page.rowsperstrip or h), h))
    rows, cols = -(-h // th), -(-w // tw)
    offsets = np.asarray(page.dataoffsets, np.int64)
    counts = np.asarray(page.databytecounts, np.int64)
    if offsets.size != rows * cols or counts.size != rows * cols:
        raise RefusedFileError(
            f"{path} claims {w}x{h} px at level {level}, which needs {rows * cols} tiles, but "
            f"its tile table has {offsets.size}: the header is damaged; re-export the slide"
        )
    ends = np.where(counts > 0, offsets + counts, 0)
    if ends.size and int(ends.max()) > size:
        raise RefusedFileError(
            f"{path} is cut short: a {size}-byte file whose tiles of level {level} ({w}x{h} px) "
            f"run to byte {int(ends.max())}; copy or download it again"
        )
    return _Level(
        offsets.reshape(rows, cols),
        counts.reshape(rows, cols),
        tw,
        th,
        int(page.compression) == _JPEG,
        np.zeros((rows, cols), bool),
        ((offsets == 0) | (counts == 0)).reshape(rows, cols),
    )
