"""MIL bags that can go wrong: same stems, empty and one-patch bags, NaN/Inf, damaged files,
mixed encoders, missing files, one class, huge bags. Each is trained on, skipped and named, or
refused in one line naming the file."""

from __future__ import annotations

import csv
import json
import logging
import re

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import slidestream as ss
from slidestream.data.feature_folder import FeatureFolder
from slidestream.data.features import FeatureBags, read_features, value_sums, write_features
from slidestream.infer.features import FeatureExtractor, extract_cohort
from slidestream.models.mil import AGGREGATORS, MILModel, MILSpec
from slidestream.sampling import load_cohort
from slidestream.sampling.naming import path_hash
from slidestream.synthetic import write_synthetic_slide
from slidestream.train.mil import train_mil
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
    slide = folder.parent / "slides" / f"{name}.tiff"
    write_features(folder / f"{name}.h5", feats, coords, {**ATTRS, "slide": str(slide), **attrs})
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


def _raw(path, feats, coords, **attrs):
    """An HDF5 file written without write_features' checks (what a broken tool could leave)."""
    with h5py.File(path, "w") as f:
        if feats is not None:
            f["features"] = feats
        f["coords"] = coords
        slide = path.parent.parent / "slides" / f"{path.stem}.tiff"
        for k, v in {**ATTRS, "slide": str(slide), **attrs}.items():
            f.attrs[k] = v


def _bad_bags(f):
    """One of each kind of bad bag in folder ``f``: {slide name: what its message names}."""
    _bag(f, "empty", 0)
    nan = np.ones((5, 6), np.float32)
    nan[2] = np.nan
    _raw(f / "nanrows.h5", nan, np.zeros((5, 2), np.int64))
    _raw(f / "inf.h5", np.full((4, 6), np.inf, np.float32), np.zeros((4, 2), np.int64))
    _raw(f / "nofeat.h5", None, np.zeros((4, 2), np.int64))
    _raw(f / "short.h5", np.ones((4, 6), np.float32), np.zeros((3, 2), np.int64))
    _raw(f / "flat.h5", np.ones(4, np.float32), np.zeros((4, 2), np.int64))  # not (N, D)
    whole = _bag(f, "trunc", 50).read_bytes()
    (f / "trunc.h5").write_bytes(whole[: len(whole) // 2])
    names = ["empty", "nanrows", "inf", "nofeat", "short", "flat", "trunc", "missing"]
    return {n: ("missing.h5" if n == "missing" else f"{n}.h5") for n in names}


def test_train_mil_skips_and_names_every_bad_bag(tmp_path, caplog):
    f = tmp_path / "f"
    good = [f"g{i}" for i in range(6)] + ["one"]
    for i, name in enumerate(good):
        _bag(f, name, 1 if name == "one" else 20 + i, seed=i)
    bad = _bad_bags(f)
    names = good + list(bad)
    _cohort(tmp_path, names, ["normal", "tumour"] * 3 + ["tumour"] + ["normal"] * len(bad))
    with caplog.at_level(logging.WARNING, "slidestream.train.mil"):
        run = train_mil(_cfg(tmp_path, model="abmil"))
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert len(rows) == 2 and all(np.isfinite(float(r["train_loss"])) for r in rows)
    skipped = json.loads((run / "summary.json").read_text())["skipped_slides"]
    by_name = {k.rsplit("/", 1)[-1].removesuffix(".tiff"): v for k, v in skipped.items()}
    assert set(by_name) == set(bad)
    for name, file in bad.items():
        assert file in by_name[name], (name, by_name[name])
    assert "empty bag" in by_name["empty"] and "NaN/Inf" in by_name["nanrows"]
    assert "1 of 5 rows" in by_name["nanrows"] and "damaged" in by_name["trunc"]
    text = caplog.text
    assert "left out 1 of 15 training slides without a feature file" in text
    assert "left out 1 of 15 training slides with an empty bag" in text
    assert "left out 6 of 15 training slides with an unreadable or NaN/Inf" in text


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_a_bag_of_one_patch_trains_with_every_aggregator(aggregator):
    torch.manual_seed(0)
    model = MILModel(MILSpec(in_dim=6, outputs=2, aggregator=aggregator, hidden=16))
    model.set_standardization(torch.zeros(6), torch.zeros(6))  # one instance: std 0
    logits, att = model.forward_attention(torch.randn(1, 6))
    assert torch.isfinite(logits).all() and att.tolist() == [1.0]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([1]))
    loss.backward()
    assert torch.isfinite(loss) and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )


