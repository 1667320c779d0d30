from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import slidestream as ss
from slidestream.cli import main
from slidestream.data.database import build_patch_databases
from slidestream.infer import PatchPredictor, aggregate
from slidestream.infer.export import contours_geojson
from slidestream.io import open_slide
from slidestream.sampling import GridPatchSampler, load_cohort
from slidestream.train.patch_config import PatchTrainConfig
from slidestream.train.patches import train_patches


@pytest.fixture(scope="module")
def checkpoint(three_class_cohort, tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    build = build_patch_databases(
        load_cohort(three_class_cohort),
        d / "db.h5",
        GridPatchSampler(48, mpp=1.0, min_tissue=0.6),
        split={"train": 0.67, "val": 0.33},
        progress=False,
    )
    cfg = PatchTrainConfig(
        data=str(build.files["train"]),
        model="resnet18",
        epochs=1,
        steps_per_epoch=25,
        batch_size=16,
        lr=2e-3,
        workers=0,
        out=str(d),
        name="run",
    )
    return train_patches(cfg) / "best.pt"


def test_predict_writes_all_outputs(checkpoint, three_class_cohort, tmp_path):
    cohort = load_cohort(three_class_cohort)
    entry = cohort.slides[1]  # a tumour slide
    pred = PatchPredictor(checkpoint, workers=2, batch_size=32)
    res = pred.predict(entry.path, tmp_path, target="tumour")
    assert res.call == "tumour" and res.tiles > 10 and abs(sum(res.probs) - 1) < 1e-4
    stem = entry.path.stem
    for suffix in (".tiles.csv", ".heatmap.npy", ".heatmap.png", ".geojson"):
        assert (tmp_path / f"{stem}{suffix}").exists(), suffix
    slide = open_slide(entry.path)
    grid = np.load(tmp_path / f"{stem}.heatmap.npy")
    assert grid.shape == (3, *GridPatchSampler(48, 1.0, cover_edges=True).grid_shape(slide))
    assert np.isfinite(grid).sum() == 3 * res.tiles
    gj = json.loads((tmp_path / f"{stem}.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and gj["features"]
    w0, h0 = slide.dimensions
    for feat in gj["features"]:
        assert feat["geometry"]["type"] == "Polygon"
        assert feat["properties"]["classification"]["name"] == "tumour"
        ring = np.array(feat["geometry"]["coordinates"][0])
        assert (ring[:, 0] >= 0).all() and (ring[:, 0] <= w0).all() and (ring[:, 1] <= h0).all()
        assert ring[0].tolist() == ring[-1].tolist()
    rows = list(csv.DictReader((tmp_path / f"{stem}.tiles.csv").read_text().splitlines()))
    assert len(rows) == res.tiles and {"x", "y", "p_tumour"} <= set(rows[0])


def test_predict_cli_csv_and_bad_slide(checkpoint, three_class_cohort, tmp_path, capsys):
    cohort = load_cohort(three_class_cohort)
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"nope")
    code = main(
        [
            "predict",
            str(checkpoint),
            str(cohort.slides[0].path),
            str(bad),
            "--out",
            str(tmp_path / "out"),
            "--workers",
            "0",
            "--geojson",
            "tiles",
        ]
    )
    assert code == 1 and "bad.svs" in capsys.readouterr().err
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").read_text().splitlines()))
    assert len(rows) == 1 and rows[0]["call"] in ("normal", "tumour", "inflamed")
    gj = json.loads((tmp_path / "out" / f"{cohort.slides[0].path.stem}.geojson").read_text())
    assert all(len(f["geometry"]["coordinates"][0]) == 5 for f in gj["features"])


def test_predict_real_svs_covers_the_last_row_and_column(checkpoint, shared_data, tmp_path):
    path = shared_data / "cmu_small_region.svs"
    res = PatchPredictor(checkpoint, workers=0, min_tissue=0.05).predict(path, tmp_path)
    assert res.tiles > 20 and (tmp_path / "cmu_small_region.geojson").exists()
    w0, h0 = open_slide(path).dimensions  # 2220 x 2967: neither a multiple of the tile
    tiles = list(csv.DictReader((tmp_path / "cmu_small_region.tiles.csv").open()))
    bottom = max(float(t["y"]) + float(t["h"]) for t in tiles)
    assert bottom >= h0  # the partial last row (tissue down to the edge) is predicted
    step = float(tiles[0]["w"])
    grid = np.load(tmp_path / "cmu_small_region.heatmap.npy")
    assert grid.shape[1:] == (np.ceil(h0 / step), np.ceil(w0 / step))  # partial ones included
    assert np.isfinite(grid[0, -1]).any()
    assert res.heatmap_class in PatchPredictor(checkpoint, workers=0).classes
    assert (tmp_path / "cmu_small_region.viewer.html").exists()


def test_predict_names_the_drawn_class_and_warns_on_empty_outputs(
    checkpoint, three_class_cohort, tmp_path, capsys, caplog
):
    slide = load_cohort(three_class_cohort).slides[0].path
    out = tmp_path / "out"
    args = ["predict", str(checkpoint), str(slide), "--out", str(out), "--workers", "0"]
    with caplog.at_level("WARNING"):
        assert main([*args, "--threshold", "1.01"]) == 0
    printed = capsys.readouterr().out
    assert "heatmaps and GeoJSON show p(tumour) (the default; choose with --class" in printed
    assert "1 slide predicted" in printed
    assert "the GeoJSON is empty" in caplog.text and slide.name in caplog.text
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert rows[0]["heatmap_class"] == "tumour"
    colors = json.loads((out / "colors.json").read_text())
    assert colors["tumour"] == "#dc3220" and set(colors) == {"inflamed", "normal", "tumour"}
    assert main([*args, "--class", "inflamed"]) == 0
    assert "show p(inflamed) (--class" in capsys.readouterr().out


def test_contours_with_hole_and_aggregate():
    grid = np.zeros((7, 7))
    grid[1:6, 1:6] = 0.9
    grid[3, 3] = 0.1  # a hole
    grid[0, 6] = np.nan
    gj = contours_geojson(grid, (100.0, 200.0, 10.0, 10.0), "tumour")
    (feat,) = gj["features"]
    outer, hole = (np.array(r) for r in feat["geometry"]["coordinates"])
    assert outer[:, 0].min() == pytest.approx(110) and outer[:, 0].max() == pytest.approx(160)
    assert outer[:, 1].min() == pytest.approx(210) and outer[:, 1].max() == pytest.approx(260)
    assert 130 <= hole[:, 0].min() < hole[:, 0].max() <= 140
    assert feat["properties"]["tiles"] == 24
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8]])
    np.testing.assert_allclose(aggregate(p, "mean"), [19 / 30, 11 / 30])
    np.testing.assert_allclose(aggregate(p, "majority"), [2 / 3, 1 / 3])
    np.testing.assert_allclose(aggregate(p, "topk", topk=1), [0.2, 0.8])
    p3 = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(aggregate(p3, "topk", topk=1), np.array([0.7, 0.2, 0.8]) / 1.7)
    with pytest.raises(ss.ConfigError):
        aggregate(p, "median")


def test_checkpoint_that_does_not_fit_its_model_is_one_line(
    checkpoint, three_class_cohort, tmp_path, capsys
):
    from slidestream.models import load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoint)
    state["model"]["name"] = "resnet34"  # weights of a resnet18
    save_checkpoint(tmp_path / "mixed.pt", state)
    with pytest.raises(ss.ConfigError, match="do not fit resnet34 with 3 classes"):
        PatchPredictor(tmp_path / "mixed.pt", workers=0)
    slide = str(load_cohort(three_class_cohort).slides[0].path)
    assert main(["predict", str(tmp_path / "mixed.pt"), slide, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "do not fit resnet34" in err and "Traceback" not in err
