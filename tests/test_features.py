"""Feature files (slidestream features): content, sharding, resume, bad slides."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import slidestream as ss
from slidestream.cli import main
from slidestream.data.features import feature_path, read_features
from slidestream.data.functional import normalize
from slidestream.infer.features import FeatureExtractor, extract_cohort, parse_shard
from slidestream.io import open_slide
from slidestream.models.mil import create_encoder
from slidestream.sampling import PatchLocation, load_cohort
from slidestream.synthetic import write_synthetic_slide
from slidestream.tissue import detect_tissue


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("feat")
    rows = []
    for i in range(4):
        p = write_synthetic_slide(d / f"f{i}.tiff", 640, 512, mpp=1.0, seed=90 + i, tumour=i % 2)
        rows.append(f"{p},{'tumour' if i % 2 else 'normal'}")
    csv = d / "c.csv"
    csv.write_text("slide,label\n" + "\n".join(rows) + "\n")
    return csv


def _extractor(encoder="resnet18@layer1", **kw):
    base = dict(mpp=2.0, size=32, workers=0, batch_size=16, dtype="float32", device="cpu")
    return FeatureExtractor(encoder, **{**base, **kw})


def test_feature_file_holds_the_encoders_output_inside_tissue(cohort_csv, tmp_path):
    ex = _extractor()
    cohort = load_cohort(cohort_csv)
    report = extract_cohort(cohort, tmp_path, ex)
    assert len(report.written) == 4 and not report.failed and report.patches > 0
    slide_path = cohort.slides[1].path
    feats, coords, attrs = read_features(feature_path(tmp_path, slide_path))
    assert feats.dtype == np.float32 and feats.shape == (len(coords), 64)
    assert coords.dtype == np.int64 and coords.shape[1] == 2
    assert attrs["encoder"] == "resnet18@layer1" and attrs["mpp"] == 2.0 and attrs["size"] == 32
    assert len(attrs["weights_hash"]) == 12 and "mean" in attrs["normalization"]
    slide = open_slide(slide_path)
    mask = detect_tissue(slide)
    sx, sy = ex.sampler.geometry(slide).size0
    frac = mask.region_fraction(coords[:, 0], coords[:, 1], sx, sy)
    assert (np.asarray(frac) >= 0.5).all()  # every patch inside tissue
    pick = [0, len(coords) // 2, len(coords) - 1]
    pixels = [ex.sampler.read(slide, PatchLocation(*map(int, coords[i]), 1.0)) for i in pick]
    batch = torch.from_numpy(np.stack(pixels).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        expect = ex.model(normalize(batch)).numpy()
    np.testing.assert_allclose(feats[pick], expect, rtol=1e-4, atol=1e-5)


def test_float16_and_mean_rgb(cohort_csv, tmp_path):
    cohort = load_cohort(cohort_csv)
    cohort.slides = cohort.slides[:1]
    extract_cohort(cohort, tmp_path, _extractor("mean_rgb", dtype="float16"))
    feats, _, _ = read_features(feature_path(tmp_path, cohort.slides[0].path))
    assert feats.dtype == np.float16 and feats.shape[1] == 6
    assert create_encoder("mean_rgb")(torch.zeros(2, 3, 8, 8)).shape == (2, 6)


def test_shards_cover_every_slide_once_and_resume_skips(cohort_csv, tmp_path):
    cohort = load_cohort(cohort_csv)
    ex = _extractor("mean_rgb")
    torch.manual_seed(7)
    ex_hash = _extractor("resnet18@layer1").attrs["weights_hash"]
    written = []
    for i in range(3):
        written += extract_cohort(cohort, tmp_path, ex, (i, 3)).written
    assert sorted(written) == sorted(str(s.path) for s in cohort)
    files = sorted(tmp_path.glob("*.h5"))
    assert len(files) == 4 and not list(tmp_path.glob(".*.tmp"))
    stamps = [f.stat().st_mtime_ns for f in files]
    torch.manual_seed(123)  # a new extractor in a new run: same random init, same hash
    again = extract_cohort(cohort, tmp_path, _extractor("mean_rgb"))
    assert _extractor("resnet18@layer1").attrs["weights_hash"] == ex_hash
    assert again.written == [] and len(again.skipped) == 4
    assert [f.stat().st_mtime_ns for f in files] == stamps
    with pytest.raises(ss.ConfigError, match="another --out"):
        extract_cohort(cohort, tmp_path, _extractor("mean_rgb", size=16))


def test_bad_slides_are_listed_and_shards_parsed(cohort_csv, tmp_path):
    bad = cohort_csv.parent / "broken.tiff"
    bad.write_bytes(b"not a tiff at all")
    csv = tmp_path / "c.csv"
    csv.write_text(cohort_csv.read_text() + f"{bad},normal\n")
    report = extract_cohort(load_cohort(csv), tmp_path / "f", _extractor("mean_rgb"))
    assert list(report.failed) == [str(bad)] and len(report.written) == 4
    assert "broken.tiff" in (tmp_path / "f" / "failed.0of1.txt").read_text()
    assert parse_shard("2/4") == (2, 4)
    for text in ("4/4", "x", "1/0"):
        with pytest.raises(ss.ConfigError, match="--shard"):
            parse_shard(text)
    rc = main(
        [
            "features",
            str(csv),
            "--encoder",
            "mean_rgb",
            "--mpp",
            "2",
            "--size",
            "32",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "cli"),
            "--shard",
            "0/2",
            "--device",
            "cpu",
        ]
    )
    assert rc == 1  # the broken slide (index 4) is in shard 0
    assert len(list((tmp_path / "cli").glob("*.h5"))) == 2


def test_torchrun_rank_is_the_default_shard(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard(None) == (1, 3)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert parse_shard(None) == (0, 1)


def test_write_features_refuses_nan_rows(tmp_path):
    import numpy as np
    import pytest

    from slidestream.data.features import write_features
    from slidestream.errors import ConfigError

    feats = np.ones((3, 4), np.float32)
    feats[1, 2] = np.nan
    out = tmp_path / "s.h5"
    with pytest.raises(ConfigError, match=r"s\.h5: 1 of 3 feature rows are NaN/Inf"):
        write_features(out, feats, np.zeros((3, 2)), {"slide": "a/s.svs"})
    assert not out.exists()


def test_read_features_refuses_nan_and_mismatched_coords(tmp_path):
    import h5py
    import numpy as np
    import pytest

    from slidestream.data.features import read_features
    from slidestream.errors import ConfigError

    for name, feats, coords in [
        ("nan.h5", np.full((2, 3), np.nan, np.float32), np.zeros((2, 2))),
        ("short.h5", np.ones((3, 3), np.float32), np.zeros((2, 2))),
    ]:
        with h5py.File(tmp_path / name, "w") as f:
            f["features"], f["coords"] = feats, coords
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
            read_features(tmp_path / name)