def test_statistics_stay_finite_and_huge_bags_are_read_in_part(tmp_path):
    f = tmp_path / "f"
    _bag(f, "big", 5000, seed=1)
    _raw(f / "nan.h5", np.full((3, 6), np.nan, np.float32), np.zeros((3, 2), np.int64))
    const = np.ones((4, 6), np.float32)
    slide = str(tmp_path / "slides" / "const.tiff")
    write_features(f / "const.h5", const, np.zeros((4, 2)), {**ATTRS, "slide": slide})
    _cohort(tmp_path, ["big", "nan", "const"])
    entries = load_cohort(tmp_path / "c.csv").slides
    bags = FeatureBags(entries, f, [np.zeros(1)] * 3, train=True, max_instances=16)
    assert [e.path.stem for e in bags.entries] == ["big", "const"] and "nan" in str(bags.skipped)
    mean, std = bags.statistics()
    full = np.concatenate([read_features(f / "big.h5")[0], const]).astype(np.float64)
    np.testing.assert_allclose(mean, full.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, full.std(0), rtol=1e-4)
    total, sq, n = value_sums(f / "big.h5", chunk=7)  # chunked == whole
    np.testing.assert_allclose(total, full[:5000].sum(0), rtol=1e-9)
    assert n == 5000
    item = bags[0]
    assert item["features"].shape == (16, 6)
    rows = np.sort(np.random.default_rng((0, 0, 0)).choice(5000, 16, replace=False))
    np.testing.assert_array_equal(item["features"].numpy(), full[:5000][rows].astype(np.float32))
    assert len(bags[1]["features"]) == 4  # small bags whole


def test_write_refuses_float16_overflow_naming_the_fix(tmp_path):
    feats = np.full((2, 3), np.inf, np.float16)  # what 1e6 becomes in float16
    with pytest.raises(ss.ConfigError, match=r"x\.h5.*--dtype float32"):
        write_features(tmp_path / "x.h5", feats, np.zeros((2, 2)), {"slide": "x"})


@pytest.mark.parametrize(
    ("odd", "named"),
    [
        ({"encoder": "resnet18"}, "encoder resnet18 (not mean_rgb)"),
        ({"weights_hash": "fff000"}, "weights_hash fff000 (not abc123)"),
        ({"mpp": 0.5}, "mpp 0.5 (not 2.0)"),
        ({"size": 224}, "size 224 (not 32)"),
        ({"dim": 8}, "dim 8 (not 6)"),
    ],
)
def test_a_file_of_other_settings_is_refused_before_epoch_one(tmp_path, odd, named):
    f = tmp_path / "f"
    for i in range(5):
        _bag(f, f"g{i}", 10, seed=i)
    dim = odd.pop("dim", 6)
    _bag(f, "odd", 10, dim=dim, **odd)
    _cohort(tmp_path, [f"g{i}" for i in range(5)] + ["odd"])
    with pytest.raises(ss.ConfigError, match=re.escape(f"odd.h5 was made with {named},")):
        train_mil(_cfg(tmp_path))
    assert not (tmp_path / "runs" / "run" / "last.pt").exists()


