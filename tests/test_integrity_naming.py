"""Outputs named after slides are unique per source path and map back to it (issue #18.1)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torchvision

from slidestream.cli import main
from slidestream.data.prepare import prepare_cohort
from slidestream.io import open_slide
from slidestream.models.checkpoint import save_checkpoint
from slidestream.sampling import GridPatchSampler, load_cohort
from slidestream.sampling.naming import output_stems, path_hash
from slidestream.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """``slides/s0.tiff`` (normal) and ``other/s0.tiff`` (tumour): same name, other pixels."""
    d = tmp_path_factory.mktemp("twins")
    a = write_synthetic_slide(d / "slides" / "s0.tiff", 700, 500, mpp=1.0, seed=11)
    b = write_synthetic_slide(d / "other" / "s0.tiff", 600, 600, mpp=1.0, seed=12, tumour=True)
    c = write_synthetic_slide(d / "slides" / "s1.tiff", 500, 400, mpp=1.0, seed=13)
    csv_path = d / "cohort.csv"
    csv_path.write_text(f"slide,label\n{a},normal\n{b},tumour\n{c},normal\n")
    return csv_path, a, b, c


def test_output_stems_unique_stable_and_plain_when_possible(tmp_path):
    paths = [tmp_path / "x" / "HE.svs", tmp_path / "y" / "HE.svs", tmp_path / "y" / "he.tiff"]
    paths.append(tmp_path / "z" / "other.svs")
    stems = output_stems(paths)
    assert len(set(s.casefold() for s in stems)) == 4  # also apart on case-insensitive disks
    assert stems[3] == "other"
    assert stems[0] == f"HE-{path_hash(paths[0])}" and stems[2].startswith("he-")
    assert output_stems(paths) == stems  # stable across runs
    assert output_stems(list(reversed(paths))) == list(reversed(stems))  # not order-dependent
    assert output_stems([paths[0], paths[0]]) == ["HE", "HE"]  # one file twice is one stem


def test_prepare_keeps_both_slides_with_the_same_name(twins, tmp_path):
    csv_path, a, b, _ = twins
    out = tmp_path / "prep"
    res = prepare_cohort(load_cohort(csv_path), out, 2.0, workers=1, progress=False)
    assert not res.failures and len(res.rows) == 3
    rows = list(csv.DictReader((out / "prepared.csv").read_text().splitlines()))
    by_source = {r["source"]: r for r in rows}
    assert set(by_source) == {str(a.resolve()), str(b.resolve()), str(twins[3].resolve())}
    assert len({r["slide"] for r in rows}) == 3
    assert by_source[str(b.resolve())]["label"] == "tumour"
    assert by_source[str(a.resolve())]["label"] == "normal"
    # each output holds its own source's pixels (the sizes differ, and so do the images)
    for src in (a, b):
        row = by_source[str(src.resolve())]
        prepared = open_slide(out / row["slide"])
        meta = json.loads((out / row["slide"]).with_suffix(".json").read_text())
        assert meta["row"]["source"] == str(src.resolve())
        w0, h0 = open_slide(src).dimensions
        assert prepared.dimensions[0] <= w0 // 2 + 1 and prepared.dimensions[1] <= h0 // 2 + 1
    assert by_source[str(a.resolve())]["slide"] != by_source[str(b.resolve())]["slide"]
    # a re-run finds every output under the same name
    again = prepare_cohort(load_cohort(csv_path), out, 2.0, workers=1, progress=False)
    assert again.skipped == 3
    # an output of another source under the same stem is not taken for this slide's
    alone = tmp_path / "alone.csv"
    alone.write_text(f"slide,label\n{a},normal\n")
    prepare_cohort(load_cohort(alone), tmp_path / "p2", 2.0, workers=1, progress=False)
    alone.write_text(f"slide,label\n{b},tumour\n")
    res2 = prepare_cohort(load_cohort(alone), tmp_path / "p2", 2.0, workers=1, progress=False)
    assert res2.skipped == 0 and res2.rows[0]["source"] == str(b.resolve())


def test_predict_writes_one_set_of_outputs_per_slide(twins, tmp_path):
    csv_path, a, b, _ = twins
    ckpt = tmp_path / "m.pt"
    model = torchvision.models.resnet18(num_classes=2)
    save_checkpoint(
        ckpt,
        {
            "kind": "patch",
            "model": {"name": "resnet18", "num_classes": 2},
            "state_dict": model.state_dict(),
            "classes": ["normal", "tumour"],
            "mpp": 4.0,
            "patch_size": 32,
        },
    )
    out = tmp_path / "pred"
    code = main(["predict", str(ckpt), str(csv_path), "--out", str(out), "--workers", "0"])
    assert code == 0
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    assert len(rows) == 3 and len({r["stem"] for r in rows}) == 3
    by_slide = {r["slide"]: r for r in rows}
    for src in (a, b):
        r = by_slide[str(src)]
        assert r["stem"] != "s0" and r["damaged_tiles"] == "0"
        for suffix in (".tiles.csv", ".heatmap.npy", ".heatmap.png", ".geojson"):
            assert (out / f"{r['stem']}{suffix}").is_file()
        tiles = (out / f"{r['stem']}.tiles.csv").read_text().splitlines()
        assert len(tiles) - 1 == int(r["tiles"])
        grid = np.load(out / f"{r['stem']}.heatmap.npy")
        sampler = GridPatchSampler(32, 4.0, cover_edges=True)  # as predict: partial edges too
        assert grid.shape[1:] == sampler.grid_shape(open_slide(src))
    assert by_slide[str(twins[3])]["stem"] == "s1"


def test_tissue_and_preview_keep_both(twins, tmp_path):
    _, a, b, _ = twins
    assert main(["tissue", str(a), str(b), "--out", str(tmp_path / "t")]) == 0
    jsons = sorted((tmp_path / "t").glob("*.tissue.json"))
    assert len(jsons) == 2
    assert {json.loads(p.read_text())["slide"] for p in jsons} == {str(a), str(b)}
    out = tmp_path / "prev"
    args = ["patches-preview", str(a), str(b), "--mpp", "2.0", "--size", "32", "--n", "8"]
    assert main([*args, "--out", str(out)]) == 0
    assert len(list(out.glob("*.locations.png"))) == 2
    rows = list(csv.DictReader((out / "patches.csv").read_text().splitlines()))
    assert {r["slide"] for r in rows} == {str(a), str(b)}
    for r in rows:
        assert (out / r["locations"]).is_file()
