"""slidestream check-streaming: output and exit codes."""

from __future__ import annotations

import json

import pytest
import torch

from slidestream.cli import main
from slidestream.streaming import check

torch.set_num_threads(1)
ARGS = ["check-streaming", "--model", "resnet18", "--stream-until", "layer1", "--size", "71", "53"]


def test_passes_and_prints_groups(capsys):
    assert main([*ARGS, "--tile", "16"]) == 0
    out = capsys.readouterr().out
    assert "layer1.weight" in out and "bn1.bias" in out and "input_grad" in out
    assert "OK: max relative error" in out


def test_json_and_exit_1_when_error_exceeds_tolerance(capsys, monkeypatch):
    monkeypatch.setitem(check.TOLERANCES, torch.float64, 0.0)
    # A tolerance of 0 is exceeded by rounding alone, so the check must report failure.
    assert main([*ARGS, "--tile", "16", "--json", "--batch", "1"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and result["max_rel_err"] > 0
    assert result["model"] == "resnet18" and result["batch"] == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tile", "30"], "tile_size must be a multiple of 4, got 30"),
        (["--tile", "16", "--batch", "0"], "must be positive"),
    ],
)
def test_user_errors_are_one_line(capsys, extra, message):
    assert main([*ARGS, *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_float32_puts_ordinary_backprop_beside_streaming(capsys, monkeypatch):
    assert main([*ARGS, "--tile", "16", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "float32 backprop" in out and "no worse than ordinary float32" in out
    assert main([*ARGS, "--tile", "16", "--dtype", "float32", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["reference"] == "float64" and r["ok"] is True
    assert 0 < r["conventional_max_rel_err"] < 1e-4 and 0 < r["max_rel_err"] <= r["tolerance"]
    assert r["tolerance"] == max(2 * r["conventional_max_rel_err"], 4 * 2**-23)
    assert "conventional_max_rel" in r["groups"]["layer1.weight"]
    # streaming must be no worse than ordinary float32: with no slack allowed it fails
    monkeypatch.setattr(check, "NO_WORSE", 0.0)
    assert main([*ARGS, "--tile", "16", "--dtype", "float32", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
