from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from slidestream.cli import _COMMANDS, build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "slidestream" in capsys.readouterr().out


@pytest.mark.parametrize("command", [c.replace("_", "-") for c in _COMMANDS])
def test_help_on_every_subcommand(command, capsys):
    parser = build_parser()
    names = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    if command not in names:
        pytest.skip(f"{command} not in this build")
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "slidestream", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("slidestream ")


def test_info_json(slides, capsys):
    assert main(["info", "--json", str(slides["pyramid"]), str(slides["png"])]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    keys = {
        "path",
        "width",
        "height",
        "level_count",
        "level_dimensions",
        "mpp_x",
        "mpp_y",
        "vendor",
        "backend",
    }
    assert all(set(d) == keys for d in lines)
    assert lines[0]["mpp_x"] == pytest.approx(0.5) and lines[0]["backend"] == "pyvips"
    assert lines[1]["width"] == 800 and lines[1]["mpp_x"] is None  # PNG: mpp unknown


def test_info_png_with_mpp_and_table(slides, capsys):
    assert main(["info", "--json", "--slide-mpp", "0.25", str(slides["png"])]) == 0
    assert json.loads(capsys.readouterr().out)["mpp_x"] == 0.25
    assert main(["info", str(slides["png"])]) == 0
    assert "unknown" in capsys.readouterr().out


def test_info_real_files(shared_data, capsys):
    paths = [shared_data / n for n in ("cmu_small_region.svs", "boxes.tiff", "boxes_0.dcm")]
    assert main(["info", "--json", *map(str, paths)]) == 0
    svs, tiff, dcm = (json.loads(x) for x in capsys.readouterr().out.splitlines())
    assert (svs["width"], svs["height"], svs["vendor"]) == (2220, 2967, "aperio")
    assert svs["mpp_x"] == pytest.approx(0.499)
    assert tiff["level_count"] == 4 and tiff["vendor"] == "generic-tiff"
    assert dcm["vendor"] == "dicom" and dcm["mpp_y"] == pytest.approx(0.499)


def test_info_broken_file_is_one_clear_line(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"\x00" * 1000)
    out = subprocess.run(
        [sys.executable, "-m", "slidestream", "info", str(bad)], capture_output=True, text=True
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.svs" in lines[0] and "Traceback" not in out.stderr


def test_tissue_folder_with_good_and_bad_slides(slides, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copy(slides["pyramid"], cohort / "good.tiff")
    shutil.copy(slides["aperio"], cohort / "good2.svs")
    (cohort / "bad.svs").write_bytes(b"not a slide")
    out = tmp_path / "out"
    assert main(["tissue", str(cohort), "--out", str(out), "--workers", "2"]) == 1
    for stem in ("good", "good2"):
        for suffix in (".tissue.png", ".tissue.json", ".qc.png"):
            assert (out / f"{stem}{suffix}").exists()
        assert 0.2 < json.loads((out / f"{stem}.tissue.json").read_text())["fraction"] < 0.7
    assert not (out / "bad.tissue.png").exists()
    captured = capsys.readouterr()
    assert "bad.svs" in captured.err and "2 of 3 slides done" in captured.out


def test_synth_command(tmp_path, capsys):
    out = tmp_path / "s.tiff"
    assert main(["synth", str(out), "--size", "600", "400", "--mpp", "1.0", "--tumour"]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out
    assert main(["info", "--json", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["mpp_x"] == pytest.approx(1.0)


def test_patches_preview(slides, tmp_path, capsys):
    out = tmp_path / "preview"
    csv = tmp_path / "c.csv"
    csv.write_text(
        f"slide,label\n{slides['pyramid']},tumour\n{slides['small']},normal\nmissing.tiff,normal\n"
    )
    code = main(
        [
            "patches-preview",
            str(csv),
            "--mpp",
            "1.0",
            "--size",
            "64",
            "--n",
            "12",
            "--out",
            str(out),
        ]
    )
    assert code == 1  # the missing row is reported, the rest is previewed
    assert "line 4" in capsys.readouterr().err
    assert (out / "patches.png").exists() and (out / "pyramid.locations.png").exists()
    rows = (out / "patches.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[0].startswith("slide,x,y,mpp")
    assert (
        main(
            [
                "patches-preview",
                str(slides["small"]),
                "--mpp",
                "1.0",
                "--size",
                "64",
                "--n",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )


def test_every_option_of_every_command_explains_itself():
    """Each option's help says what it means, not only its default (issue #16)."""
    import argparse

    from slidestream.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bare = []
    for name, command in sub.choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = (action.help or "").strip()
            if len(text) < 12 or text.startswith("default:") or text.startswith("(default"):
                bare.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not bare, f"options without a meaning: {bare}"


def test_empty_input_is_one_line_exit_1_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    for args in (
        ["patches", str(empty), "--out", str(out / "e.h5"), "--mpp", "1", "--grid", "64"],
        ["prepare", str(empty), "--mpp", "4", "--out", str(out / "prep")],
        ["patches-preview", str(empty), "--mpp", "1", "--size", "64", "--out", str(out / "pv")],
        ["tissue", str(tmp_path / "nope.svs"), "--out", str(out / "t")],
    ):
        assert main(args) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no slides" in err[0], (args, err)
        assert not out.exists(), args


def test_patches_flags_an_unlabelled_database(slides, tmp_path, capsys):
    code = main(["patches", str(slides["pyramid"]), "--out", str(tmp_path / "u.h5"),
                 "--mpp", "2", "--size", "64", "--grid", "64"])  # fmt: skip
    assert code == 0
    assert "the slides have no labels" in capsys.readouterr().err
