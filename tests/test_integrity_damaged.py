"""Regions with undecodable pixels are skipped, counted and named (issue #18.3, consumers), and
a slide without mpp gets a hint that works in each command (#15.6)."""

from __future__ import annotations

import csv
import json
import sys

import h5py
import numpy as np
import pytest
import torchvision

from slidestream.cli import main
from slidestream.data.database import build_patch_databases
from slidestream.data.hdf5 import PatchDatabase
from slidestream.data.prepare import prepare_slide
from slidestream.errors import SlideReadError
from slidestream.infer import PatchPredictor
from slidestream.io import open_slide
from slidestream.io.base import Slide
from slidestream.models.checkpoint import save_checkpoint
from slidestream.sampling import GridPatchSampler, SlideEntry, load_cohort
from slidestream.synthetic import write_synthetic_slide

DAMAGE = (0.0, 0.0, 200.0, 200.0)  # level-0 box whose tiles "cannot be decoded"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("damaged")
    bad = write_synthetic_slide(d / "bad.tiff", 640, 480, mpp=1.0, seed=31, tissue_fraction=0.9)
    good = write_synthetic_slide(d / "good.tiff", 640, 480, mpp=1.0, seed=32, tissue_fraction=0.9)
    nompp = write_synthetic_slide(
        d / "nompp.tiff", 400, 300, mpp=1.0, seed=33, write_mpp=False, tissue_fraction=0.9
    )
    csv_path = d / "cohort.csv"
    csv_path.write_text(f"slide,label\n{bad},tumour\n{good},normal\n")
    return csv_path, bad, good, nompp


@pytest.fixture
def damaged(monkeypatch):
    """``Slide.read`` raises SlideReadError for regions of ``bad.tiff`` touching DAMAGE."""
    calls = {"raised": 0}
    read = Slide.read

    def broken(self, x, y, w, h, *, mpp=None, level=None, downsample=None):
        if self.path.name == "bad.tiff":
            s = mpp / self.mpp[0] if mpp else (downsample or 1.0)
            x0, y0, x1, y1 = DAMAGE
            if x < x1 and x + w * s > x0 and y < y1 and y + h * s > y0:
                calls["raised"] += 1
                raise SlideReadError(f"{self.path.name}: cannot decode tile at ({x}, {y})")
        return read(self, x, y, w, h, mpp=mpp, level=level, downsample=downsample)

    monkeypatch.setattr(Slide, "read", broken)
    return calls


def _in_damage(x, y):
    return x < DAMAGE[2] and y < DAMAGE[3]


def test_patches_skips_and_counts_damaged_regions(pair, damaged, tmp_path, capsys):
    csv_path, bad, good, _ = pair
    out = tmp_path / "db.h5"
    args = ["--mpp", "2", "--size", "32", "--grid", "32", "--min-tissue", "0.1"]
    assert main(["patches", str(csv_path), "--out", str(out), *args]) == 0
    captured = capsys.readouterr()
    with h5py.File(out) as h5:
        counts = json.loads(h5.attrs["damaged_regions"])
        slides = [s.decode() for s in h5["slide"][:]]
        xy = set(zip(h5["x"][:].tolist(), h5["y"][:].tolist(), slides, strict=True))
        assert sorted(json.loads(h5.attrs["completed_slides"])) == sorted([str(bad), str(good)])
    assert counts == {str(bad): damaged["raised"]} and damaged["raised"] > 0
    assert PatchDatabase(out).damaged_regions == counts
    assert not [1 for x, y, s in xy if s == str(bad) and _in_damage(x, y)]
    assert [1 for x, y, s in xy if s == str(good) and _in_damage(x, y)]
    assert f"{bad}: {counts[str(bad)]} patch regions with undecodable pixels" in captured.err
    assert "unreadable patch regions left out in 1 slide " in captured.out
    build = build_patch_databases(
        load_cohort(csv_path), tmp_path / "r.h5", GridPatchSampler(32, 2.0), progress=False
    )
    assert list(build.damaged) == [str(bad)] and build.damaged[str(bad)] > 0
    assert not build.failures


def test_prepare_leaves_damaged_blocks_white_and_counts_them(pair, damaged, tmp_path, monkeypatch):
    _, bad, good, _ = pair
    monkeypatch.setattr("slidestream.data.prepare._BLOCK", 64)
    row = prepare_slide(SlideEntry(bad, "tumour"), tmp_path, 2.0, remove_empty=False)
    assert row["damaged_regions"] >= 1
    meta = json.loads((tmp_path / "bad.json").read_text())
    assert len(meta["damaged_regions_l0"]) == row["damaged_regions"]
    x, y, w, h = meta["damaged_regions_l0"][0]
    assert x < DAMAGE[2] and y < DAMAGE[3]
    clean = prepare_slide(SlideEntry(good, "normal"), tmp_path, 2.0, remove_empty=False)
    assert clean["damaged_regions"] == 0
    for x, y, w, h in meta["damaged_regions_l0"]:
        assert x < DAMAGE[2] and y < DAMAGE[3] and w <= 128 and h <= 128
    dx, dy = meta["mask_downsample"]
    x0, y0 = meta["cols"][0][0] * dx, meta["rows"][0][0] * dy  # level-0 px of the crop's corner
    out = open_slide(tmp_path / "bad.tiff")
    image = out.read_level(0, 0, 0, *out.dimensions)
    white = image.min(-1) > 240
    assert white[: int((DAMAGE[3] - y0) / 2) - 1, : int((DAMAGE[2] - x0) / 2) - 1].all()
    assert white.mean() < 0.5  # only the damaged corner


