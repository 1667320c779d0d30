"""Every hint names a flag the command that prints it has, and a cohort column that exists
(issue #22 item 3). The hint strings are collected from the source (every string that is not a
docstring), so a new hint is checked without being listed here; a library module with hints must
say, in ``PRINTED_BY``, which commands can print them."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

from slidestream.cli import build_parser
from slidestream.sampling.cohort import _COLUMNS

SRC = Path(__file__).resolve().parents[1] / "src" / "slidestream"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")
TOKEN = re.compile(
    r"(?P<flag>(?<![\w-])--[a-z][a-z0-9-]+)|\b(?P<program>slidestream|vips|huggingface-cli)\s+(?P<word>[a-z][a-z-]*)"
    r"|(?P<end>[.;]\s|\))"
)
COLUMN = re.compile(r"\b(?:an?|the)\s+'?([a-z_]+)'?\s+column\b")

# library module -> the commands whose run can print its hints (errors, warnings, messages)
PRINTED_BY = {
    "io/base.py": ("patches-preview", "patches", "prepare", "features", "predict"),
    "io/image.py": ("info", "tissue", "patches-preview", "patches", "prepare", "features"),
    "sampling/cohort.py": ("patches-preview", "patches", "prepare", "features", "predict"),
    "tissue/__init__.py": ("tissue", "patches-preview", "patches", "prepare", "features"),
    "data/database.py": ("patches",),
    "data/hdf5_writer.py": ("patches",),
    "train/patches.py": ("train-patches",),
    "train/tuning.py": ("train",),
    "train/loop.py": ("train", "train-patches", "train-mil"),
    "train/runlog.py": ("train", "train-patches", "train-mil"),
    "train/mil.py": ("train-mil",),
    "infer/features.py": ("features",),
    "infer/mil.py": ("predict",),
    "infer/predict.py": ("predict",),
    "infer/saliency.py": ("predict",),
    "data/features.py": ("features",),
    "data/hdf5_merge.py": ("patches",),
    "data/stain.py": ("patches", "features", "predict"),
    "infer/cohort.py": ("predict",),
    "infer/engine.py": ("predict",),
    "infer/writer.py": ("predict",),
    "models/encoders.py": ("features",),
    "models/mil.py": ("features",),
    "sampling/shards.py": ("tissue", "patches", "prepare", "features", "predict"),
    "demo.py": ("demo",),
}


@functools.cache
def _flags_of_commands() -> dict[str, set[str]]:
    sub = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    return {n: {o for a in p._actions for o in a.option_strings} for n, p in sub.items()}


def _strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string of a module but its docstrings; an f-string is one text."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            docs.add(id(body[0].value))
    docs |= {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    out = []
    for node in ast.walk(tree):
        if id(node) in docs:  # docstrings, and the pieces of f-strings (seen whole)
            continue
        if isinstance(node, ast.JoinedStr):
            parts = [v.value if isinstance(v, ast.Constant) else "{}" for v in node.values]
            out.append((node.lineno, "".join(map(str, parts))))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))
    return out


def _mentions(text: str, printers: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """(flag, command or None for another program's flag) for each flag in ``text``: a flag
    after "slidestream CMD" (or "vips ...", "huggingface-cli ...") in the same clause is that program's, any other
    flag is each printer's. A clause ends at ". ", "; " or ")"."""
    commands = _flags_of_commands()
    owners: tuple[str | None, ...] = printers
    out = []
    for m in TOKEN.finditer(text):
        flag, program, word = m.group("flag"), m.group("program"), m.group("word")
        if flag:
            out += [(flag, owner) for owner in owners]
        elif program in ("vips", "huggingface-cli"):
            owners = (None,)
        elif program:
            owners = (word,) if word in commands else owners
        else:
            owners = printers
    return out


def _hint_sites() -> list[tuple[str, int, str, str | None]]:
    sites = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("cli/"):
            if path.stem in ("__init__", "_common"):
                continue
            printers: tuple[str, ...] = (path.stem.replace("_", "-"),)
        else:
            printers = PRINTED_BY.get(rel, ("?",))  # "?": a hint nobody said who prints
        for line, text in _strings(path):
            sites += [(rel, line, flag, command) for flag, command in _mentions(text, printers)]
    return sites


def _wrong_flags(flags: dict[str, set[str]]) -> list[str]:
    wrong = []
    for rel, line, flag, command in _hint_sites():
        if command == "?":
            wrong.append(f"{rel}:{line} names {flag}: add {rel} to PRINTED_BY")
        elif command is not None and flag not in flags[command]:
            wrong.append(f"{rel}:{line}: `slidestream {command}` has no {flag}")
    return wrong


def test_every_flag_in_a_hint_exists_on_the_command_that_prints_it():
    wrong = _wrong_flags(_flags_of_commands())
    assert not wrong, "\n".join(wrong)


def test_every_column_in_a_hint_is_a_cohort_column():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        for line, text in _strings(path):
            wrong += [f"{path.name}:{line}: {c}" for c in COLUMN.findall(text) if c not in _COLUMNS]
    assert not wrong, wrong


@pytest.mark.parametrize(
    ("text", "printers", "expected"),
    [
        ("lower --threshold", ("predict",), [("--threshold", "predict")]),
        ("rebuild with slidestream patches --min-tissue", ("x",), [("--min-tissue", "patches")]),
        (
            "(see slidestream tissue) or lower --threshold",
            ("predict",),
            [("--threshold", "predict")],
        ),
        ("convert it (vips tiffsave --tile)", ("info",), [("--tile", None)]),
        (
            "--aa then slidestream train --bb",
            ("p", "q"),
            [("--aa", "p"), ("--aa", "q"), ("--bb", "train")],
        ),
    ],
)
def test_mentions_are_attributed_to_the_program_named_before_them(text, printers, expected):
    assert _mentions(text, printers) == expected


def test_the_checker_bites():
    """The bug it was written for: features without --slide-mpp, told to pass --slide-mpp."""
    flags = {k: set(v) for k, v in _flags_of_commands().items()}
    flags["features"].discard("--slide-mpp")
    wrong = _wrong_flags(flags)
    assert any(w.startswith("io/base.py:") and "features` has no --slide-mpp" in w for w in wrong)


def test_features_takes_the_slide_mpp_it_advises(slides, tmp_path, capsys):
    """features on a slide without mpp names --slide-mpp, and --slide-mpp then works."""
    from slidestream.cli import main

    args = ["features", str(slides["nompp"]), "--encoder", "mean_rgb", "--mpp", "2"]
    args += ["--size", "32", "--workers", "0", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "nompp.tiff" in err and "--slide-mpp" in err
    assert main([*args, "--out", str(tmp_path / "b"), "--slide-mpp", "0.5"]) == 0
    assert (tmp_path / "b" / "nompp.h5").is_file()
