"""Crash-safe, resumable writing of HDF5 patch databases.

HDF5 files are not crash-consistent when changed in place: a process killed while appending can
leave a file that never opens again ("bad object header version number") or whose heap is broken
("bad heap index"). So ``DB.h5`` is never modified in place:

- each slide (or block of tile images) is written as its own shard ``DB.h5.parts/NNNNNN.h5``,
  under a temporary name renamed into place when the slide is complete — a shard that exists is
  whole, and it is the slide's commit;
- :meth:`PatchDatabaseWriter.close` consolidates the previous ``DB.h5`` (if any) and the shards,
  in order, into a temporary file, renames it over ``DB.h5`` and then removes the shards.
  Compressed patches are copied chunk for chunk, not decoded and re-compressed.

A run killed at any moment therefore leaves the last consolidated ``DB.h5`` intact plus whole
shards and temporary files; the next run deletes the temporary files, skips the slides that have a
shard or are in ``DB.h5``, and consolidates. A ``DB.h5`` that cannot be read (written by an older
version and killed mid-write, or damaged on disk) is moved aside to ``DB.h5.damaged`` with a
warning and rebuilt. An OS lock on ``DB.h5.lock`` stops a second writer with a one-line error.
Power loss is covered only for the final rename (the consolidated file is fsynced), not shards.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidestream.errors import ConfigError
from slidestream.parallel import exclusive_lock

__all__ = ["FORMAT_VERSION", "PatchDatabaseWriter", "set_attrs"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COLUMNS = {"label": np.int64, "x": np.int64, "y": np.int64, "mpp": np.float32}
_STRINGS = ("slide", "patient")
_BLOCK = 128  # patches buffered before a write


@dataclass
class PatchDatabaseWriter:
    """Add patches of whole slides to one HDF5 file, resumably and crash-safely (see module doc).

    ``completed`` names the slides already in the database (consolidated or in a shard). The
    database file is complete only after :meth:`close`.
    """

    path: Path
    patch_size: int
    classes: list[str]
    split: str = ""
    compression: str = "gzip"
    level: int = 6
    params: dict[str, Any] | None = None
    seed: int = 0
    lock: bool = True

    def __post_init__(self) -> None:
        if self.compression not in ("gzip", "lzf", "none"):
            raise ConfigError(f"compression must be gzip, lzf or none, got {self.compression!r}")
        self.path = Path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.parts = self.path.with_name(self.path.name + ".parts")
        self._stack = contextlib.ExitStack()
        if self.lock:
            self._stack.enter_context(exclusive_lock(self.path, "slidestream patches"))
        try:
            self._recover()
        except BaseException:
            self._stack.close()
            raise

    # ------------------------------------------------------------------ opening
    def _recover(self) -> None:
        for tmp in _temporaries(self.path):
            log.info("removing %s, left by an interrupted run", tmp)
            tmp.unlink(missing_ok=True)
        self._final = self._read_final()
        done = set(self._final["completed"]) if self._final else set()
        self._shards: list[tuple[Path, str]] = []
        for shard in sorted(self.parts.glob("[0-9]*.h5")) if self.parts.is_dir() else []:
            key = _shard_key(shard, self.classes, self.patch_size)
            if key is None or key in done:  # unreadable, or consolidated before a crash
                shard.unlink()
                continue
            done.add(key)
            self._shards.append((shard, key))
        with contextlib.suppress(OSError):
            self.parts.rmdir()  # only if empty: everything in it was consolidated
        self.completed = done
        last = self._shards[-1][0].stem if self._shards else "-1"
        self._next = int(last) + 1

    def _read_final(self) -> dict[str, Any] | None:
        """What ``self.path`` holds (None if absent; moved aside if unreadable)."""
        import h5py

        if not self.path.exists():
            return None
        try:
            with h5py.File(self.path, "r") as h5:
                a = h5.attrs
                classes, size = json.loads(a["classes"]), int(a["patch_size"])
                n = int(a["n_committed"])
                info = {
                    "n": n,
                    "completed": json.loads(a["completed_slides"]),
                    "damaged": json.loads(a.get("damaged_regions", "{}")),
                    "clean": all(h5[k].shape[0] == n for k in ("images", *_STRINGS, *COLUMNS)),
                }
                for name in (*_STRINGS, *COLUMNS):  # the committed rows must read back
                    h5[name][:n]
        except Exception as exc:  # noqa: BLE001 - any failure to read means: rebuild
            aside = _free_name(self.path.with_name(self.path.name + ".damaged"))
            os.replace(self.path, aside)
            log.warning(
                "%s could not be read (%s); moved it to %s and rebuilding it",
                self.path,
                " ".join(str(exc).split()),
                aside.name,
            )
            return None
        if classes != self.classes or size != self.patch_size:
            raise ConfigError(
                f"{self.path} was built with other classes or patch size ({classes}, {size} px); "
                f"remove it or choose another --out"
            )
        return info

    # ------------------------------------------------------------------ writing
    def add_slide(
        self,
        slide_key: str,
        patient: str,
        patches: Iterator[tuple[Any, ...]],
        damaged: dict[str, int] | None = None,
    ) -> int:
        """Write ``(pixels, label, x, y, mpp[, patient])`` patches of one slide (or block) as a
        shard and commit it; returns their count. ``damaged`` (filled while ``patches`` is
        consumed, keyed by ``slide_key``) counts regions left out because they were unreadable."""
        import h5py

        self.parts.mkdir(exist_ok=True)
        shard = self.parts / f"{self._next:06d}.h5"
        tmp = self.parts / f".{shard.name}.{os.getpid()}.tmp"
        try:
            with h5py.File(tmp, "w") as h5:
                self._create(h5)
                n, block = 0, []
                for patch in patches:
                    block.append(patch)
                    if len(block) == _BLOCK:
                        n = _write(h5, n, block, slide_key, patient)
                n = _write(h5, n, block, slide_key, patient)
                h5.attrs["shard_key"] = slide_key
                h5.attrs["classes"] = json.dumps(self.classes)
                h5.attrs["patch_size"] = self.patch_size
                h5.attrs["n_committed"] = n
                h5.attrs["damaged_regions"] = int((damaged or {}).get(slide_key, 0))
            os.replace(tmp, shard)  # the commit point
        finally:
            tmp.unlink(missing_ok=True)
        self._next += 1
        self._shards.append((shard, slide_key))
        self.completed.add(slide_key)
        return n

    def _create(self, h5: Any) -> None:
        import h5py

        s = self.patch_size
        comp: dict[str, Any] = {}
        if self.compression == "gzip":
            comp = {"compression": "gzip", "compression_opts": self.level}
        elif self.compression == "lzf":
            comp = {"compression": "lzf"}
        h5.create_dataset(
            "images", (0, s, s, 3), np.uint8, maxshape=(None, s, s, 3), chunks=(1, s, s, 3), **comp
        )
        for name, dtype in COLUMNS.items():
            h5.create_dataset(name, (0,), dtype, maxshape=(None,), chunks=(4096,))
        for name in _STRINGS:
            h5.create_dataset(name, (0,), h5py.string_dtype(), maxshape=(None,), chunks=(4096,))

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Consolidate the shards into the database file (if anything changed) and unlock."""
        try:
            if self._shards or self._final is None or not self._final["clean"]:
                self._consolidate()
        finally:
            self._stack.close()

    def _consolidate(self) -> None:
        import h5py

        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        sources = ([(self.path, None)] if self._final else []) + self._shards
        completed, damaged = [], dict(self._final["damaged"]) if self._final else {}
        try:
            with h5py.File(tmp, "w") as out:
                self._create(out)
                n = 0
                for src, key in sources:
                    with h5py.File(src, "r") as h5:
                        n = _append(out, h5, n)
                        if key is None:
                            completed += json.loads(h5.attrs["completed_slides"])
                        else:
                            completed.append(key)
                            if int(h5.attrs["damaged_regions"]):
                                damaged[key] = int(h5.attrs["damaged_regions"])
                self._set_attrs(out, n, completed, damaged)
            _fsync(tmp)
            os.replace(tmp, self.path)  # the database now holds every shard
            _fsync(self.path.parent)
        finally:
            tmp.unlink(missing_ok=True)
        shutil.rmtree(self.parts, ignore_errors=True)
        self._shards, self._final = [], {"n": n, "completed": completed, "clean": True}

    def _set_attrs(self, h5: Any, n: int, completed: list[str], damaged: dict[str, int]) -> None:
        set_attrs(h5, n, completed, damaged, self)


