"""Cohort files: encodings, physical line numbers, label spellings (issue #18.7)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import h5py
import pytest

from slidestream.errors import ConfigError
from slidestream.sampling import load_cohort
from slidestream.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort_files")
    return [
        write_synthetic_slide(d / f"c{i}.tiff", 400, 300, mpp=1.0, seed=70 + i) for i in range(3)
    ]


def _lines(cohort) -> list[int]:
    return [s.line for s in cohort.slides]


def test_non_utf8_line_is_reported_with_its_number_and_the_rest_is_read(three, tmp_path):
    a, b, c = three
    path = tmp_path / "c.csv"
    path.write_bytes(
        b"slide,label\n"
        + f"{a},normal\n".encode()
        + f"{b},Tum\xf6r\n".encode("latin-1")
        + f"{c},tumour\n".encode()
    )
    cohort = load_cohort(path)
    assert [s.path for s in cohort] == [a, c] and _lines(cohort) == [2, 4]
    (problem,) = cohort.problems
    assert "line 3" in problem and "0xf6" in problem and "UTF-8" in problem


def test_line_numbers_count_blank_lines_and_quoted_newlines(three, tmp_path):
    a, b, c = three
    path = tmp_path / "c.csv"
    path.write_text(
        f'slide,label,patient\n\n{a},normal,p1\n\n\n"{b}",tumour,"two\nlines"\n'
        f"missing.tiff,normal,p3\n{c},normal,p4\n"
    )
    cohort = load_cohort(path)
    assert _lines(cohort) == [3, 6, 9]
    assert cohort.slides[1].patient == "two\nlines"
    (problem,) = cohort.problems
    assert "line 8" in problem and "missing.tiff" in problem


@pytest.mark.parametrize(
    "encode",
    [
        lambda t: t.encode("utf-8-sig"),  # BOM
        lambda t: t.replace("\n", "\r\n").encode(),  # CRLF
        lambda t: t.replace("\n", "\r").encode(),  # old Mac line ends
        lambda t: t.encode("utf-16"),  # Excel "Unicode text" (BOM)
    ],
    ids=["bom", "crlf", "cr", "utf16"],
)
def test_bom_crlf_utf16(three, tmp_path, encode):
    a, b, _ = three
    path = tmp_path / "c.csv"
    path.write_bytes(encode(f"Slide , Label\n{a}, normal \n\nnope.tiff,x\n{b},tumour\n"))
    cohort = load_cohort(path)
    assert [s.label for s in cohort] == ["normal", "tumour"] and _lines(cohort) == [2, 5]
    assert len(cohort.problems) == 1 and "line 4" in cohort.problems[0]


def test_tsv(three, tmp_path):
    a, b, _ = three
    path = tmp_path / "c.tsv"
    path.write_text(f"slide\tlabel\tmpp\n{a}\tnormal\t0.5\n{b}\ttumour,grade 2\t\n")
    cohort = load_cohort(path)
    assert [s.label for s in cohort] == ["normal", "tumour,grade 2"]
    assert cohort.slides[0].mpp == 0.5 and cohort.slides[1].mpp is None


def test_labels_are_stripped_and_case_variants_are_reported(three, tmp_path, caplog):
    a, b, c = three
    path = tmp_path / "c.csv"
    path.write_text(f"slide,label\n{a},Normal \n{b}, normal\n{c},normal\n")
    with caplog.at_level(logging.WARNING):
        cohort = load_cohort(path)
    assert cohort.classes == ["Normal", "normal"]  # kept apart, but reported
    (warning,) = cohort.warnings
    assert "'Normal' (line 2)" in warning and "'normal' (lines 3, 4)" in warning
    assert warning in caplog.text


def test_empty_file_and_missing_header(tmp_path):
    empty = tmp_path / "e.csv"
    empty.write_bytes(b"\n\n")
    with pytest.raises(ConfigError, match="empty"):
        load_cohort(empty)
    bad = tmp_path / "b.csv"
    bad.write_text("path,label\nx.tiff,a\n")
    with pytest.raises(ConfigError, match="no 'slide' column"):
        load_cohort(bad)


def test_patches_cli_names_the_bad_line_and_builds_the_rest(three, tmp_path):
    a, b, c = three
    path = tmp_path / "c.csv"
    path.write_bytes(
        b"slide,label\n\n"
        + f"{a},normal\n".encode()
        + b"\xff\xfe\xfa,tumour\n"
        + f"{c},tumour\n".encode()
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "slidestream",
            "patches",
            str(path),
            "--out",
            str(tmp_path / "db.h5"),
            "--mpp",
            "2",
            "--size",
            "32",
            "--random",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "line 4" in out.stderr and "UTF-8" in out.stderr
    with h5py.File(tmp_path / "db.h5") as h5:
        assert json.loads(h5.attrs["completed_slides"]) == sorted([str(a), str(c)])
