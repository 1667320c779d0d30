"""Cohorts: which slides, with which label, patient, mpp and split.

A cohort comes from a CSV/TSV with a ``slide`` column (path, relative to the CSV's folder, or an
``s3://``, ``gs://`` or ``http(s)://`` URL, kept as given and checked only when opened) and
optional ``label``, ``patient``, ``mpp``, ``split`` and ``annotations`` (GeoJSON path) columns, or
from a list of paths, folders and globs. Rows that point to missing files or carry bad values are
reported with their line number and left out; nothing else stops.

Line numbers are physical lines of the file (header = line 1; blank lines and line breaks inside
quoted values count). The file should be UTF-8 (a BOM, CRLF line ends and UTF-16 with a BOM are
accepted); a line with bytes that are not UTF-8 is reported and left out, the rest is read. Values
are stripped of surrounding spaces. Labels that differ only in case (``Normal`` and ``normal``)
stay distinct classes, but each such pair is reported as a warning naming both spellings and
their lines, since it is almost always a typo.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from slidestream.errors import ConfigError, MissingMppError
from slidestream.io import SLIDE_SUFFIXES, find_slides
from slidestream.io.base import plausible_mpp
from slidestream.io.remote import RemotePath, is_url

__all__ = ["SlideEntry", "Cohort", "failure_message", "load_cohort"]

log = logging.getLogger(__name__)

_COLUMNS = ("slide", "label", "patient", "mpp", "split", "annotations")


@dataclass(frozen=True, slots=True)
class SlideEntry:
    """One slide of a cohort; ``line`` is its line in the CSV (header = line 1), if any.

    A compact record (``__slots__``, no per-row dict): about 0.5 kB a row with its path, so a
    cohort of 10,000 slides holds a few MB."""

    path: Path  # or a RemotePath (s3://, gs://, http(s):// URL, kept as given)
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
    warnings: list[str] = field(default_factory=list)  # kept in, but probably a mistake

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

    def with_slide_mpp(self, mpp: float | None) -> Cohort:
        """Every slide without an ``mpp`` in the cohort gets ``mpp`` (µm per level-0 pixel,
        overriding the file's); a slide's own ``mpp`` column value wins."""
        if mpp is None:
            return self
        return replace(self, slides=[replace(s, mpp=s.mpp or mpp) for s in self.slides])

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
        if not is_url(p) and not p.is_file():
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
    text, problems = _decode(path)
    records = _records(text, path)
    if not records:
        raise ConfigError(
            f"{path} is empty; the first line must name the columns, e.g. slide,label"
        )
    header_line, cells = records[0]
    header = [h.strip().lower() for h in cells]
    if "slide" not in header:
        raise ConfigError(
            f"{path} has no 'slide' column (columns: {header}, line {header_line}); the first "
            f"line must name the columns, e.g. slide,label,patient"
        )
    slides = []
    for line, values in records[1:]:
        row = {k: v.strip() for k, v in zip(header, values, strict=False) if k}
        entry, problem = _entry(row, line, path)
        if problem:
            problems.append(f"{path.name} line {line}: {problem}")
        elif entry is not None:
            slides.append(entry)
    problems.sort(key=_line_of)
    cohort = Cohort(slides, problems, str(path))
    cohort.warnings += _label_case_warnings(slides, path.name)
    return _finish(cohort)


def _decode(path: Path) -> tuple[str, list[str]]:
    """The file as text, with each line that is not UTF-8 blanked (and reported): line numbers
    stay those of the file."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with BOM ("Unicode text")
        try:
            return raw.decode("utf-16").lstrip("\ufeff"), []
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{path} is not valid UTF-16 ({exc.reason}); save it as UTF-8"
            ) from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    lines, problems = [], []
    for n, line in enumerate(raw.splitlines(keepends=True), start=1):
        body = line.rstrip(b"\r\n")
        try:
            if b"\x00" in body:
                raise UnicodeDecodeError("utf-8", body, body.index(b"\x00"), 0, "NUL byte")
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            lines.append(line[len(body) :].decode("ascii"))
            problems.append(
                f"{path.name} line {n}: byte 0x{body[exc.start]:02x} at column {exc.start + 1} "
                f"is not UTF-8 text; save the file as UTF-8"
            )
    return "".join(lines), problems


def _records(text: str, path: Path) -> list[tuple[int, list[str]]]:
    """Non-blank CSV/TSV records with the physical line each starts on."""
    first = next((ln for ln in io.StringIO(text, newline="") if ln.strip()), "")
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records, end = [], 0
    try:
        for cells in reader:
            start, end = end + 1, reader.line_num
            if any(c.strip() for c in cells):
                records.append((start, cells))
    except csv.Error as exc:
        raise ConfigError(f"{path} line {reader.line_num}: {exc}; fix the quoting there") from None
    return records


def _line_of(problem: str) -> int:
    head = problem.split(": ", 1)[0].rsplit(" line ", 1)[-1]
    return int(head) if head.isdigit() else 0


def _label_case_warnings(slides: list[SlideEntry], name: str) -> list[str]:
    lines: dict[str, dict[str, list[int]]] = {}
    for s in slides:
        if s.label is not None:
            spelled = lines.setdefault(s.label.casefold(), {})
            spelled.setdefault(s.label, []).append(s.line or 0)
    out = []
    for spelled in lines.values():
        if len(spelled) > 1:
            where = " and ".join(
                f"{label!r} (line{'s' if len(ln) > 1 else ''} "
                f"{', '.join(map(str, ln[:3]))}{', ...' if len(ln) > 3 else ''})"
                for label, ln in sorted(spelled.items())
            )
            out.append(
                f"{name}: labels {where} differ only in case and count as different classes; "
                f"spell them the same if they are one class"
            )
    return out


def failure_message(path: str | os.PathLike[str], exc: Exception) -> str:
    """One line for a slide that failed, with the way to give a missing slide mpp."""
    if isinstance(exc, MissingMppError):
        return (
            f"{path}: no microns-per-pixel in the file; give it with --slide-mpp (all slides) "
            f"or an mpp column in the cohort CSV"
        )
    return f"{path}: {' '.join(str(exc).split())}"


def _entry(row: dict[str, str], line: int, csv_path: Path) -> tuple[SlideEntry | None, str]:
    if not row.get("slide"):
        return None, "empty 'slide' value" if any(row.values()) else ""
    slide = _resolve(row["slide"], csv_path)
    if not is_url(slide) and not slide.is_file():  # URLs: checked when opened, not per row
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


def _resolve(value: str, csv_path: Path) -> Any:
    """A path relative to the CSV's folder, or a URL kept as given (a RemotePath)."""
    if is_url(value):
        return RemotePath(value)
    p = Path(value).expanduser()
    return p if p.is_absolute() else (csv_path.parent / p)


def _finish(cohort: Cohort) -> Cohort:
    seen: set[Path] = set()
    unique = []
    for s in cohort.slides:
        # the absolute path, links not followed: links under other names are other rows (a
        # cohort may name one file twice on purpose, e.g. a slide in two studies)
        key = s.path if is_url(s.path) else Path(os.path.abspath(s.path))
        if key in seen:
            cohort.problems.append(f"{s.path}: listed twice; the later entry is ignored")
            continue
        seen.add(key)
        unique.append(s)
    cohort.slides = unique
    for problem in cohort.problems:
        log.warning("cohort %s: %s (left out)", cohort.source, problem)
    for warning in cohort.warnings:
        log.warning("cohort %s", warning)
    return cohort
