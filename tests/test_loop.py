"""The one training loop: loading overlaps compute, crash-safe run folders, run fingerprints,
channels-last + bf16 streamed gradients, the auto tile size."""

from __future__ import annotations

import csv
import json
import os
import time

import pytest
import torch

import slidestream as ss
from slidestream.data.slides import SlideImageDataset
from slidestream.models import load_checkpoint
from slidestream.models.slide import SlideSpec, build_slide_model
from slidestream.train.slide import SlideTask
from slidestream.train.slide_config import SlideTrainConfig
from slidestream.train.slide_loop import train_slides
from slidestream.train.tuning import auto_tile_size, tile_candidates


def _cfg(prepared, tmp_path, **kw):
    base = dict(
        data=str(prepared),
        model="resnet18",
        stream_until="layer1",
        image_size=128,
        tile_size=128,
        epochs=2,
        lr=1e-2,
        optimizer="sgd",
        accumulate=2,
        workers=0,
        out=str(tmp_path),
        name="run",
        augmentation=False,
    )
    return SlideTrainConfig(**{**base, **kw})


def _rows(run):
    return list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))


def test_loading_overlaps_compute(prepared, tmp_path, monkeypatch):
    """Items take LOAD s to read, a step STEP s to compute: with one worker prefetching, the
    epoch takes about the larger of the two per item, not their sum."""
    load, step, n = 0.25, 0.25, 12
    read, loss = SlideImageDataset.read, SlideTask.loss

    def slow_read(self, path, rng):
        time.sleep(load)
        return read(self, path, rng)

    def slow_loss(self, batch, device):
        time.sleep(step)
        return loss(self, batch, device)

    monkeypatch.setattr(SlideImageDataset, "read", slow_read)  # workers fork with it
    monkeypatch.setattr(SlideTask, "loss", slow_loss)
    cfg = _cfg(prepared, tmp_path, epochs=1, epoch_multiply=3, workers=1, prefetch=4)
    row = _rows(train_slides(cfg))[0]
    assert int(row["images"]) == n
    wall, compute = float(row["time_s"]), float(row["step_s"])
    reading = n * load
    assert compute >= n * step
    # overlapped: about the larger of the two (plus the first item's read), not their sum
    assert wall <= max(reading, compute) + load + 0.6, row
    assert wall < reading + compute - 0.5 * min(reading, compute), row
    assert float(row["data_wait_s"]) < load + 0.2 * reading  # the wait a GPU would see


def test_metrics_have_speed_columns_and_config_the_tile(prepared, tmp_path):
    run = train_slides(_cfg(prepared, tmp_path, epochs=1, tile_size="auto", image_size=256))
    row = _rows(run)[0]
    for key in ("data_wait_s", "step_s", "images_per_s", "peak_mem_gb", "lr", "train_loss"):
        assert float(row[key]) >= 0, key
    assert float(row["images_per_s"]) > 0 and float(row["lr"]) == pytest.approx(1e-2)
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["tile_size"] == 1024  # CPU auto
    assert load_checkpoint(run / "last.pt")["model"]["tile_size"] == 1024


def test_auto_tile_picks_the_largest_that_fits():
    model = build_slide_model(SlideSpec(name="resnet18", stream_until="layer1"))
    assert tile_candidates((1000, 1000))[:3] == [1024, 768, 512]
    gb = 2**30
    seen = []

    def measure(m):  # pretend peak memory grows with the tile's area
        seen.append(m.tile_size)
        if m.tile_size > 768:
            raise torch.OutOfMemoryError("too big")
        return m.tile_size**2 * 4 * gb // 512**2

    tile = auto_tile_size(model, (1000, 1000), torch.device("cpu"), budget_gb=8, measure=measure)
    assert tile == 512 and seen == [1024, 768, 512] and model.stream.tile_size == 512
    with pytest.raises(ss.ConfigError, match="no tile fits the memory budget of 0.5 GB"):
        auto_tile_size(model, (600, 600), torch.device("cpu"), budget_gb=0.5, measure=measure)