def test_prepare_fails_a_slide_with_nothing_readable(pair, damaged, tmp_path, monkeypatch):
    _, bad, _, _ = pair
    monkeypatch.setattr(sys.modules[__name__], "DAMAGE", (0.0, 0.0, 1e9, 1e9))
    with pytest.raises(SlideReadError, match="no pixels .* could be decoded"):
        prepare_slide(SlideEntry(bad, "tumour"), tmp_path, 2.0)
    assert not list(tmp_path.glob("*.tiff")) and not list(tmp_path.glob("*.json"))


def test_predict_leaves_out_and_counts_damaged_tiles(pair, damaged, tmp_path):
    _, bad, good, _ = pair
    ckpt = tmp_path / "m.pt"
    save_checkpoint(
        ckpt,
        {
            "kind": "patch",
            "model": {"name": "resnet18", "num_classes": 2},
            "state_dict": torchvision.models.resnet18(num_classes=2).state_dict(),
            "classes": ["normal", "tumour"],
            "mpp": 2.0,
            "patch_size": 32,
        },
    )
    pred = PatchPredictor(ckpt, workers=0, min_tissue=0.1)
    res = pred.predict(bad, tmp_path / "out")
    assert res.damaged == damaged["raised"] > 0 and res.tiles > 0
    rows = list(csv.DictReader((tmp_path / "out" / "bad.tiles.csv").read_text().splitlines()))
    assert len(rows) == res.tiles
    grid = np.load(tmp_path / "out" / "bad.heatmap.npy")
    assert np.isfinite(grid[0]).sum() == res.tiles and np.isnan(grid[0, 0, 0])
    code = main(
        [
            "predict",
            str(ckpt),
            str(bad),
            str(good),
            "--out",
            str(tmp_path / "cli"),
            "--workers",
            "0",
            "--min-tissue",
            "0.1",
        ]
    )
    assert code == 0
    table = {
        r["slide"]: r
        for r in csv.DictReader((tmp_path / "cli" / "predictions.csv").read_text().splitlines())
    }
    assert table[str(bad)]["damaged_tiles"] == str(res.damaged)
    assert table[str(good)]["damaged_tiles"] == "0"


def test_missing_mpp_hint_names_slide_mpp_and_the_flag_works(pair, tmp_path, capsys):
    _, _, good, nompp = pair
    args = ["--mpp", "2", "--size", "32", "--random", "3", "--min-tissue", "0.1"]
    assert main(["patches", str(nompp), "--out", str(tmp_path / "a.h5"), *args]) == 1
    err = capsys.readouterr().err
    assert "--slide-mpp" in err and "mpp column" in err and "Traceback" not in err
    code = main(["patches", str(nompp), "--out", str(tmp_path / "b.h5"), *args, "--slide-mpp", "1"])
    assert code == 0
    with h5py.File(tmp_path / "b.h5") as h5:
        assert h5["images"].shape[0] == 3
    assert main(["prepare", str(nompp), "--mpp", "4", "--out", str(tmp_path / "p")]) == 1
    assert "--slide-mpp" in capsys.readouterr().err
    code = main(
        ["prepare", str(nompp), "--mpp", "4", "--out", str(tmp_path / "p"), "--slide-mpp", "1"]
    )
    assert code == 0
    rows = list(csv.DictReader((tmp_path / "p" / "prepared.csv").read_text().splitlines()))
    assert len(rows) == 1 and int(rows[0]["width"]) <= 100  # 400 px at 1 µm/px -> 4 µm/px


def test_preview_missing_mpp_hint_and_slide_mpp(pair, tmp_path, capsys):
    _, _, good, nompp = pair
    args = ["patches-preview", str(nompp), str(good), "--mpp", "2", "--size", "32", "--n", "4"]
    assert main([*args, "--out", str(tmp_path / "a"), "--min-tissue", "0.1"]) == 1
    err = capsys.readouterr().err
    assert f"{nompp}: no microns-per-pixel" in err and "--slide-mpp" in err
    code = main([*args, "--out", str(tmp_path / "b"), "--min-tissue", "0.1", "--slide-mpp", "1"])
    assert code == 0 and len(list((tmp_path / "b").glob("*.locations.png"))) == 2
