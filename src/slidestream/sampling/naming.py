"""Output names for slides: unique within a run, stable across re-runs.

Commands that write one file per slide (``prepare``, ``predict``, ``patches-preview``, ``tissue``)
name outputs after the slide. ``case1/HE.svs`` and ``case2/HE.svs`` share the stem ``HE``, so a
plain stem would make the second overwrite the first. :func:`output_stems` keeps the plain stem
when no other slide of the run has it (compared case-insensitively, as macOS and Windows file
systems do) and otherwise appends 8 hex digits of a hash of the resolved path: ``HE-1f3a09bc``.
The hash depends only on the path, so a re-run over the same slides gives the same names (and
resumes); every command also records each output's source path in its CSV/JSON.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence

from slidestream.io.remote import as_slide_path

__all__ = ["output_stems", "path_hash"]


def path_hash(path: str | os.PathLike[str], n: int = 8) -> str:
    """``n`` hex digits identifying the resolved ``path`` (stable across runs and machines
    for the same absolute path)."""
    key = str(as_slide_path(path).resolve())  # a URL is its own key
    return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:n]


def output_stems(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """One output stem per path, in order: the file's stem where it is unique among ``paths``,
    ``<stem>-<hash of the resolved path>`` where two or more different paths share it."""
    paths = [as_slide_path(p) for p in paths]
    stems = [p.stem for p in paths]
    distinct = {s.casefold(): set() for s in stems}
    for p, s in zip(paths, stems, strict=True):
        distinct[s.casefold()].add(p.resolve())
    clash = Counter({k: len(v) for k, v in distinct.items()})
    return [
        f"{s}-{path_hash(p)}" if clash[s.casefold()] > 1 else s
        for p, s in zip(paths, stems, strict=True)
    ]
