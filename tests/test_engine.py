"""The inference engine: predictors by checkpoint kind, one error for weights that do not fit,
slides closed after use, exact GeoJSON areas for every predictor, shards merged once."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from shapely.geometry import shape

import slidestream as ss
from slidestream.cli import main
from slidestream.infer import load_predictor
from slidestream.infer.mil import MILPredictor
from slidestream.infer.predict import PatchPredictor
from slidestream.infer.saliency import StreamingPredictor
from slidestream.models import save_checkpoint
from slidestream.synthetic import write_synthetic_slide

CLASSES = ["normal", "tumour"]


def _patch_state():
    from slidestream.models.classifiers import create_classifier

    model = create_classifier("mobilenet_v3_small", 2)
    with torch.no_grad():  # a random head large enough that tiles differ
        model.classifier[-1].weight.mul_(300)
    return {
        "kind": "patch",
        "model": {"name": "mobilenet_v3_small"},
        "state_dict": model.state_dict(),
        "classes": CLASSES,
        "mpp": 4.0,
        "patch_size": 32,
    }


def _mil_state():
    from slidestream.models.mil import MILModel, MILSpec

    spec = MILSpec(in_dim=6, outputs=2, hidden=16, classes=CLASSES)
    feats = {"encoder": "mean_rgb", "weights": "none", "mpp": 4.0, "size": 32, "min_tissue": 0.3}
    return {
        "kind": "mil",
        "model": asdict(spec),
        "state_dict": MILModel(spec).state_dict(),
        "classes": CLASSES,
        "features": feats,
    }


def _streaming_state():
    from slidestream.models.slide import SlideSpec, build_slide_model

    spec = SlideSpec(name="resnet18", classes=CLASSES, stream_until="layer1", tile_size=128)
    return {
        "kind": "streaming",
        "model": asdict(spec),
        "state_dict": build_slide_model(spec).state_dict(),
        "classes": CLASSES,
        "mpp": 8.0,
    }


STATES = {"patch": _patch_state, "mil": _mil_state, "streaming": _streaming_state}
CLASS_OF = {"patch": PatchPredictor, "mil": MILPredictor, "streaming": StreamingPredictor}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {k: save_checkpoint(d / f"{k}.pt", make()) for k, make in STATES.items()}


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine_slides")
    return [
        write_synthetic_slide(d / f"s{i}.tiff", 1024, 768, mpp=1.0, seed=i, tumour=i % 2 == 1)
        for i in range(3)
    ]


@pytest.mark.parametrize("kind", list(STATES))
def test_load_predictor_picks_the_declared_kind(checkpoints, kind):
    pred = load_predictor(checkpoints[kind], device="cpu", workers=0, features_dir=None)
    assert type(pred) is CLASS_OF[kind] and pred.kind == kind and pred.classes == CLASSES


@pytest.mark.parametrize("kind", list(STATES))
def test_weights_that_do_not_fit_are_one_error(checkpoints, tmp_path, kind, capsys):
    state = STATES[kind]()
    key = next(k for k, v in state["state_dict"].items() if v.ndim == 2)
    state["state_dict"][key] = state["state_dict"][key][:, :1].clone()  # a shape that cannot fit
    bad = save_checkpoint(tmp_path / "bad.pt", state)
    with pytest.raises(ss.ConfigError, match=r"bad\.pt: its weights do not fit .*mixed up"):
        load_predictor(bad, device="cpu")
    other = next(k for k in STATES if k != kind)
    with pytest.raises(ss.ConfigError, match=f"is a '{other}' checkpoint, not a {kind} model"):
        CLASS_OF[kind](checkpoints[other], device="cpu")
    slide = str(tmp_path / "none.tiff")
    assert main(["predict", str(bad), slide, "--out", str(tmp_path / "o")]) == 1


def test_unknown_kind_is_one_error(tmp_path):
    state = {**_mil_state(), "kind": "segmentation"}
    with pytest.raises(ss.ConfigError, match="'segmentation' checkpoint; predict reads patch"):
        load_predictor(save_checkpoint(tmp_path / "seg.pt", state))


@pytest.mark.parametrize("kind", list(STATES))
def test_contour_area_is_the_predicted_cells_area(
    checkpoints, slide_files, tmp_path, kind, monkeypatch
):
    if kind == "patch":  # a random model may call every tile alike: probabilities from xy
        from slidestream.infer.predict import PatchPredictor

        def tile_probs(self, slide, sampler, xy):
            p = ((xy[:, 0] // 128 + xy[:, 1] // 128) % 4) / 3  # tiles: 128 level-0 px
            return np.stack([1 - p, p], 1).astype(np.float32)

        monkeypatch.setattr(PatchPredictor, "tile_probs", tile_probs)
    pred = load_predictor(checkpoints[kind], device="cpu", workers=0, min_tissue=0.1)
    stem, names = slide_files[1].stem, pred.outputs
    res = pred.predict(slide_files[1], tmp_path)
    heat = np.load(tmp_path / f"{stem}.{names.heatmap}.npy")
    heat = heat[1] if heat.ndim == 3 and kind == "patch" else heat.reshape(heat.shape[-2:])
    threshold = float(np.nanmedian(heat))  # about half the cells pass
    res = pred.predict(slide_files[1], tmp_path, threshold=threshold)
    above = int((np.nan_to_num(heat, nan=-1) >= threshold).sum())
    assert 0 < above < np.isfinite(heat).sum() and res.tiles > 0
    gj = json.loads((tmp_path / f"{stem}.{names.geojson}").read_text())
    w0, h0 = 1024, 768
    cell_area = (w0 * h0) / (heat.shape[0] * heat.shape[1])  # cells tile the slide exactly
    area = sum(shape(f["geometry"]).area for f in gj["features"])
    assert area == pytest.approx(above * cell_area, rel=1e-9)
    assert sum(f["properties"]["tiles"] for f in gj["features"]) == above
    um2 = sum(f["properties"]["area_um2"] for f in gj["features"])
    assert um2 == pytest.approx(area * 1.0 * 1.0)  # the slide's mpp is 1.0 µm/px
    assert (tmp_path / f"{stem}.viewer.html").is_file()


@pytest.mark.parametrize("kind", ["patch", "mil"])
def test_each_slide_is_opened_once_and_closed(
    checkpoints, slide_files, tmp_path, monkeypatch, kind
):
    from slidestream.infer import engine

    slides = []

    def recording(*args, **kwargs):
        slides.append(ss.open_slide(*args, **kwargs))
        return slides[-1]

    monkeypatch.setattr(engine, "open_slide", recording)
    pred = load_predictor(checkpoints[kind], device="cpu", workers=0, min_tissue=0.1)
    pred.predict(slide_files[0], tmp_path)
    assert len(slides) == 1 and slides[0]._handle is None  # opened once, closed after use


def _rows(path):
    return list(csv.DictReader(path.read_text().splitlines()))


def test_shards_do_each_slide_once_and_merge(
    checkpoints, slide_files, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    args = ["predict", str(checkpoints["patch"]), *map(str, slide_files), "--out", str(out)]
    args += ["--workers", "0", "--min-tissue", "0.1"]
    assert main([*args, "--shard", "1/2"]) == 0
    assert _rows(out / "predictions.1of2.csv")[0]["slide"] == str(slide_files[1])
    assert not (out / "predictions.csv").exists()  # shard 0 is not in yet
    monkeypatch.setenv("RANK", "0")  # the torchrun rank is the default shard
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(args) == 0
    assert [r["slide"] for r in _rows(out / "predictions.0of2.csv")] == [
        str(slide_files[0]),
        str(slide_files[2]),
    ]
    merged = _rows(out / "predictions.csv")
    assert [r["slide"] for r in merged] == list(map(str, slide_files))  # once each, in order
    assert list(merged[0])[:7] == ["slide", "stem", "label", "call", "heatmap_class", "tiles",
                                   "damaged_tiles"]  # fmt: skip
    other = tmp_path / "other.pt"
    other.write_bytes(checkpoints["patch"].read_bytes())
    monkeypatch.setenv("RANK", "1")
    assert main([*args[:1], str(other), *args[2:]]) == 0  # shard 1 with another checkpoint
    assert not (out / "predictions.csv").exists()  # not merged with shard 0 of the first run
    assert main([*args, "--shard", "2/2"]) == 1
    assert "--shard must be i/n with 0 <= i < n" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("positive", "threshold", "warned"),
    [(False, 0.5, False), (True, 0.5, True), (False, 1.5, True)],
)
def test_empty_geojson_is_warned_only_when_something_is_off(positive, threshold, warned, caplog):
    from slidestream.infer.engine import Scores
    from slidestream.infer.writer import warn_if_empty

    heat = np.full((2, 2), 0.1, np.float32)
    scores = Scores(
        "tumour" if positive else "normal", [0.9, 0.1], 4, heat, (1.0, 1.0), "p(tumour)",
        "tumour", "p(tumour)", "tumour", positive,
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        warn_if_empty("s.tiff", scores, {"features": []}, threshold)
    assert ("the GeoJSON is empty" in caplog.text) == warned
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_if_empty("s.tiff", scores, {"features": [{}]}, threshold)
    assert not caplog.text
