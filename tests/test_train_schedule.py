"""Learning-rate schedules with linear warm-up, the same for every trainer (issue #22 item 8)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

import slidestream as ss
from slidestream.infer.features import FeatureExtractor, extract_cohort
from slidestream.sampling import load_cohort
from slidestream.synthetic import write_synthetic_slide
from slidestream.train.mil import MILTask, train_mil
from slidestream.train.mil_config import MILTrainConfig
from slidestream.train.patch_config import PatchTrainConfig
from slidestream.train.patches import PatchTask
from slidestream.train.schedule import lr_factor
from slidestream.train.slide import SlideTask
from slidestream.train.slide_config import SlideTrainConfig
from slidestream.train.task import Task


def test_lr_factor_warms_up_then_follows_the_schedule():
    total, warm = 100, 10
    ramp = [lr_factor(s, total, warm, "cosine") for s in range(warm)]
    assert ramp == pytest.approx([(s + 1) / warm for s in range(warm)])
    cos = [lr_factor(s, total, warm, "cosine") for s in range(warm, total)]
    assert cos[0] == 1.0 and all(a > b for a, b in zip(cos, cos[1:], strict=False))
    assert cos[45] == pytest.approx(0.5) and cos[-1] < 1e-3  # half-way; nearly 0 at the end
    steps = [lr_factor(s, total, warm, "step") for s in range(warm, total)]
    assert steps[:45] == [1.0] * 45 and steps[45:68] == [pytest.approx(0.1)] * 23
    assert steps[68:] == [pytest.approx(0.01)] * 22
    assert {lr_factor(s, total, warm, "constant") for s in range(warm, total)} == {1.0}
    assert lr_factor(5, 10, 0, "none") == 1.0  # the patch trainer's older name
    with pytest.raises(ss.ConfigError, match="schedule must be one of"):
        SlideTrainConfig(data="x.csv", schedule="linear")
    with pytest.raises(ss.ConfigError, match="warmup_epochs"):
        MILTrainConfig(data="x.csv", features="f", epochs=2, warmup_epochs=3)


@pytest.mark.parametrize(
    "cfg",
    [
        PatchTrainConfig(data="db.h5", epochs=4, lr=0.1, schedule="step", warmup_epochs=1),
        SlideTrainConfig(data="p.csv", epochs=4, lr=0.1, schedule="cosine", warmup_epochs=1),
        MILTrainConfig(data="c.csv", features="f", epochs=4, lr=0.1, schedule="cosine"),
    ],
    ids=["patches", "slides", "mil"],
)
def test_every_trainer_steps_the_one_schedule(cfg):
    """Patch, streamed-slide and MIL tasks share Task.make_scheduler: the LR a real
    optimizer sees at each step is base lr × lr_factor."""
    for cls in (PatchTask, SlideTask, MILTask):
        assert cls.make_scheduler is Task.make_scheduler, cls
    task = object.__new__(MILTask)
    task.cfg = cfg
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = task.make_scheduler(opt, steps_per_epoch=5)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm = round(cfg.warmup_epochs * 5)
    assert seen == pytest.approx([0.1 * lr_factor(s, 20, warm, cfg.schedule) for s in range(20)])
    assert seen[0] < seen[warm] == pytest.approx(0.1) if warm else seen[0] == 0.1


def test_constant_without_warmup_has_no_scheduler():
    task = object.__new__(MILTask)
    task.cfg = MILTrainConfig(data="c.csv", features="f")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert task.make_scheduler(opt, 5) is None


@pytest.fixture(scope="module")
def mil_project(tmp_path_factory):
    """A project folder: six slides, a cohort CSV naming them relative to itself (four train,
    two val) and their mean-colour feature files in f/."""
    d = tmp_path_factory.mktemp("milproject")
    rows = []
    for i in range(6):
        write_synthetic_slide(d / f"s{i}.tiff", 512, 512, mpp=1.0, seed=900 + i)
        rows.append(
            f"s{i}.tiff,{'tumour' if i % 2 else 'normal'},p{i},{'val' if i >= 4 else 'train'}"
        )
    (d / "c.csv").write_text("slide,label,patient,split\n" + "\n".join(rows) + "\n")
    ex = FeatureExtractor("mean_rgb", mpp=2.0, size=32, workers=0, device="cpu")
    assert not extract_cohort(load_cohort(d / "c.csv"), d / "f", ex).failed
    return d


def _mil_cfg(d, **kw):
    base = dict(data=str(d / "c.csv"), features=str(d / "f"), epochs=4, lr=1e-3, hidden=16)
    return MILTrainConfig(**{**base, "out": str(d / "runs"), "device": "cpu", **kw})


def test_mil_run_records_the_lr_curve_in_metrics_csv(mil_project):
    """train-mil with cosine and one warm-up epoch: metrics.csv's lr column is the lr of each
    epoch's last step, warm-up then cosine; MIL counts bags, not images."""
    cfg = _mil_cfg(mil_project, schedule="cosine", warmup_epochs=1, name="cos")
    run = train_mil(cfg)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert rows[0]["bags"] == "4" and float(rows[0]["bags_per_s"]) > 0  # MIL counts bags
    assert "images" not in rows[0] and "images_per_s" not in rows[0]
    got = [float(r["lr"]) for r in rows]
    steps = 4  # four training bags, one per step
    want = [1e-3 * lr_factor(e * steps + steps - 1, 4 * steps, steps, "cosine") for e in range(4)]
    assert got == pytest.approx(want, rel=1e-6)
    assert got[0] == pytest.approx(1e-3) and got[1] == pytest.approx(
        1e-3 * (1 + math.cos(math.pi * 3 / 12)) / 2  # step 7: (7 - 4) / (16 - 4)
    )


