"""MIL bags that can go wrong: same stems, empty and one-patch bags, NaN/Inf, damaged files,
mixed encoders, missing files, one class, huge bags. Each is trained on, skipped and named, or
refused in one line naming the file."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest

from slidestream.data.feature_folder import FeatureFolder
from slidestream.data.features import FeatureBags, read_features, write_features
from slidestream.infer.features import FeatureExtractor, extract_cohort
from slidestream.sampling import load_cohort
from slidestream.sampling.naming import path_hash
from slidestream.synthetic import write_synthetic_slide
from slidestream.train.mil_config import MILTrainConfig

ATTRS = {"encoder": "mean_rgb", "weights_hash": "abc123", "mpp": 2.0, "size": 32}


def _mean_rgb():
    return FeatureExtractor("mean_rgb", mpp=2.0, size=32, workers=0, device="cpu")


@pytest.fixture(scope="module")
def same_stem(tmp_path_factory: pytest.TempPathFactory):
    """case1/HE.tiff and case2/HE.tiff (different slides) and other.tiff, in a cohort CSV."""
    d = tmp_path_factory.mktemp("stems")
    paths = [
        write_synthetic_slide(d / "case1" / "HE.tiff", 512, 512, mpp=1.0, seed=1),
        write_synthetic_slide(d / "case2" / "HE.tiff", 512, 512, mpp=1.0, seed=2, tumour=True),
        write_synthetic_slide(d / "other.tiff", 512, 512, mpp=1.0, seed=3),
    ]
    labels = ["normal", "tumour", "normal"]
    rows = "".join(f"{p},{lab}\n" for p, lab in zip(paths, labels, strict=True))
    (d / "c.csv").write_text("slide,label\n" + rows)
    return d, paths


def test_same_stem_slides_get_distinct_files_mapped_back(same_stem, tmp_path):
    d, paths = same_stem
    cohort = load_cohort(d / "c.csv")
    for shard in ((0, 2), (1, 2)):  # shards agree on the names
        extract_cohort(cohort, tmp_path, _mean_rgb(), shard)
    names = sorted(p.name for p in tmp_path.glob("*.h5"))
    hashed = [f"HE-{path_hash(p)}.h5" for p in paths[:2]]
    assert names == sorted([*hashed, "other.h5"])
    folder = FeatureFolder(tmp_path)
    feats = []
    for path, name in zip(paths, [*hashed, "other.h5"], strict=True):
        found, why = folder.find(path)
        assert found == tmp_path / name and not why
        f, _, attrs = read_features(found)
        assert attrs["source"] == str(path.resolve())
        feats.append(f)
    assert not np.array_equal(feats[0], feats[1])  # two different slides, two different bags
    index = [
        row
        for i in (0, 1)
        for row in csv.DictReader((tmp_path / f"index.{i}of2.csv").read_text().splitlines())
    ]
    assert {r["slide"]: r["file"] for r in index} == {
        str(p): n for p, n in zip(paths, [*hashed, "other.h5"], strict=True)
    }
    # a training cohort with only one of the two finds its own file
    only = tmp_path / "only2.csv"
    only.write_text(f"slide,label\n{paths[1]},tumour\n{paths[2]},normal\n")
    bags = FeatureBags(load_cohort(only).slides, tmp_path, [np.zeros(1)] * 2)
    assert bags.files == [tmp_path / hashed[1], tmp_path / "other.h5"]


def _old_file(path, slide, rows=3, dim=6, **attrs):
    """A feature file as older versions wrote it: no ``source`` attribute."""
    with h5py.File(path, "w") as f:
        f["features"] = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
        f["coords"] = np.zeros((rows, 2), np.int64)
        for k, v in {**ATTRS, "slide": str(slide), **attrs}.items():
            f.attrs[k] = v


def test_old_plain_stem_files_found_foreign_ones_refused(same_stem, tmp_path):
    d, paths = same_stem
    _old_file(tmp_path / "HE.h5", paths[0])
    folder = FeatureFolder(tmp_path)
    assert folder.find(paths[0]) == (tmp_path / "HE.h5", "")  # backward compatible
    found, why = folder.find(paths[1])  # case2/HE is not the slide of HE.h5
    assert found is None and "HE.h5 holds the features of" in why and "case1" in why
    # extracting case2 alone keeps case1's HE.h5 and writes its own hashed file
    only = tmp_path / "only2.csv"
    only.write_text(f"slide,label\n{paths[1]},tumour\n")
    before = (tmp_path / "HE.h5").read_bytes()
    extract_cohort(load_cohort(only), tmp_path, _mean_rgb())
    assert (tmp_path / "HE.h5").read_bytes() == before
    assert (tmp_path / f"HE-{path_hash(paths[1])}.h5").is_file()


def test_files_of_moved_slides_are_matched_by_their_folders(same_stem, tmp_path):
    d, paths = same_stem
    _old_file(tmp_path / "HE-00000001.h5", "/gone/proj/case1/HE.tiff")
    _old_file(tmp_path / "HE-00000002.h5", "/gone/proj/case2/HE.tiff")
    folder = FeatureFolder(tmp_path)
    assert folder.find(paths[0])[0] == tmp_path / "HE-00000001.h5"
    assert folder.find(paths[1])[0] == tmp_path / "HE-00000002.h5"
    _old_file(tmp_path / "HE-00000003.h5", "/gone/other/case2/HE.tiff")
    found, why = FeatureFolder(tmp_path).find(paths[1])  # two equally good matches
    assert found is None and "could both be" in why


def _bag(folder, name, rows, dim=6, seed=0, **attrs):
    feats = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    coords = np.arange(2 * rows, dtype=np.int64).reshape(rows, 2) * 32
    write_features(folder / f"{name}.h5", feats, coords, {**ATTRS, "slide": name, **attrs})
    return folder / f"{name}.h5"


def _cohort(tmp_path, names, labels=None):
    """Placeholder slide files (train-mil only needs them to exist) and a cohort CSV."""
    (tmp_path / "slides").mkdir(exist_ok=True)
    rows = []
    for i, name in enumerate(names):
        (tmp_path / "slides" / f"{name}.tiff").write_bytes(b"")
        label = labels[i] if labels else ("tumour" if i % 2 else "normal")
        rows.append(f"slides/{name}.tiff,{label}")
    (tmp_path / "c.csv").write_text("slide,label\n" + "\n".join(rows) + "\n")
    return tmp_path / "c.csv"


def _cfg(tmp_path, **kw):
    base = dict(
        data=str(tmp_path / "c.csv"),
        features=str(tmp_path / "f"),
        epochs=2,
        hidden=16,
        out=str(tmp_path / "runs"),
        name="run",
        device="cpu",
    )
    return MILTrainConfig(**{**base, **kw})
