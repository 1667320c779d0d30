"""Cohorts: which slides, with which label, patient, mpp and split.

A cohort comes from a CSV/TSV with a ``slide`` column (path, relative to the CSV's folder) and
optional ``label``, ``patient``, ``mpp``, ``split`` and ``annotations`` (GeoJSON path) columns, or
from a list of paths, folders and globs. Rows that point to missing files or carry bad values are
reported with their line number and left out; nothing else stops.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from slidestream.errors import ConfigError
from slidestream.io import SLIDE_SUFFIXES, find_slides
from slidestream.io.base import plausible_mpp

__all__ = ["SlideEntry", "Cohort", "load_cohort"]

log = logging.getLogger(__name__)

_COLUMNS = ("slide", "label", "patient", "mpp", "split", "annotations")


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a cohort; ``line`` is its line in the CSV (header = line 1), if any."""

    path: Path
    label: str | None = None
    patient: str | None = None
    mpp: float | None = None
    split: str | None = None
    annotations: Path | None = None
    line: int | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def patient_id(self) -> str:
        """The patient, or the slide's stem when the cohort names no patient."""
        return self.patient or self.path.stem


@dataclass
class Cohort:
    """Slides that passed the checks, and one message per entry left out."""

    slides: list[SlideEntry]
    problems: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.slides)

    def __iter__(self):
        return iter(self.slides)

    @property
    def classes(self) -> list[str]:
        """Sorted distinct labels (empty when the cohort has none)."""
        return sorted({s.label for s in self.slides if s.label is not None})

    def label_index(self, label: str | None) -> int:
        """Class index of ``label`` (-1 for an unlabelled slide)."""
        return -1 if label is None else self.classes.index(label)

    def split(self, name: str) -> Cohort:
        """The slides whose ``split`` column equals ``name``."""
        return Cohort([s for s in self.slides if s.split == name], [], f"{self.source}[{name}]")

    def without(self, paths: Iterable[Path]) -> Cohort:
        drop = set(paths)
        return replace(self, slides=[s for s in self.slides if s.path not in drop])


def load_cohort(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Cohort,
) -> Cohort:
    """A :class:`Cohort` from a CSV/TSV file, or from paths, folders and globs of slides."""
    if isinstance(source, Cohort):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.suffix.lower() in (".csv", ".tsv", ".txt"):
            return _from_table(path)
        source = [source]
    return _from_paths(source)


def _from_paths(items: Sequence[str | os.PathLike[str]]) -> Cohort:
    slides, problems = [], []
    for p in find_slides(list(items)):
        if not p.is_file():
            problems.append(f"{p}: slide not found")
        else:
            slides.append(SlideEntry(p))
    if not slides and not problems:
        problems.append(f"no slides ({', '.join(sorted(SLIDE_SUFFIXES))}) in {list(items)}")
    names = [str(i) for i in items]
    source = ", ".join(names) if len(names) <= 3 else f"{len(names)} paths ({names[0]}, ...)"
    return _finish(Cohort(slides, problems, source))


def _from_table(path: Path) -> Cohort:
    if not path.is_file():
        raise ConfigError(f"cohort file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in text.splitlines()[0] else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if "slide" not in header:
        raise ConfigError(
            f"{path} has no 'slide' column (columns: {header}); the first line must "
            f"name the columns, e.g. slide,label,patient"
        )
    slides, problems = [], []
    for line, raw in enumerate(reader, start=2):
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
        entry, problem = _entry(row, line, path)
        if problem:
            problems.append(f"{path.name} line {line}: {problem}")
        elif entry is not None:
            slides.append(entry)
    return _finish(Cohort(slides, problems, str(path)))


def _entry(row: dict[str, str], line: int, csv_path: Path) -> tuple[SlideEntry | None, str]:
    if not row.get("slide"):
        return None, "empty 'slide' value" if any(row.values()) else ""
    slide = _resolve(row["slide"], csv_path)
    if not slide.is_file():
        return None, f"slide not found: {slide}"
    mpp = None
    if row.get("mpp"):
        mpp = plausible_mpp(row["mpp"])
        if mpp is None:
            return None, f"mpp must be a number of µm per pixel in (0.01, 100), got {row['mpp']!r}"
    ann = _resolve(row["annotations"], csv_path) if row.get("annotations") else None
    if ann is not None and not ann.is_file():
        return None, f"annotations file not found: {ann}"
    return SlideEntry(
        slide,
        row.get("label") or None,
        row.get("patient") or None,
        mpp,
        row.get("split") or None,
        ann,
        line,
    ), ""


def _resolve(value: str, csv_path: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (csv_path.parent / p)


def _finish(cohort: Cohort) -> Cohort:
    seen: set[Path] = set()
    unique = []
    for s in cohort.slides:
        key = s.path.resolve()
        if key in seen:
            cohort.problems.append(f"{s.path}: listed twice; the later entry is ignored")
            continue
        seen.add(key)
        unique.append(s)
    cohort.slides = unique
    for problem in cohort.problems:
        log.warning("cohort %s: %s (left out)", cohort.source, problem)
    return cohort