def test_a_moved_project_folder_still_finds_its_data_and_resumes(mil_project, tmp_path):
    """Run folders record the data inside their project folder relative to themselves: move
    the whole folder, and its config.yaml still names the data, and the same run resumes."""
    import shutil

    import yaml

    from slidestream.models.checkpoint import load_checkpoint
    from slidestream.train.config import load_config

    first = tmp_path / "first"
    shutil.copytree(mil_project, first)
    run = train_mil(_mil_cfg(first, epochs=1, name="m"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"] == "../../c.csv" and saved["features"] == "../../f"
    assert saved["out"] == ".."
    assert load_checkpoint(run / "last.pt")["fingerprint"]["data"].startswith("../../c.csv (")
    moved = shutil.move(str(first), str(tmp_path / "elsewhere" / "moved"))
    cfg = load_config(MILTrainConfig, f"{moved}/runs/m/config.yaml", {"epochs": 2})
    assert Path(cfg.data) == Path(moved) / "c.csv" and Path(cfg.features).is_dir()
    again = train_mil(cfg)  # same run folder, same data: resumes at epoch 2
    assert again == Path(moved) / "runs" / "m"
    rows = list(csv.DictReader((again / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_portable_path_is_relative_inside_the_project_only(tmp_path):
    from slidestream.train.runlog import portable_path

    run = tmp_path / "proj" / "runs" / "r"
    assert portable_path(tmp_path / "proj" / "data" / "c.csv", run) == "../../data/c.csv"
    assert portable_path(tmp_path / "other" / "c.csv", run) == str(tmp_path / "other" / "c.csv")


def test_demo_cohort_csv_moves_with_its_folder(tmp_path):
    """The demo's cohort.csv names its slides and annotations relative to itself."""
    import shutil

    from slidestream.demo import DemoSettings, make_cohort

    make_cohort(tmp_path / "demo", DemoSettings(slides=2, size=256, mpp=1.0))
    moved = Path(shutil.move(str(tmp_path / "demo"), str(tmp_path / "moved")))
    cohort = load_cohort(moved / "cohort.csv")
    assert not cohort.problems and len(cohort) == 2
    assert all(e.path.is_file() and moved in e.path.parents for e in cohort)
    assert all(e.annotations is not None and e.annotations.is_file() for e in cohort)
