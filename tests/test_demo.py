"""The one-command demo in --fast mode, end to end (about a minute on 2 cores)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from slidestream.cli import main
from slidestream.infer.report import held_out_metrics
from slidestream.io import open_slide
from slidestream.sampling import GridPatchSampler


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--fast"]) == 0
    return out


def test_demo_report_and_held_out_auc(demo):
    html = (demo / "report" / "index.html").read_text()
    assert "Held-out results" in html and "heatmap.png" in html and "curves.png" in html
    for name in ("predict/predictions.csv", "predict_slide/predictions.csv"):
        m = held_out_metrics(demo / name)
        assert m["slides"] >= 4 and m["auc"] >= 0.8, (name, m)
    assert "Streaming vs MIL on the held-out slides" in html
    mil = held_out_metrics(demo / "predict_mil" / "predictions.csv")
    assert mil["slides"] >= 4 and mil["auc"] >= 0.8, mil
    assert list((demo / "predict_mil").glob("*.attention.png"))
    imgs = {p.name for p in (demo / "report" / "img").iterdir()}
    assert any(n.endswith(".heatmap.png") for n in imgs) and any(
        n.endswith(".qc.png") for n in imgs
    )


def test_tumour_regions_score_higher_than_normal_tissue(demo):
    tumour_slides = [
        p
        for p in (demo / "predict").glob("*.heatmap.npy")
        if (demo / "slides" / f"{p.name.split('.')[0]}.tumour.png").exists()
        and json.loads((demo / "slides" / f"{p.name.split('.')[0]}.truth.json").read_text())[
            "tumour_fraction"
        ]
        > 0
    ]
    assert tumour_slides
    for npy in tumour_slides:
        stem = npy.name.split(".")[0]
        grid = np.load(npy)[1]  # p(tumour) on the tile grid
        truth = np.asarray(Image.open(demo / "slides" / f"{stem}.tumour.png")) > 0
        slide = open_slide(demo / "slides" / f"{stem}.tiff")
        rows, cols = GridPatchSampler(64, 1.0, cover_edges=True).grid_shape(slide)
        small = np.asarray(Image.fromarray(truth).resize((cols, rows), Image.Resampling.BOX))
        known = np.isfinite(grid)
        assert np.nanmean(grid[known & small]) > np.nanmean(grid[known & ~small]) + 0.3


def test_report_command_regenerates(demo, capsys):
    (demo / "report" / "index.html").unlink()
    assert main(["report", str(demo)]) == 0
    assert (demo / "report" / "index.html").exists() and "report:" in capsys.readouterr().out
