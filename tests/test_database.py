from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from PIL import Image

import slidestream as ss
from slidestream.cli import main
from slidestream.data.database import build_patch_databases, build_tile_database
from slidestream.data.hdf5 import PatchDatabase, PatchDatabaseWriter
from slidestream.io import open_slide
from slidestream.sampling import (
    GridPatchSampler,
    RandomPatchSampler,
    SlideEntry,
    load_cohort,
    parse_split,
    split_by_patient,
)


@pytest.fixture(scope="module")
def cohort(slides, tmp_path_factory):
    csv = tmp_path_factory.mktemp("dbcohort") / "cohort.csv"
    rows = [
        ("pyramid", "tumour", "p1"),
        ("odd", "normal", "p2"),
        ("small", "normal", "p2"),
        ("tumour2", "tumour", "p3"),
        ("aperio", "normal", "p4"),
    ]
    csv.write_text(
        "slide,label,patient\n" + "".join(f"{slides[n]},{lab},{p}\n" for n, lab, p in rows)
    )
    return load_cohort(csv)


def test_split_by_patient_is_disjoint_stratified_and_seeded():
    entries = [SlideEntry(f"/s{i}.svs", label="ab"[i % 2], patient=f"p{i // 2}") for i in range(40)]
    a = split_by_patient(entries, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=1)
    b = split_by_patient(entries, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=1)
    c = split_by_patient(entries, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=2)
    assert a == b and a != c
    patients = {k: {e.patient for e in v} for k, v in a.items()}
    assert not (patients["train"] & patients["val"]) and not (patients["val"] & patients["test"])
    assert sum(len(v) for v in a.values()) == 40
    assert parse_split("train=0.7,val=0.3") == {"train": 0.7, "val": 0.3}
    with pytest.raises(ss.ConfigError, match="sum to 1"):
        parse_split("train=0.7,val=0.7")


def test_database_layout_counts_and_reader(cohort, tmp_path):
    sampler = GridPatchSampler(64, mpp=2.0, min_tissue=0.5)
    build = build_patch_databases(
        cohort,
        tmp_path / "db.h5",
        sampler,
        split={"train": 0.5, "val": 0.5},
        seed=0,
        progress=False,
    )
    assert set(build.files) == {"train", "val"} and not build.failures
    seen_patients = []
    for name, path in build.files.items():
        with h5py.File(path, "r") as h5:
            n = h5["images"].shape[0]
            assert n == build.patches[name] > 0
            assert h5["images"].dtype == np.uint8 and h5["images"].shape[1:] == (64, 64, 3)
            assert h5["images"].chunks == (1, 64, 64, 3) and h5["images"].compression == "gzip"
            assert {k for k in h5} == {"images", "label", "slide", "patient", "x", "y", "mpp"}
            classes = json.loads(h5.attrs["classes"])
            counts = json.loads(h5.attrs["class_counts"])
            labels = h5["label"][:]
            assert classes == ["normal", "tumour"]
            assert counts == {c: int((labels == i).sum()) for i, c in enumerate(classes)}
            assert h5.attrs["split"] == name and json.loads(h5.attrs["params"])["size"] == 64
            seen_patients.append({p.decode() for p in h5["patient"][:]})
            slide0, x0, y0 = h5["slide"][0].decode(), int(h5["x"][0]), int(h5["y"][0])
            np.testing.assert_array_equal(
                h5["images"][0], open_slide(slide0).read(x0, y0, 64, 64, mpp=2.0)
            )
        ds = PatchDatabase(path)
        item = ds[0]
        assert item["image"].shape == (3, 64, 64) and len(ds) == n
    assert not (seen_patients[0] & seen_patients[1])


def test_database_is_reproducible_and_resumable(cohort, tmp_path):
    sampler = RandomPatchSampler(32, mpp=2.0, replacement=False)
    a = build_patch_databases(
        cohort, tmp_path / "a.h5", sampler, per_slide=6, seed=3, progress=False
    )
    b = build_patch_databases(
        cohort, tmp_path / "b.h5", sampler, per_slide=6, seed=3, progress=False
    )
    with h5py.File(a.files["all"]) as fa, h5py.File(b.files["all"]) as fb:
        np.testing.assert_array_equal(fa["x"][:], fb["x"][:])
        np.testing.assert_array_equal(fa["images"][:], fb["images"][:])
        n = fa["images"].shape[0]
    again = build_patch_databases(
        cohort, tmp_path / "a.h5", sampler, per_slide=6, seed=3, progress=False
    )
    assert again.skipped == len(cohort) and again.patches["all"] == 0
    # a crash mid-slide leaves rows past the commit point: they are dropped on resume
    with h5py.File(a.files["all"], "a") as h5:
        for k in ("images", "label", "slide", "patient", "x", "y", "mpp"):
            h5[k].resize(n + 5, axis=0)
        assert int(h5.attrs["n_committed"]) == n
    writer = PatchDatabaseWriter(a.files["all"], 32, cohort.classes, "all")
    assert len(writer.completed) == len(cohort)
    writer.close()
    with h5py.File(a.files["all"]) as h5:
        assert h5["images"].shape[0] == n


def test_tile_folder_database(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "tiles" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                tmp_path / "tiles" / cls / f"{i}.png"
            )
    build = build_tile_database(tmp_path / "tiles", tmp_path / "t.h5", 32)
    ds = PatchDatabase(build.files["all"])
    assert len(ds) == 10 and ds.classes == ["a", "b"] and ds.class_counts == {"a": 5, "b": 5}
    assert ds[0]["image"].shape == (3, 32, 32)


def test_patches_cli(cohort, tmp_path, capsys):
    out = tmp_path / "db.h5"
    code = main(
        [
            "patches",
            cohort.source,
            "--out",
            str(out),
            "--mpp",
            "2.0",
            "--size",
            "32",
            "--random",
            "4",
            "--split",
            "train=0.5,val=0.5",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "train:" in text and (tmp_path / "db.train.h5").exists()
    assert (
        main(
            [
                "patches",
                cohort.source,
                "--out",
                str(out),
                "--mpp",
                "2.0",
                "--size",
                "32",
                "--random",
                "4",
                "--split",
                "train=0.5,val=0.5",
            ]
        )
        == 0
    )
    assert "already in the database" in capsys.readouterr().out


def test_database_from_real_svs_and_generated_slides(shared_data, slides, tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_text(
        f"slide,label,patient\n{shared_data / 'cmu_small_region.svs'},skin,pA\n"
        f"{slides['pyramid']},synthetic,pB\n{slides['small']},synthetic,pC\n"
    )
    build = build_patch_databases(
        load_cohort(csv_path),
        tmp_path / "db.h5",
        GridPatchSampler(64, mpp=2.0, min_tissue=0.5),
        split={"train": 0.5, "val": 0.5},
        seed=1,
        progress=False,
    )
    patients = []
    for path in build.files.values():
        with h5py.File(path, "r") as h5:
            labels = h5["label"][:]
            counts = json.loads(h5.attrs["class_counts"])
            assert counts == {
                "skin": int((labels == 0).sum()),
                "synthetic": int((labels == 1).sum()),
            }
            patients.append({p.decode() for p in h5["patient"][:]})
    assert not (patients[0] & patients[1])
    assert sum(build.patches.values()) > 40
