"""Shards of a cohort: which slides shard ``i/n`` does, where it writes, and how shards merge.

Shard ``i/n`` does the slides at positions ``i, i + n, i + 2n, ...`` of the cohort (every n-th
slide from i), so ``n`` shards together do every slide exactly once. The shard comes from
``--shard i/n`` (cluster array jobs) or, when none is given, from the torchrun variables
``RANK``/``WORLD_SIZE`` (0/1 when unset). A shard writes its summary next to the unsharded one
with ``.shard-i-of-n`` before the suffix (``tissue.csv`` → ``tissue.shard-0-of-4.csv``); the merge
step finds all ``n`` of them, refuses when one is missing, and combines them in cohort order.
"""

from __future__ import annotations

import csv
import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from slidestream.errors import ConfigError

__all__ = ["parse_shard", "read_shard_tables", "shard_files", "shard_items", "shard_path"]

T = TypeVar("T")


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 <= i < n; None → this torchrun rank (RANK/WORLD_SIZE) or 0/1.

    Raises ConfigError for anything else (``"4/4"``, ``"a/b"``)."""
    if text is None:
        i, n = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if not 0 <= i < n:
            raise ConfigError(f"RANK must be in [0, WORLD_SIZE), got RANK={i} WORLD_SIZE={n}")
        return i, n
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ConfigError(f"--shard must be i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return i, n


def shard_items(items: Sequence[T], shard: tuple[int, int]) -> list[T]:
    """The items of shard ``(i, n)``: positions ``i, i + n, ...``; all of them for ``(0, 1)``."""
    i, n = shard
    return list(items[i::n])


def shard_path(path: str | os.PathLike[str], shard: tuple[int, int]) -> Path:
    """Where shard ``(i, n)`` writes ``path``: ``DIR/name.shard-i-of-n.ext`` (``path`` itself for
    an unsharded run, ``(0, 1)``)."""
    path = Path(path)
    i, n = shard
    if n == 1:
        return path
    return path.with_name(f"{path.stem}.shard-{i}-of-{n}{path.suffix}")


def shard_files(path: str | os.PathLike[str], suffix: str | None = None) -> list[Path]:
    """The shard files of ``path`` (``name.shard-i-of-n<suffix>``, suffix default ``path``'s),
    ordered by ``i``. Raises ConfigError naming the missing ones, or when files of two shard
    counts lie there (a stale run with another ``n``)."""
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    prefix = f"{path.stem}.shard-"
    pattern = re.compile(re.escape(prefix) + r"(\d+)-of-(\d+)" + re.escape(suffix) + "$")
    found: dict[int, dict[int, Path]] = {}
    for p in path.parent.glob(glob.escape(prefix) + "*"):
        m = pattern.match(p.name)
        if m:
            found.setdefault(int(m[2]), {})[int(m[1])] = p
    if not found:
        raise ConfigError(
            f"no shard files {prefix}I-of-N{suffix} in {path.parent}; run the sharded commands "
            f"(--shard I/N) first"
        )
    if len(found) > 1:
        raise ConfigError(
            f"shard files of {len(found)} different shard counts ({sorted(found)}) for {path}; "
            f"remove those of the stale run"
        )
    ((n, files),) = found.items()
    missing = [f"{prefix}{i}-of-{n}{suffix}" for i in range(n) if i not in files]
    if missing:
        raise ConfigError(
            f"cannot merge {path.name}: {len(missing)} of {n} shards missing "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); run them first"
        )
    return [files[i] for i in range(n)]


def read_shard_tables(path: str | os.PathLike[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of all shard CSVs of ``path`` (see :func:`shard_files`), shard by shard.

    Raises ConfigError when the shards' columns differ."""
    columns: list[str] | None = None
    rows: list[dict[str, Any]] = []
    for p in shard_files(path):
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if columns is not None and reader.fieldnames != columns:
                raise ConfigError(
                    f"{p.name} has other columns than the first shard ({reader.fieldnames} vs "
                    f"{columns}); re-run that shard with the same version"
                )
            columns = list(reader.fieldnames or [])
            rows.extend(reader)
    return columns or [], rows