def set_attrs(
    h5: Any, n: int, completed: list[str], damaged: dict[str, int], settings: Any
) -> None:
    """The attributes of a consolidated database of ``n`` rows (see :mod:`slidestream.data.hdf5`);
    ``settings`` has ``patch_size``, ``split``, ``classes``, ``seed`` and ``params``."""
    classes = settings.classes
    labels = h5["label"][:n]
    counts = np.bincount(labels[labels >= 0], minlength=len(classes))
    a = h5.attrs
    a["format_version"], a["patch_size"], a["split"] = (
        FORMAT_VERSION,
        settings.patch_size,
        settings.split,
    )
    a["classes"], a["seed"] = json.dumps(classes), settings.seed
    a["params"] = json.dumps(settings.params or {})
    a["n_committed"], a["completed_slides"] = n, json.dumps(sorted(set(completed)))
    a["class_counts"] = json.dumps(
        {c: int(k) for c, k in zip(classes, counts[: len(classes)], strict=True)}
    )
    a["damaged_regions"] = json.dumps(damaged, sort_keys=True)


def _write(h5: Any, n: int, block: list[tuple[Any, ...]], slide_key: str, patient: str) -> int:
    if not block:
        return n
    m = n + len(block)
    for name in ("images", *_STRINGS, *COLUMNS):
        h5[name].resize(m, axis=0)
    h5["images"][n:m] = np.stack([b[0] for b in block])
    h5["slide"][n:m] = [slide_key] * len(block)
    h5["patient"][n:m] = [b[5] if len(b) > 5 else patient for b in block]
    for j, name in enumerate(("label", "x", "y", "mpp"), start=1):
        h5[name][n:m] = [b[j] for b in block]
    block.clear()
    return m


