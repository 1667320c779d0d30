"""MIL: aggregators, train-mil on the one loop (learns, resumes), attention maps onto tumour."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import slidestream as ss
from slidestream.cli import main
from slidestream.data.features import feature_path, read_features
from slidestream.infer.features import FeatureExtractor, extract_cohort
from slidestream.infer.mil import MILPredictor
from slidestream.models.mil import AGGREGATORS, MILModel, MILSpec
from slidestream.sampling import load_cohort
from slidestream.synthetic import write_synthetic_slide
from slidestream.train import load_checkpoint
from slidestream.train.mil import target_of, train_mil
from slidestream.train.mil_config import MILTrainConfig


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_aggregator_contract(aggregator):
    torch.manual_seed(0)
    model = MILModel(MILSpec(in_dim=12, outputs=3, aggregator=aggregator, hidden=32))
    bag = torch.randn(17, 12)
    logits, att = model.forward_attention(bag)
    assert logits.shape == (1, 3) and att.shape == (17,) and att.dtype == torch.float32
    assert (att >= 0).all() and torch.isclose(att.sum(), torch.tensor(1.0), atol=1e-5)
    model(bag).sum().backward()
    assert model.embed[0].weight.grad is not None and model.fc.weight.grad.abs().sum() > 0
    model.eval()
    assert torch.equal(model(bag[None]), model(bag))  # (1, N, D) is the same bag
    with pytest.raises(ss.ConfigError, match="bag"):
        model(torch.zeros(0, 12))


def test_targets_of_every_task():
    entry = load_cohort.__globals__["SlideEntry"]  # the cohort's row type
    from pathlib import Path

    e = entry(Path("a.tiff"), "x;z", line=2)
    assert target_of("multilabel", ["x", "y", "z"], e).tolist() == [1, 0, 1]
    assert target_of("multiclass", ["x;z", "q"], e).tolist() == [0]
    assert target_of("regression", [], entry(Path("a.tiff"), "2.5")).tolist() == [2.5]
    with pytest.raises(ss.ConfigError, match="line 2"):
        target_of("binary", ["x", "y"], e)


@pytest.fixture(scope="module")
def mil_cohort(tmp_path_factory: pytest.TempPathFactory):
    """20 slides at 1 µm/px (odd = small tumour region; the last 8 validation) and their
    mean-colour feature files (32 px patches at 2 µm/px)."""
    d = tmp_path_factory.mktemp("mil")
    rows = []
    for i in range(20):
        tumour = i % 2 == 1
        p = write_synthetic_slide(
            d / f"m{i}.tiff", 1024, 1024, mpp=1.0, seed=700 + i, tumour=tumour, tumour_fraction=0.2
        )
        split = "val" if i >= 12 else "train"
        rows.append(f"{p},{'tumour' if tumour else 'normal'},p{i},{split}")
    (d / "c.csv").write_text("slide,label,patient,split\n" + "\n".join(rows) + "\n")
    ex = FeatureExtractor("mean_rgb", mpp=2.0, size=32, workers=0, device="cpu")
    report = extract_cohort(load_cohort(d / "c.csv"), d / "feats", ex)
    assert not report.failed
    return d


def _cfg(d, tmp_path, **kw):
    base = dict(
        data=str(d / "c.csv"),
        features=str(d / "feats"),
        epochs=12,
        lr=1e-3,
        hidden=64,
        out=str(tmp_path),
        name="run",
        device="cpu",
    )
    return MILTrainConfig(**{**base, **kw})


def _tumour_share(slide, coords, size0):
    """Tumour fraction of each patch, from the synthetic ground-truth mask."""
    truth = json.loads(slide.with_suffix(".truth.json").read_text())
    mask = np.asarray(Image.open(slide.with_suffix(".tumour.png")), float)
    ds = truth["mask_downsample"]
    out = []
    for x, y in coords:
        r0, c0 = int(y / ds), int(x / ds)
        r1, c1 = int(np.ceil((y + size0) / ds)), int(np.ceil((x + size0) / ds))
        out.append(mask[r0:r1, c0:c1].mean())
    return np.array(out)


def test_abmil_learns_and_attends_to_tumour(mil_cohort, tmp_path):
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    run = train_mil(_cfg(mil_cohort, tmp_path))
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["kind"] == "mil" and ckpt["classes"] == ["normal", "tumour"]
    assert ckpt["features"]["encoder"] == "mean_rgb" and ckpt["model"]["aggregator"] == "abmil"
    predictor = MILPredictor(run / "best.pt", features_dir=mil_cohort / "feats", device="cpu")
    val = load_cohort(mil_cohort / "c.csv").split("val")
    y, p, gains = [], [], []
    for entry in val:
        res = predictor.predict(entry.path, tmp_path / "pred")
        y.append(entry.label == "tumour")
        p.append(res.probs[1])
        if entry.label != "tumour":
            continue
        text = (tmp_path / "pred" / f"{entry.path.stem}.attention.csv").read_text()
        rows = list(csv.DictReader(text.splitlines()))
        coords = np.array([[int(r["x"]), int(r["y"])] for r in rows])
        att = np.array([float(r["attention"]) for r in rows])
        share = _tumour_share(entry.path, coords, float(rows[0]["w"]))
        gains.append((att * share).sum() / share.mean())  # > 1: attention favours tumour
    assert roc_auc_score(y, p) >= 0.9
    assert np.mean(gains) > 2.5 and min(gains) > 2.0, gains  # measured: 3.2-3.6
    stem = val.slides[1].path.stem
    for suffix in ("attention.npy", "attention.png", "attention.geojson"):
        assert (tmp_path / "pred" / f"{stem}.{suffix}").is_file()
    geo = json.loads((tmp_path / "pred" / f"{stem}.attention.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"]


@pytest.mark.parametrize("model", ["transmil", "max"])
def test_train_mil_resumes_other_aggregators_and_predict_cli(mil_cohort, tmp_path, model):
    cfg = _cfg(
        mil_cohort, tmp_path, model=model, epochs=1, max_instances=16, class_weighting="balanced"
    )
    run = train_mil(cfg)
    cfg.epochs = 2
    train_mil(cfg)  # same name: resumes at epoch 2
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and "val_auc" in rows[0]
    if model == "max":
        return
    slide = load_cohort(mil_cohort / "c.csv").slides[13].path
    out = tmp_path / "pred"
    assert main(["predict", str(run / "last.pt"), str(slide), "--out", str(out)]) == 0
    assert (out / f"{slide.stem}.attention.png").is_file()  # features computed (mean_rgb)
    pred = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    assert pred[0]["call"] in ("normal", "tumour") and int(pred[0]["tiles"]) > 10
    feats, _, _ = read_features(feature_path(mil_cohort / "feats", slide))
    assert int(pred[0]["tiles"]) == len(feats)


def test_missing_features_and_other_run(mil_cohort, tmp_path):
    with pytest.raises(ss.ConfigError, match="required"):
        MILTrainConfig(data=str(mil_cohort / "c.csv"))
    with pytest.raises(ss.ConfigError, match="no feature files"):
        train_mil(_cfg(mil_cohort, tmp_path, features=str(tmp_path / "empty")))


def test_patient_level_split_without_a_split_column(mil_cohort, tmp_path):
    from slidestream.train.mil import mil_splits

    lines = (mil_cohort / "c.csv").read_text().splitlines()
    rows = [",".join(line.split(",")[:2] + [f"pat{i // 2}"]) for i, line in enumerate(lines[1:])]
    data = tmp_path / "nosplit.csv"
    data.write_text("slide,label,patient\n" + "\n".join(rows) + "\n")
    cfg = _cfg(mil_cohort, tmp_path, data=str(data), split="train=0.8,val=0.2")
    train, val = mil_splits(cfg)
    assert len(train) + len(val) == 20 and len(val) >= 2
    assert not {s.patient for s in train} & {s.patient for s in val}
    assert {s.label for s in val} == {"normal", "tumour"}


@pytest.mark.parametrize("task", ["regression", "multilabel"])
def test_other_tasks_train(mil_cohort, tmp_path, task):
    lines = (mil_cohort / "c.csv").read_text().splitlines()
    rows = []
    for i, line in enumerate(lines[1:]):
        slide, label, patient, split = line.split(",")
        label = str(float(i % 2)) if task == "regression" else ("a;b" if i % 2 else "a")
        rows.append(f"{slide},{label},{patient},{split}")
    data = tmp_path / f"{task}.csv"
    data.write_text(lines[0] + "\n" + "\n".join(rows) + "\n")
    best = "mae" if task == "regression" else "auc"
    run = train_mil(
        _cfg(mil_cohort, tmp_path, data=str(data), task=task, epochs=1, best_metric=best)
    )
    row = next(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert ("val_mae" in row) if task == "regression" else ("val_auc" in row)
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["task"] == task and ckpt["model"]["outputs"] == (1 if task == "regression" else 2)