def test_channels_last_and_bf16_keep_streamed_gradients(tmp_path):
    """Streamed with channels-last crops under bf16 autocast vs conventional fp32 backprop:
    equal within bf16 tolerance, every parameter."""
    torch.manual_seed(0)
    spec = SlideSpec(name="resnet18", stream_until="layer2", tile_size=128, pooling="mean")
    model = build_slide_model(spec, channels_last=True).to(memory_format=torch.channels_last)
    image = torch.randint(0, 256, (1, 3, 320, 288), dtype=torch.uint8)
    target = torch.tensor([1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(image).float(), target)
    loss.backward()
    streamed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    x = (image.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    feats = model.trunk(x)
    logits = model.fc(feats.mean((2, 3)))
    torch.nn.functional.cross_entropy(logits, target).backward()
    assert model.stream.last_stats["tiles"] > 1  # really streamed
    for name, p in model.named_parameters():
        ref, got = p.grad, streamed[name]
        rel = ((got - ref).norm() / ref.norm().clamp(min=1e-12)).item()
        assert rel < 0.05, f"{name}: relative error {rel:.3g}"


def test_run_folder_refuses_other_data_or_model(prepared, tmp_path):
    run = train_slides(_cfg(prepared, tmp_path, epochs=1))
    before = (run / "last.pt").read_bytes()
    with pytest.raises(ss.ConfigError, match="holds a run with model 'resnet18', not 'resnet34'"):
        train_slides(_cfg(prepared, tmp_path, epochs=2, model="resnet34"))
    other = prepared.parent / "other_labels.csv"
    other.write_text(prepared.read_text().replace("tumour", "Tumour"))
    with pytest.raises(ss.ConfigError, match="--name .* or --resume-from"):
        train_slides(_cfg(other, tmp_path, epochs=2))
    assert (run / "last.pt").read_bytes() == before  # nothing overwritten
    # without --name, different data or models get different folders; the same resumes
    a = train_slides(_cfg(prepared, tmp_path, epochs=1, name=None))
    b = train_slides(_cfg(prepared, tmp_path, epochs=1, name=None, pooling="mean"))
    assert a != b and a.parent == b.parent == tmp_path
    assert train_slides(_cfg(prepared, tmp_path, epochs=2, name=None)) == a
    assert [r["epoch"] for r in _rows(a)] == ["1", "2"]
    # --resume-from starts a new run from another run's weights
    c = train_slides(_cfg(prepared, tmp_path, epochs=1, name="c", resume_from=str(a / "last.pt")))
    assert load_checkpoint(c / "last.pt")["epoch"] == 1


class _Killed(BaseException):
    pass


def _outputs(run):
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    summary = json.loads((run / "summary.json").read_text())
    return {
        "best": (best["epoch"], round(best["best_metric"], 6)),
        "last": (last["epoch"], round(last["best_metric"], 6), last["best_epoch"]),
        "metrics": [(r["epoch"], round(float(r["train_loss"]), 6)) for r in _rows(run)],
        "summary": (summary["epochs"], summary["best_epoch"], round(summary["best_metric"], 6)),
    }


def test_kill_at_each_write_boundary_then_resume_agrees(prepared, tmp_path, monkeypatch):
    """Kill at every file write of a run (best.pt / last.pt / metrics.csv / summary.json of
    each epoch), run again: the folder agrees with an uninterrupted run's every time."""
    base = dict(epochs=2, best_metric="loss", lr=1e-3)
    real = os.replace
    writes: list[str] = []
    kill: list[int] = [-1]

    def replace(src, dst):
        if str(dst).endswith((".pt", ".csv", ".json")):
            writes.append(os.path.basename(dst))
            if len(writes) - 1 == kill[0]:
                raise _Killed
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    ref = _outputs(train_slides(_cfg(prepared, tmp_path, name="ref", **base)))
    boundaries = list(writes)
    assert boundaries.count("last.pt") == 2 and "best.pt" in boundaries
    for k in range(len(boundaries)):
        writes.clear()
        kill[0] = k
        with pytest.raises(_Killed):
            train_slides(_cfg(prepared, tmp_path, name=f"kill{k}", **base))
        kill[0] = -1
        stale = tmp_path / f"kill{k}" / ".last.pt.999999999.abc.tmp"  # what a kill -9 leaves
        stale.write_bytes(b"half a checkpoint")
        if not (tmp_path / f"kill{k}" / "last.pt").exists():
            continue  # killed before the first checkpoint: a fresh start (checked below)
        got = _outputs(train_slides(_cfg(prepared, tmp_path, name=f"kill{k}", **base)))
        assert got == ref, f"killed at write {k} ({boundaries[k]})"
        assert not stale.exists()
    first = next(i for i, w in enumerate(boundaries) if w == "last.pt")
    assert first >= 1  # best.pt of epoch 1 is written before last.pt: that kill point ran
    got = _outputs(train_slides(_cfg(prepared, tmp_path, name="kill0", **base)))
    assert got == ref


def _silent_rank_worker(rank, world, port, out):
    import os as _os

    from slidestream.errors import SlideStreamError
    from slidestream.train.ddp import barrier, distributed

    _os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    distributed(torch.device("cpu"), timeout_min=0.05)  # 3 s
    if rank == 1:
        time.sleep(8)  # stops answering
        return
    try:
        barrier(world, "after epoch 1")
    except SlideStreamError as exc:
        (out / "error.txt").write_text(str(exc))


def test_a_silent_ddp_rank_is_named_within_the_timeout(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    mp.start_processes(
        _silent_rank_worker, args=(2, port, tmp_path), nprocs=2, join=True, start_method="spawn"
    )
    msg = (tmp_path / "error.txt").read_text()
    assert "a rank stopped answering after epoch 1" in msg and "1" in msg.split(":", 1)[1]
    assert time.perf_counter() - t0 < 60


def test_every_trainer_flag_explains_itself(capsys):
    import dataclasses

    from slidestream.cli import main
    from slidestream.train.config import field_help
    from slidestream.train.patch_config import PatchTrainConfig

    for cls in (SlideTrainConfig, PatchTrainConfig):
        missing = {f.name for f in dataclasses.fields(cls)} - set(field_help(cls))
        assert not missing, f"{cls.__name__} fields without a meaning: {sorted(missing)}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--tile-size TILE_SIZE streaming tile, input px" in out and "(default: auto)" in out