def _append(out: Any, src: Any, n: int) -> int:
    """Append the committed rows of ``src`` to ``out`` (from row ``n``); returns the new count."""
    k = int(src.attrs["n_committed"])
    m = n + k
    for name in ("images", *_STRINGS, *COLUMNS):
        out[name].resize(m, axis=0)
    for name in (*_STRINGS, *COLUMNS):
        out[name][n:m] = src[name][:k]
    dst, img = out["images"], src["images"]
    same = (img.compression, img.compression_opts, img.chunks) == (
        dst.compression,
        dst.compression_opts,
        dst.chunks,
    )
    if same and img.chunks[0] == 1:  # compressed bytes copied as they are
        for i in range(k):
            mask, data = img.id.read_direct_chunk((i, 0, 0, 0))
            dst.id.write_direct_chunk((n + i, 0, 0, 0), data, mask)
    else:
        for i in range(0, k, 256):
            dst[n + i : n + min(k, i + 256)] = img[i : min(k, i + 256)]
    return m


def _shard_key(path: Path, classes: list[str], patch_size: int) -> str | None:
    """The slide a shard holds; None (it is redone) if unreadable or of other classes/size."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            key = str(h5.attrs["shard_key"])
            same = json.loads(h5.attrs["classes"]) == classes
            same = same and int(h5.attrs["patch_size"]) == patch_size
    except Exception as exc:  # noqa: BLE001 - renamed into place whole, so only disk damage
        log.warning("ignoring unreadable shard %s (%s); its slide is redone", path, exc)
        return None
    if not same:
        log.warning("ignoring %s, left by a run with other classes or patch size", path)
        return None
    return key


def _temporaries(path: Path) -> list[Path]:
    parts = path.with_name(path.name + ".parts")
    found = list(path.parent.glob(glob.escape(f".{path.name}.") + "*.tmp"))
    return found + (list(parts.glob(".*.tmp")) if parts.is_dir() else [])


def _free_name(path: Path) -> Path:
    candidate, i = path, 1
    while candidate.exists():
        i += 1
        candidate = path.with_name(f"{path.name}{i}")
    return candidate


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
