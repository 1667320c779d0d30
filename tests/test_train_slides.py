"""Streamed whole-slide training: runs, checkpoints, resume, only-eval, DDP equals 1 process."""

from __future__ import annotations

import csv
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import slidestream as ss
from slidestream.cli import main
from slidestream.data.prepare import prepare_cohort
from slidestream.data.slides import SlideSampler
from slidestream.models.slide import SlideSpec, build_slide_model
from slidestream.sampling import load_cohort
from slidestream.synthetic import write_synthetic_slide
from slidestream.train import load_checkpoint
from slidestream.train.slide_config import SlideTrainConfig
from slidestream.train.slide_loop import evaluate_slides, train_slides


def _cfg(prepared, tmp_path, **kw):
    base = dict(
        data=str(prepared),
        model="resnet18",
        stream_until="layer1",
        image_size=256,
        tile_size=256,
        epochs=1,
        lr=1e-3,
        optimizer="adamw",
        accumulate=2,
        workers=0,
        out=str(tmp_path),
        name="run",
        augmentation=False,
    )
    return SlideTrainConfig(**{**base, **kw})


def test_train_resume_and_only_eval(prepared, tmp_path):
    cfg = _cfg(prepared, tmp_path, average_window=1)
    run = train_slides(cfg)
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1"] and "val_auc" in rows[0]
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["kind"] == "streaming" and ckpt["classes"] == ["normal", "tumour"]
    assert ckpt["mpp"] == 4.0 and ckpt["tile_size"] == 256
    assert (run / "averaged.pt").exists() and (run / "best.pt").exists()
    cfg.epochs = 2
    train_slides(cfg)  # same name: resumes at epoch 2
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    out = evaluate_slides(run / "last.pt", prepared, tmp_path / "eval")
    preds = list(csv.DictReader(out.read_text().splitlines()))
    assert len(preds) == 6 and {"p_normal", "p_tumour"} <= set(preds[0])


def test_bad_labels_are_rejected_with_the_row(prepared, tmp_path):
    bad = tmp_path / "bad.csv"
    lines = prepared.read_text().splitlines()
    rows = [
        f"{prepared.parent / line.split(',')[0]},{line.split(',', 1)[1]}" for line in lines[1:3]
    ]
    bad.write_text("\n".join([lines[0], rows[0], rows[1].replace("tumour", "")]) + "\n")
    with pytest.raises(ss.ConfigError, match="line 3"):
        train_slides(_cfg(bad, tmp_path, task="binary"))


def test_whole_image_augmentation_with_elastic(prepared, tmp_path):
    from slidestream.train.slide import slide_datasets

    plain, _, _ = slide_datasets(_cfg(prepared, tmp_path, augmentation=True))
    warped, _, _ = slide_datasets(_cfg(prepared, tmp_path, augmentation=True, elastic=1.0))
    a, b = plain[0]["image"], warped[0]["image"]
    assert a.shape == b.shape == (3, 256, 256) and b.dtype == torch.uint8
    assert not torch.equal(a, b)  # same seed and draw order: only the deformation differs
    assert torch.equal(warped[0]["image"], b)  # one seeded draw per image and epoch
    with pytest.raises(ss.ConfigError, match="elastic"):
        _cfg(prepared, tmp_path, elastic=1.5)


def test_step_order_is_seeded_and_split_over_ranks():
    sampler = SlideSampler(5, passes=2)
    a, b = sampler.order(0), sampler.order(0)
    assert (a == b).all() and len(a) == 10 and sorted(a) == sorted(list(range(5)) * 2)
    assert not (sampler.order(1) == a).all()
    # two ranks together take exactly the images of one process, step by step
    one = SlideSampler(6, accumulate=4, seed=3).steps(0)
    ranks = [SlideSampler(6, accumulate=4, seed=3, rank=r, world=2).steps(0) for r in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*ranks, strict=True)] == [sorted(s) for s in one]
    assert list(SlideSampler(3, seed=1))[0][1] == 0  # keys carry the epoch
    weighted = SlideSampler(4, passes=50, labels=[0, 0, 0, 1]).order(0)
    assert 0.35 < (weighted == 3).mean() < 0.65  # the rare class drawn as often as the rest
    with pytest.raises(ss.ConfigError, match="multiple"):
        SlideSampler(4, accumulate=3, world=2)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_kw, out):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    train_slides(SlideTrainConfig(**cfg_kw))
    torch.distributed.destroy_process_group()


