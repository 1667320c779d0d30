from __future__ import annotations

import csv

import pytest
import torch

import slidestream as ss
from slidestream.cli import main
from slidestream.data.database import build_patch_databases
from slidestream.sampling import GridPatchSampler, load_cohort
from slidestream.train import load_checkpoint, load_config
from slidestream.train.patch_config import PatchTrainConfig
from slidestream.train.patches import train_patches


@pytest.fixture(scope="module")
def database(three_class_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("db") / "db.h5"
    cohort = load_cohort(three_class_cohort)
    build = build_patch_databases(
        cohort,
        out,
        GridPatchSampler(48, mpp=1.0, min_tissue=0.6),
        split={"train": 0.67, "val": 0.33},
        progress=False,
    )
    return build.files["train"]


def _rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_train_from_database_learns_and_resumes(database, tmp_path):
    cfg = PatchTrainConfig(
        data=str(database),
        model="resnet18",
        epochs=2,
        steps_per_epoch=15,
        batch_size=16,
        lr=2e-3,
        workers=0,
        out=str(tmp_path),
        name="db",
    )
    run = train_patches(cfg)
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[-1]["val_accuracy"]) >= 0.8
    for name in ("config.yaml", "last.pt", "best.pt", "curves.png", "val_grid_epoch2.png"):
        assert (run / name).exists(), name
    for name in ("curves", "roc", "pr", "confusion"):  # PNG each epoch, SVG after the last
        assert (run / f"{name}.png").exists() and (run / f"{name}.svg").exists(), name
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["kind"] == "patch" and ckpt["classes"] == ["inflamed", "normal", "tumour"]
    assert ckpt["patch_size"] == 48 and ckpt["mpp"] == 1.0 and ckpt["model"]["name"] == "resnet18"
    # same name, more epochs: resumes at epoch 3 and keeps the history
    cfg.epochs = 3
    train_patches(cfg)
    assert [r["epoch"] for r in _rows(run)] == ["1", "2", "3"]


def test_train_from_stream(three_class_cohort, tmp_path):
    cohort = load_cohort(three_class_cohort)
    train_csv, val_csv = tmp_path / "train.csv", tmp_path / "val.csv"
    for path, split in ((train_csv, "train"), (val_csv, "val")):
        path.write_text(
            "slide,label\n" + "".join(f"{s.path},{s.label}\n" for s in cohort.split(split))
        )
    cfg = PatchTrainConfig(
        data=str(train_csv),
        val_data=str(val_csv),
        model="resnet18",
        size=48,
        mpp=1.0,
        epochs=1,
        steps_per_epoch=30,
        batch_size=16,
        lr=2e-3,
        workers=0,
        out=str(tmp_path),
        name="stream",
        balanced_sampling=True,
    )
    run = train_patches(cfg)
    assert float(_rows(run)[-1]["val_accuracy"]) >= 0.7


def test_config_yaml_flags_and_errors(tmp_path, database, capsys):
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(f"data: {database}\nmodel: resnet18\nepochs: 5\n")
    cfg = load_config(PatchTrainConfig, yaml_path, {"epochs": 1})
    assert cfg.epochs == 1 and cfg.model == "resnet18"
    with pytest.raises(ss.ConfigError, match="unknown config keys"):
        load_config(PatchTrainConfig, None, {"data": "x.h5", "epoch": 1})
    with pytest.raises(ss.ConfigError, match="optimizer"):
        PatchTrainConfig(data="x.h5", optimizer="adam")
    code = main(
        [
            "train-patches",
            str(yaml_path),
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--out",
            str(tmp_path),
            "--name",
            "cli",
            "--model",
            "nonexistent_net",
        ]
    )
    assert code == 1 and "unknown torchvision model" in capsys.readouterr().err


def test_checkpoint_is_atomic_and_weights_only(tmp_path):
    from slidestream.train import save_checkpoint

    state = {
        "kind": "patch",
        "model": {"name": "x"},
        "state_dict": {"w": torch.ones(2)},
        "classes": ["a"],
    }
    path = save_checkpoint(tmp_path / "c.pt", state)
    assert load_checkpoint(path)["state_dict"]["w"].sum() == 2
    assert not list(tmp_path.glob(".*tmp"))
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ss.ConfigError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(ss.ConfigError, match="lacks"):
        save_checkpoint(tmp_path / "d.pt", {"kind": "patch"})


def test_run_folders_never_mix_runs(database, tmp_path, capsys):
    """Without --name, another database or model gets its own folder; the same --name with
    another model or other data is refused in one line, naming the difference and the fix."""
    args = [
        "train-patches",
        "--data",
        str(database),
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--out",
        str(tmp_path),
    ]
    assert main([*args, "--model", "resnet18"]) == 0
    assert main([*args, "--model", "mobilenet_v3_small"]) == 0
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(runs) == 2 and all(r.startswith("patches-db.train-") for r in runs), runs
    capsys.readouterr()
    again = [a if a != "1" else "2" for a in args]  # same command, 2 epochs: resumes
    assert main([*again, "--model", "resnet18"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == runs
    named = [*args, "--name", "mine"]
    assert main([*named, "--model", "resnet18"]) == 0
    capsys.readouterr()
    assert main([*named, "--model", "resnet34"]) == 1
    err = capsys.readouterr().err
    assert "holds a run with model 'resnet18', not 'resnet34'" in err and "--name" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    val = str(database).replace(".train.", ".val.")  # another database, same classes
    assert (
        main(["train-patches", *args[1:], "--model", "resnet18", "--name", "mine", "--data", val])
        == 1
    )
    assert "holds a run with data" in capsys.readouterr().err


def test_kill_9_then_rerun_equals_an_uninterrupted_run(database, tmp_path):
    """SIGKILL train-patches as soon as epoch 1's last.pt exists, run it again: every row of
    metrics.csv, best.pt and summary.json equal an uninterrupted run's."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "slidestream", "train-patches", "--data", str(database),
            "--model", "resnet18", "--epochs", "3", "--steps-per-epoch", "5", "--batch-size",
            "8", "--workers", "0", "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run([*args, "--name", "ref"], check=True, **quiet)
    run = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--name", "killed"], **quiet)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (run / "last.pt").exists():
            time.sleep(0.01)
        assert proc.poll() is None, "training ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert len(_rows(run)) < 3 if (run / "metrics.csv").exists() else True
    subprocess.run([*args, "--name", "killed"], check=True, **quiet)

    def summary(name):
        rows = [(r["epoch"], round(float(r["train_loss"]), 5), r["val_accuracy"])
                for r in _rows(tmp_path / name)]  # fmt: skip
        best = load_checkpoint(tmp_path / name / "best.pt")
        s = json.loads((tmp_path / name / "summary.json").read_text())
        return rows, best["epoch"], s["best_epoch"], round(s["best_metric"], 6)

    assert summary("killed") == summary("ref")