def test_validation_files_must_match_the_training_files(tmp_path):
    f = tmp_path / "f"
    for i in range(4):
        _bag(f, f"g{i}", 10, seed=i)
    _bag(f, "v0", 10)
    _bag(f, "v1", 10, encoder="uni")  # only validation bag of another encoder
    _cohort(tmp_path, ["g0", "g1", "g2", "g3", "v0", "v1"])
    lines = (tmp_path / "c.csv").read_text().splitlines()
    split = ["train"] * 4 + ["val"] * 2
    rows = [f"{line},{s}" for line, s in zip(lines[1:], split, strict=True)]
    (tmp_path / "c.csv").write_text("slide,label,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(ss.ConfigError, match=r"v1\.h5 was made with encoder uni"):
        train_mil(_cfg(tmp_path))


def test_cohorts_without_a_usable_bag_or_a_second_class_are_refused(tmp_path):
    f = tmp_path / "f"
    _cohort(tmp_path, ["a", "b"])
    with pytest.raises(ss.ConfigError, match=r"no feature files .*a\.h5"):
        train_mil(_cfg(tmp_path))  # every file missing
    _bag(f, "a", 0)
    _bag(f, "b", 0)
    with pytest.raises(ss.ConfigError, match="every one of the 2 training bags .* is empty"):
        train_mil(_cfg(tmp_path))
    (f / "b.h5").write_bytes(b"not hdf5")
    _cohort(tmp_path, ["a", "b", "c"])  # empty, damaged, missing
    with pytest.raises(
        ss.ConfigError, match=r"1 missing, 1 empty, 1 unreadable .*a\.h5 is an empty bag"
    ):
        train_mil(_cfg(tmp_path))
    _bag(f, "a", 5)
    _bag(f, "b", 5)
    _bag(f, "c", 0)  # the only other class is an empty bag
    _cohort(tmp_path, ["a", "b", "c"], ["normal", "normal", "tumour"])
    with pytest.raises(ss.ConfigError, match="all have the label 'normal'.*two classes"):
        train_mil(_cfg(tmp_path))


def test_extraction_writes_empty_bags_with_a_reason_and_redoes_damaged_files(tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((256, 256, 3), 245, np.uint8)).save(blank)
    tissue = write_synthetic_slide(tmp_path / "t.tiff", 512, 512, mpp=1.0, seed=4)
    ex = FeatureExtractor("mean_rgb", mpp=None, size=32, workers=0, device="cpu")
    cohort = load_cohort([blank, tissue])
    report = extract_cohort(cohort, tmp_path / "f", ex)
    assert report.empty == [str(blank)] and not report.failed
    feats, coords, attrs = read_features(tmp_path / "f" / "blank.h5")
    assert feats.shape[0] == 0 and coords.shape == (0, 2) and "tissue" in attrs["reason"]
    index = (tmp_path / "f" / "index.0of1.csv").read_text()
    assert f"{blank},blank.h5,0,empty," in index and f"{tissue},t.h5," in index
    good = (tmp_path / "f" / "t.h5").read_bytes()
    (tmp_path / "f" / "t.h5").write_bytes(good[:100])  # truncated (e.g. a broken copy)
    again = extract_cohort(cohort, tmp_path / "f", ex)
    assert again.written == [str(tissue)] and again.skipped == [str(blank)]
    (tmp_path / "copy.h5").write_bytes(good)
    np.testing.assert_array_equal(
        read_features(tmp_path / "f" / "t.h5")[0], read_features(tmp_path / "copy.h5")[0]
    )


def test_predict_finds_each_same_stem_file_and_refuses_other_settings(same_stem, tmp_path, capsys):
    from slidestream.cli import main

    d, paths = same_stem
    feats = tmp_path / "f"
    extract_cohort(load_cohort(d / "c.csv"), feats, _mean_rgb())
    run = train_mil(_cfg(tmp_path, data=str(d / "c.csv"), features=str(feats), epochs=1))
    out = tmp_path / "pred"
    args = ["predict", str(run / "last.pt"), *map(str, paths[:2]), "--features", str(feats)]
    assert main([*args, "--out", str(out), "--device", "cpu", "--workers", "0"]) == 0
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    for row, path in zip(rows, paths[:2], strict=True):
        stored = feats / f"HE-{path_hash(path)}.h5"
        assert row["stem"] == stored.stem and int(row["tiles"]) == len(read_features(stored)[0])
    capsys.readouterr()
    odd = feats / f"HE-{path_hash(paths[1])}.h5"
    with h5py.File(odd, "a") as f:
        f.attrs["encoder"] = "resnet18"
    assert main([*args, "--out", str(tmp_path / "p2"), "--device", "cpu", "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert f"{odd.name} was made with encoder resnet18 (not mean_rgb)" in err
    assert f"HE-{path_hash(paths[0])}" in (tmp_path / "p2" / "predictions.csv").read_text()


def test_transmil_matches_multihead_attention_without_a_t_by_t_matrix():
    import subprocess
    import sys

    from slidestream.models.mil import _Block

    torch.manual_seed(0)
    block = _Block(32, 4, 0.0).eval()
    x = torch.randn(1, 50, 32)
    y = block.norm1(x)
    out, weights = block.attn(y, y, y, need_weights=True, average_attn_weights=True)
    expect = x + out
    expect = expect + block.mlp(block.norm2(expect))
    got, att = block(x)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(att, weights[0, 0], rtol=1e-5, atol=1e-6)
    # 6,000 instances: (T, T) attention per head would add > 500 MB (measured here: ~30 MB)
    code = (
        "import resource, torch\n"
        "from slidestream.models.mil import MILModel, MILSpec\n"
        "m = MILModel(MILSpec(in_dim=8, outputs=2, aggregator='transmil', hidden=32)).eval()\n"
        "bag = torch.randn(6000, 8)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "with torch.no_grad():\n"
        "    att = m.forward_attention(bag)[1]\n"
        "grow = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024\n"
        "print(grow, float(att.sum()))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grow, total = map(float, res.stdout.split())
    assert grow < 250 and abs(total - 1) < 1e-4, res.stdout


def test_cli_counts_left_out_slides_and_regression_refuses_nan_labels(tmp_path, capsys):
    from pathlib import Path

    from slidestream.cli import main
    from slidestream.sampling.cohort import SlideEntry
    from slidestream.train.mil import target_of

    f = tmp_path / "f"
    for i in range(4):
        _bag(f, f"g{i}", 8, seed=i)
    _bag(f, "e", 0)
    _cohort(tmp_path, ["g0", "g1", "g2", "g3", "e", "gone"])
    flags = ["--data", str(tmp_path / "c.csv"), "--features", str(f), "--epochs", "1"]
    flags += ["--hidden", "16", "--out", str(tmp_path / "runs"), "--device", "cpu"]
    assert main(["train-mil", *flags]) == 0
    assert "2 slides left out (missing, empty or damaged bags" in capsys.readouterr().out
    for bad in ("nan", "inf", "x"):
        with pytest.raises(ss.ConfigError, match=r"line 3\): regression needs finite numbers"):
            target_of("regression", [], SlideEntry(Path("a.tiff"), bad, line=3))


def test_an_encoder_giving_nan_fails_that_slide_only_and_the_index_says_so(
    same_stem, tmp_path, monkeypatch
):
    d, paths = same_stem
    ex = _mean_rgb()
    encode = ex.encode

    def nan_for_other(slide, xy):
        feats = encode(slide, xy)
        return feats * np.nan if "other" in str(slide.path) else feats

    monkeypatch.setattr(ex, "encode", nan_for_other)
    report = extract_cohort(load_cohort(d / "c.csv"), tmp_path, ex)
    assert list(report.failed) == [str(paths[2])] and len(report.written) == 2
    assert "other.h5" in report.failed[str(paths[2])] and "NaN/Inf" in report.failed[str(paths[2])]
    assert not (tmp_path / "other.h5").exists()
    monkeypatch.setattr(ex, "encode", encode)
    extract_cohort(load_cohort(d / "c.csv"), tmp_path, ex)  # resume: the two done, other written
    rows = list(csv.DictReader((tmp_path / "index.0of1.csv").read_text().splitlines()))
    assert [r["status"] for r in rows] == ["skipped", "skipped", "written"]
    for row in rows:
        assert int(row["patches"]) == len(read_features(tmp_path / row["file"])[0]) > 0


def test_a_file_removed_after_the_check_is_skipped_not_a_crash(tmp_path):
    f = tmp_path / "f"
    _bag(f, "a", 5)
    _bag(f, "b", 5)
    _cohort(tmp_path, ["a", "b"])
    bags = FeatureBags(load_cohort(tmp_path / "c.csv").slides, f, [np.zeros(1)] * 2, train=True)
    (f / "b.h5").unlink()
    item = bags[1]
    assert "b.h5" in item["error"] and item["slide"].endswith("b.tiff")
    assert bags[0]["features"].shape == (5, 6)
