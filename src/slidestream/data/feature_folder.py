"""Which feature file in a folder belongs to which slide, and whether a folder's files fit together.

``slidestream features`` names each file after its slide's stem, ``<stem>.h5``, and where two
slides of the cohort share a stem (``case1/HE.svs``, ``case2/HE.svs``) after the stem and 8 hex
digits of a hash of the resolved path, ``HE-1f3a09bc.h5``: the rule of
:func:`~slidestream.sampling.naming.output_stems` that ``prepare`` and ``predict`` use. Each
file's ``source`` attribute holds the resolved slide path (older files: ``slide``), and
``index.<i>of<n>.csv`` in the folder maps every slide of a shard to its file.

:meth:`FeatureFolder.find` maps a slide back to its file: the hashed name of its path, else a
``<stem>.h5`` / ``<stem>-<hash>.h5`` whose recorded source is this slide. A file whose source
is another slide that exists here is never used; one whose source is absent here (slides moved,
or extracted on another machine) is used when it is the best match of the path's trailing folders.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slidestream.errors import ConfigError
from slidestream.sampling.naming import path_hash

__all__ = ["SETTINGS", "FeatureFolder", "check_settings", "settings_of", "source_of"]

log = logging.getLogger(__name__)

SETTINGS = ("encoder", "weights_hash", "mpp", "size", "dim")
_HASHED = re.compile(r"(.+)-[0-9a-f]{8}")


def source_of(attrs: dict[str, Any]) -> Path | None:
    """The resolved slide path a feature file records (``source``, else ``slide``), or None."""
    value = attrs.get("source") or attrs.get("slide")
    return Path(str(value)).resolve() if value else None


def _relative_source(attrs: dict[str, Any] | None, folder: Path) -> Path | None:
    """The slide a file's ``source_rel`` names, seen from ``folder`` now (None: not recorded)."""
    rel = (attrs or {}).get("source_rel")
    return (folder / str(rel)).resolve() if rel else None


def _read_attrs(path: Path) -> dict[str, Any] | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return dict(f.attrs)
    except OSError:
        return None


def _shared_tail(a: Path, b: Path) -> int:
    """How many trailing path parts ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(reversed(a.parts), reversed(b.parts), strict=False):
        if x != y:
            break
        n += 1
    return n


class FeatureFolder:
    """The ``*.h5`` feature files of one folder, listed once (cheap lookups for 10,000 slides)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        names = os.listdir(self.folder) if self.folder.is_dir() else []
        self.stems = {n[:-3] for n in names if n.endswith(".h5") and not n.startswith(".")}
        self.hashed: dict[str, list[str]] = {}
        for stem in sorted(self.stems):
            m = _HASHED.fullmatch(stem)
            if m:
                self.hashed.setdefault(m.group(1), []).append(stem)

    def add(self, path: Path) -> None:
        """Record a file written into the folder since it was listed."""
        self.stems.add(path.stem)
        m = _HASHED.fullmatch(path.stem)
        if m and path.stem not in self.hashed.setdefault(m.group(1), []):
            self.hashed[m.group(1)].append(path.stem)

    def find(self, slide: str | os.PathLike[str]) -> tuple[Path | None, str]:
        """(the feature file of ``slide``, "") or (None, why none fits: one line naming the
        folder's file and the fix)."""
        slide = Path(slide)
        stem, here = slide.stem, slide.resolve()
        exact = f"{stem}-{path_hash(slide)}"
        if exact in self.stems:
            return self.folder / f"{exact}.h5", ""
        names = ([stem] if stem in self.stems else []) + self.hashed.get(stem, [])
        if not names:
            return None, f"no feature file {self.folder / stem}.h5; run slidestream features"
        moved: list[tuple[int, Path, Path]] = []
        for name in names:
            path = self.folder / f"{name}.h5"
            attrs = _read_attrs(path)
            source = source_of(attrs) if attrs is not None else None
            if attrs is None and name == stem:
                return path, ""  # unreadable: reading it names the damage
            if source == here or _relative_source(attrs, self.folder) == here:
                return path, ""  # its slide, or the same layout copied or moved with it
            if source is not None and source.name == slide.name and not source.exists():
                moved.append((_shared_tail(source, here), path, source))
        moved.sort(key=lambda m: -m[0])
        if moved and (len(moved) == 1 or moved[0][0] > moved[1][0]):
            log.info("%s: using %s, made from %s (not found here)", slide, *moved[0][1:])
            return moved[0][1], ""
        if len(moved) > 1:
            both = " and ".join(m[1].name for m in moved[:2])
            return None, (
                f"{both} in {self.folder} could both be the features of {slide} (made from moved "
                "slides); re-run slidestream features on this cohort"
            )
        first = self.folder / f"{names[0]}.h5"
        theirs = source_of(_read_attrs(first) or {})
        return None, (
            f"{first} holds the features of {theirs}, not {slide}; run slidestream features "
            "on a cohort with this slide"
        )


def settings_of(attrs: dict[str, Any], dim: int | None) -> dict[str, Any]:
    """The settings that make two feature files comparable (:data:`SETTINGS`; None where
    unknown, e.g. ``dim`` of an empty file)."""
    out = {k: attrs.get(k) for k in SETTINGS if k != "dim"}
    out["mpp"] = float(out["mpp"]) if out["mpp"] is not None else None
    out["size"] = int(out["size"]) if out["size"] is not None else None
    return {**out, "dim": int(dim) if dim is not None else None}


def _differs(mine: dict[str, Any], ref: dict[str, Any]) -> str:
    """What differs between two settings, ignoring those unknown on either side."""
    return ", ".join(
        f"{k} {mine[k]} (not {ref[k]})"
        for k in SETTINGS
        if mine.get(k) is not None and ref.get(k) is not None and mine[k] != ref[k]
    )


def check_settings(
    files: Sequence[Path],
    settings: Sequence[dict[str, Any]],
    reference: dict[str, Any] | None = None,
    against: str = "other feature files",
) -> dict[str, Any] | None:
    """The settings every file shares (those of most files when ``reference`` is None);
    ``against`` names what the reference is in the error.

    Raises:
        ConfigError: a file differs (encoder, weights hash, mpp, patch size or feature
            dimension): one line naming it, what differs and how many other files do.
    """
    if not files:
        return reference
    if reference is None:
        counts = Counter(tuple(s.items()) for s in settings)
        reference = dict(counts.most_common(1)[0][0])
    odd = [(f, s) for f, s in zip(files, settings, strict=True) if _differs(s, reference)]
    if odd:
        path, mine = odd[0]
        more = f" (and {len(odd) - 1} more files)" if len(odd) > 1 else ""
        raise ConfigError(
            f"{path} was made with {_differs(mine, reference)}{more}, unlike the {against}; "
            "put features of one encoder and patch setting in one folder (re-run slidestream "
            "features with the same settings, or move the file out)"
        )
    return reference
