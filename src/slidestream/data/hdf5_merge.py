"""Merge the patch databases of cohort shards into one, without copying the patches.

``slidestream patches --shard i/n`` writes ``DB.shard-i-of-n.h5`` (one per split:
``DB.shard-i-of-n.train.h5``, ...). :func:`merge_patch_databases` makes ``DB.h5`` from them: its
``images`` is an HDF5 *virtual dataset* whose rows map, slide by slide, onto the shard files'
``images`` (no patch is copied or re-compressed; the merge takes seconds whatever the database
size), the small columns (``label``, ``slide``, ``patient``, ``x``, ``y``, ``mpp``) are copied, and
the attributes are recomputed. Rows come in the order an unsharded run writes them when the
slide order is given. The shard files must stay next to ``DB.h5`` (the mapping is relative to its
folder, so the folder can move as a whole); :class:`~slidestream.data.hdf5.PatchDatabase` refuses
a merged database whose shard files are gone, naming them. ``DB.h5.attrs["merged_shards"]``
lists them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidestream.data.hdf5_writer import COLUMNS, _fsync, set_attrs
from slidestream.errors import ConfigError
from slidestream.parallel import exclusive_lock

__all__ = ["merge_patch_databases", "missing_sources"]

_SMALL = ("slide", "patient", *COLUMNS)


@dataclass
class _Shard:
    path: Path
    n: int
    attrs: dict[str, Any]
    columns: dict[str, np.ndarray]
    runs: dict[str, tuple[int, int]]  # slide -> [start, stop) rows


def merge_patch_databases(
    shards: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    order: Sequence[str] | None = None,
) -> int:
    """Write ``out`` as the union of the shard databases ``shards``; returns its patch count.

    ``order`` lists slide keys in the order of an unsharded run (slides not in it follow, shard
    by shard). Raises ConfigError when the shards were built with other settings than each
    other, one is unfinished or unreadable, a slide is in two shards, or ``out`` exists and is
    not a merged database (it would be lost)."""
    out = Path(out)
    with exclusive_lock(out, "slidestream patches --merge"):
        parts = [_read_shard(Path(p)) for p in shards]
        _check_same(parts)
        _check_target(out)
        plan = _plan(parts, order)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            n = _write(tmp, out.parent, parts, plan)
            _fsync(tmp)
            os.replace(tmp, out)
            _fsync(out.parent)
        finally:
            tmp.unlink(missing_ok=True)
    return n


def missing_sources(h5: Any) -> list[str]:
    """Shard files that the virtual ``images`` of an open merged database maps to and that are
    not there (relative to its folder); empty for an ordinary database."""
    images = h5["images"]
    if not images.is_virtual:
        return []
    folder = Path(h5.filename).parent
    names = {s.file_name for s in images.virtual_sources()}
    return sorted(n for n in names if not (folder / n).is_file())


def _read_shard(path: Path) -> _Shard:
    import h5py

    if path.with_name(path.name + ".parts").is_dir():
        raise ConfigError(f"shard {path} was interrupted ({path.name}.parts); re-run that shard")
    try:
        with h5py.File(path, "r") as h5:
            n = int(h5.attrs["n_committed"])
            attrs = {k: h5.attrs[k] for k in h5.attrs}
            columns = {k: h5[k][:n] for k in _SMALL}
            shape = h5["images"].shape
    except (OSError, KeyError) as exc:
        raise ConfigError(f"cannot read shard database {path}: {exc}; re-run that shard") from None
    runs: dict[str, tuple[int, int]] = {}
    slides = columns["slide"]
    edges = np.flatnonzero(slides[1:] != slides[:-1]) + 1 if n else np.array([], int)
    for a, b in zip(np.r_[0, edges], np.r_[edges, n], strict=True):
        if b > a:
            runs[slides[a].decode()] = (int(a), int(b))
    attrs["_images_rows"] = shape[0]
    return _Shard(path, n, attrs, columns, runs)


def _check_same(parts: list[_Shard]) -> None:
    if not parts:
        raise ConfigError("no shard databases to merge")
    first = parts[0]
    for p in parts[1:]:
        for key in ("classes", "patch_size", "params", "seed", "split"):
            if str(p.attrs[key]) != str(first.attrs[key]):
                raise ConfigError(
                    f"{p.path.name} was built with another {key} than {first.path.name} "
                    f"({p.attrs[key]} vs {first.attrs[key]}); re-run the shards with the same "
                    f"options"
                )
    seen: dict[str, Path] = {}
    for p in parts:
        for slide in json.loads(p.attrs["completed_slides"]):
            if slide in seen:
                raise ConfigError(
                    f"{slide} is in two shards ({seen[slide].name}, {p.path.name}); give every "
                    f"shard the same COHORT and N"
                )
            seen[slide] = p.path


def _check_target(out: Path) -> None:
    import h5py

    if not out.exists():
        return
    try:
        with h5py.File(out, "r") as h5:
            merged = "merged_shards" in h5.attrs
    except OSError:
        merged = False
    if not merged:
        raise ConfigError(
            f"{out} exists and is not a merge of shards; remove it or merge into another --out"
        )


def _plan(parts: list[_Shard], order: Sequence[str] | None) -> list[tuple[int, int, int]]:
    """(shard index, start, stop) row runs in output order."""
    where = {slide: (k, *run) for k, p in enumerate(parts) for slide, run in p.runs.items()}
    plan = [where.pop(s) for s in (order or ()) if s in where]
    rest = sorted(where.values())  # not in ``order``: shard by shard, in their row order
    return plan + rest


def _write(tmp: Path, folder: Path, parts: list[_Shard], plan: list[tuple[int, int, int]]) -> int:
    import h5py

    first = parts[0].attrs
    size = int(first["patch_size"])
    n = sum(b - a for _, a, b in plan)
    with h5py.File(tmp, "w") as h5:
        if n:
            layout = h5py.VirtualLayout((n, size, size, 3), np.uint8)
            sources = [
                h5py.VirtualSource(
                    "./" + os.path.relpath(p.path, folder),
                    "images",
                    shape=(p.attrs["_images_rows"], size, size, 3),
                    dtype=np.uint8,
                )
                for p in parts
            ]
            row = 0
            for k, a, b in plan:
                layout[row : row + b - a] = sources[k][a:b]
                row += b - a
            h5.create_virtual_dataset("images", layout)
        else:
            h5.create_dataset("images", (0, size, size, 3), np.uint8, maxshape=(None,) * 4)
        for name in _SMALL:
            values = [parts[k].columns[name][a:b] for k, a, b in plan]
            data = np.concatenate(values) if values else np.zeros(0, COLUMNS.get(name, object))
            dtype = h5py.string_dtype() if name in ("slide", "patient") else COLUMNS[name]
            h5.create_dataset(name, data=data, dtype=dtype, maxshape=(None,))
        completed, damaged = [], {}
        for p in parts:
            completed += json.loads(p.attrs["completed_slides"])
            damaged.update(json.loads(p.attrs.get("damaged_regions", "{}")))
        settings = _Settings(
            size,
            str(first["split"]),
            json.loads(first["classes"]),
            int(first["seed"]),
            json.loads(first["params"]),
        )
        set_attrs(h5, n, completed, damaged, settings)
        h5.attrs["merged_shards"] = json.dumps([os.path.relpath(p.path, folder) for p in parts])
    return n


@dataclass
class _Settings:
    patch_size: int
    split: str
    classes: list[str]
    seed: int
    params: dict[str, Any] | None