def test_ddp_equals_single_process(prepared, tmp_path):
    base = dict(
        data=str(prepared),
        model="resnet18",
        stream_until="layer1",
        image_size=128,
        tile_size=128,
        epochs=1,
        lr=1e-2,
        optimizer="sgd",
        accumulate=2,
        workers=0,
        augmentation=False,
        out=str(tmp_path),
    )
    train_slides(SlideTrainConfig(**base, name="single"))
    mp.start_processes(
        _ddp_worker,
        args=(2, _free_port(), {**base, "name": "ddp"}, None),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    single = load_checkpoint(tmp_path / "single" / "last.pt")["state_dict"]
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")["state_dict"]
    spec = SlideSpec(name="resnet18", classes=["normal", "tumour"], stream_until="layer1")
    torch.manual_seed(0)
    init = build_slide_model(spec).state_dict()
    moved = [
        k for k in single if single[k].is_floating_point() and not torch.equal(single[k], init[k])
    ]
    assert moved  # training changed the weights
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-6)
    # the logged training loss covers both ranks' images, as in the single process
    losses = [
        float(next(csv.DictReader((tmp_path / n / "metrics.csv").open()))["train_loss"])
        for n in ("single", "ddp")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_train_cli_only_eval(prepared, tmp_path, capsys):
    run = train_slides(_cfg(prepared, tmp_path, name="cli"))
    code = main(
        [
            "train",
            "--data",
            str(prepared),
            "--only-eval",
            str(prepared),
            "--checkpoint",
            str(run / "last.pt"),
            "--out",
            str(tmp_path),
            "--name",
            "cli",
        ]
    )
    assert code == 0 and "predictions" in capsys.readouterr().out


def test_learns_tumour_from_slide_labels(tmp_path):
    """Positives hold small tumour-texture regions, negatives none: a streamed CNN trained
    from scratch on slide labels only must separate them (validation AUC >= 0.9)."""
    rows = []
    for i in range(20):
        tumour = i % 2 == 1
        p = write_synthetic_slide(
            tmp_path / f"s{i}.tiff",
            1024,
            1024,
            mpp=1.0,
            seed=500 + i,
            tumour=tumour,
            tumour_fraction=0.15,
        )
        rows.append(f"{p},{'tumour' if tumour else 'normal'},p{i},{'val' if i >= 14 else 'train'}")
    (tmp_path / "c.csv").write_text("slide,label,patient,split\n" + "\n".join(rows) + "\n")
    prepare_cohort(
        load_cohort(tmp_path / "c.csv"), tmp_path / "prep", 4.0, workers=2, progress=False
    )
    cfg = SlideTrainConfig(
        data=str(tmp_path / "prep" / "prepared.csv"),
        model="resnet18",
        stream_until="layer1",
        image_size=256,
        tile_size=256,
        epochs=5,
        lr=1e-3,
        optimizer="adamw",
        accumulate=4,
        workers=0,
        out=str(tmp_path),
        name="learn",
    )
    run = train_slides(cfg)
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert float(rows[-1]["val_auc"]) >= 0.9
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_predict_with_streaming_checkpoint(prepared, tmp_path):
    import json

    import numpy as np

    run = train_slides(_cfg(prepared, tmp_path, name="pred"))
    src = load_cohort(prepared)
    slide = src.slides[1].path  # a prepared slide (4 µm/px)
    out = tmp_path / "out"
    assert main(["predict", str(run / "last.pt"), str(slide), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    assert rows[0]["call"] in ("normal", "tumour")
    assert abs(float(rows[0]["p_normal"]) + float(rows[0]["p_tumour"]) - 1) < 1e-4
    grid = np.load(out / f"{slide.stem}.heatmap.npy")
    assert grid.ndim == 3 and np.nanmax(grid) == pytest.approx(1.0)
    assert (out / f"{slide.stem}.heatmap.png").exists()
    assert json.loads((out / f"{slide.stem}.geojson").read_text())["type"] == "FeatureCollection"


def test_unreadable_slides_are_skipped_and_listed(prepared, tmp_path):
    import json

    lines = prepared.read_text().splitlines()
    good = lines[1].split(",")
    broken = tmp_path / "broken.tiff"
    data = (prepared.parent / good[0]).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    bad_row = ",".join([str(broken), *good[1:]])
    csv_path = tmp_path / "with_bad.csv"
    csv_path.write_text("\n".join([*lines, bad_row]) + "\n")
    run = train_slides(_cfg(csv_path, tmp_path, name="skip"))
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["skipped_slides"]) == [str(broken)]
    assert list((run / "tensorboard").glob("events.*"))


def test_kill_9_then_rerun_resumes_to_the_same_epochs(prepared, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    cmd = [
        sys.executable,
        "-m",
        "slidestream",
        "train",
        "--data",
        str(prepared),
        "--model",
        "resnet18",
        "--stream-until",
        "layer1",
        "--image-size",
        "128",
        "--tile-size",
        "128",
        "--epochs",
        "3",
        "--epoch-multiply",
        "8",
        "--accumulate",
        "2",
        "--workers",
        "0",
        "--augmentation",
        "false",
        "--out",
        str(tmp_path),
        "--name",
        "killed",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    metrics = tmp_path / "killed" / "metrics.csv"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "training finished before it could be killed"
        time.sleep(0.2)  # into epoch 2
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not list((tmp_path / "killed").glob(".*.tmp"))  # no half-written checkpoint
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = list(csv.DictReader(metrics.read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]


def test_each_torchrun_rank_gets_its_own_gpu_and_cpu_ranks_use_gloo(monkeypatch):
    """Under torchrun, "cuda"/"auto" is cuda:LOCAL_RANK (not GPU 0 for every rank), and the
    process group is Gloo when the ranks train on the CPU, even on a machine with GPUs."""
    import torch.distributed as dist

    from slidestream.data.functional import resolve_device
    from slidestream.train.ddp import distributed

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3) == current[-1]
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("cuda") == torch.device("cuda")

    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    timeouts = []
    monkeypatch.setattr(
        dist,
        "init_process_group",
        lambda backend, timeout: (backends.append(backend), timeouts.append(timeout)),
    )
    monkeypatch.setattr(dist, "new_group", lambda backend, timeout: f"{backend} side group")
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    assert distributed(torch.device("cpu")) == (1, 2)
    assert distributed(torch.device("cuda", 0), timeout_min=3) == (1, 2)
    assert backends == ["gloo", "nccl"]
    assert [t.total_seconds() for t in timeouts] == [600, 180]  # minutes, not half an hour


def test_best_pt_holds_weights_and_spec_only(prepared, tmp_path, capsys):
    """best.pt: weights, model spec, the epoch's metrics; the AdamW state, scheduler, RNG and
    history live in last.pt only (issue #22 item 5). --only-eval reads best.pt by default."""
    from slidestream.train.runlog import TRAINING_STATE

    run = train_slides(_cfg(prepared, tmp_path, name="split"))
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert not set(TRAINING_STATE) & set(best)
    assert {"optimizer", "rng_state", "history"} <= set(last)
    assert last["optimizer"]["state"], "AdamW moments are in last.pt"
    for key in ("kind", "model", "classes", "state_dict", "mpp", "tile_size", "config", "epoch"):
        assert (
            best[key] == last[key] if key != "state_dict" else best[key].keys() == last[key].keys()
        )
    assert best["metrics"]["epoch"] == 1 and best["metrics"]["train_loss"] > 0
    assert best["best_epoch"] == 1
    weights = sum(t.numel() * t.element_size() for t in best["state_dict"].values())
    best_mb, last_mb = (run / "best.pt").stat().st_size, (run / "last.pt").stat().st_size
    assert best_mb < 1.1 * weights + 200_000  # weights and a little metadata
    assert last_mb > 2.5 * weights  # weights + AdamW's two moments
    args = ["train", "--data", str(prepared), "--only-eval", str(prepared)]
    code = main([*args, "--out", str(tmp_path), "--name", "split"])
    assert code == 0 and "predictions" in capsys.readouterr().out
