"""Stain normalisation: Macenko, Reinhard, Vahadane; targets as JSON; background kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from slidestream.data.stain import (
    METHODS,
    StainNormalizer,
    StainTarget,
    _from_od,
    _macenko_matrix,
    _nonneg_lasso,
    _vahadane_matrix,
    load_stain_target,
    optical_density,
)
from slidestream.errors import ConfigError
from slidestream.synthetic import write_synthetic_slide


def _unit(m):
    m = np.asarray(m, float)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


M_TARGET = _unit([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
M_SOURCE = _unit([[0.50, 0.80, 0.35], [0.20, 0.95, 0.25]])


def _concentrations(seed=0, n=64 * 64):
    rng = np.random.default_rng(seed)
    c, kind = np.zeros((n, 2)), rng.integers(0, 3, n)
    c[kind == 0, 0] = rng.gamma(2, 0.4, (kind == 0).sum())
    c[kind == 1, 1] = rng.gamma(2, 0.3, (kind == 1).sum())
    c[kind == 2] = rng.gamma(2, 0.3, ((kind == 2).sum(), 2))
    c[:400] = 0  # a band of glass
    return c


def _image(m, c):
    return _from_od(c @ m).reshape(64, 64, 3)


@pytest.fixture(scope="module")
def pair():
    c = _concentrations()
    return _image(M_TARGET, c), _image(M_SOURCE, 1.3 * c)  # same tissue, other stain + strength


@pytest.mark.parametrize("method", METHODS)
def test_normalised_patch_moves_to_the_target(pair, method):
    target, source = pair
    norm = StainNormalizer(StainTarget.fit(method, target))
    out = norm(source)
    assert out.dtype == np.uint8 and out.shape == source.shape
    before = np.abs(source.astype(int) - target).mean()
    after = np.abs(out.astype(int) - target).mean()
    assert after < 0.35 * before, (before, after)
    np.testing.assert_array_equal(norm(source), out)  # deterministic
    np.testing.assert_array_equal(out.reshape(-1, 3)[:400], source.reshape(-1, 3)[:400])


@pytest.mark.parametrize("method", METHODS)
def test_stain_statistics_move_to_the_target(pair, method):
    target, source = pair
    tgt = StainTarget.fit(method, target)
    out = StainNormalizer(tgt)(source)
    got, src = StainTarget.fit(method, out), StainTarget.fit(method, source)
    if method == "reinhard":
        np.testing.assert_allclose(got.lab_mean, tgt.lab_mean, atol=1.5)  # the tissue set moves
        np.testing.assert_allclose(got.lab_std, tgt.lab_std, rtol=0.1)  # gamut clipping
        assert np.abs(np.subtract(src.lab_mean, tgt.lab_mean)).max() > 3  # it had somewhere to go
    else:
        assert np.abs(np.subtract(got.stain_matrix, tgt.stain_matrix)).max() < 0.02
        assert np.abs(np.subtract(src.stain_matrix, tgt.stain_matrix)).max() > 0.1
        np.testing.assert_allclose(got.max_conc, tgt.max_conc, rtol=0.03)


@pytest.mark.parametrize("estimate", [_macenko_matrix, _vahadane_matrix])
def test_stain_vectors_are_recovered(estimate):
    od = optical_density(_image(M_SOURCE, _concentrations(3)).reshape(-1, 3))
    m = estimate(od[od.max(1) > 0.15])
    assert np.abs(m - M_SOURCE).max() < 0.02, m  # haematoxylin first


def test_nonneg_lasso_is_exact():
    from sklearn.linear_model import Lasso

    rng = np.random.default_rng(1)
    od = np.abs(rng.normal(0.4, 0.4, (30, 3)))
    lam = 0.06
    ours = _nonneg_lasso(od, M_TARGET, lam)
    for i in range(len(od)):  # sklearn: 1/(2n)||y - Xw||^2 + a|w|, n = 3  ->  lam = 6a
        ref = Lasso(alpha=lam / 6, positive=True, fit_intercept=False, tol=1e-10, max_iter=10**5)
        ref.fit(M_TARGET.T, od[i])
        np.testing.assert_allclose(ours[i], ref.coef_, atol=1e-5)
    assert (ours >= 0).all()


def test_background_and_empty_patches_are_unchanged(pair):
    norm = StainNormalizer(StainTarget.fit("macenko", pair[0]))
    glass = np.full((32, 32, 3), 240, np.uint8)
    glass[3, 3] = (120, 60, 140)  # a few stained pixels are not enough to fit on
    np.testing.assert_array_equal(norm(glass), glass)
    with pytest.raises(ConfigError, match="uint8"):
        norm(glass.astype(np.float32))
    with pytest.raises(ConfigError, match="stained pixels"):
        StainTarget.fit("vahadane", glass, source="glass.png")


@pytest.mark.parametrize("method", METHODS)
def test_target_round_trips_through_json(pair, method, tmp_path):
    tgt = StainTarget.fit(method, pair[0], source="t.png", mpp=0.5)
    back = StainTarget.from_json(tgt.to_json(tmp_path / "stain.json"))
    assert back == tgt
    np.testing.assert_array_equal(StainNormalizer(back)(pair[1]), StainNormalizer(tgt)(pair[1]))


def test_bad_targets_are_one_line(tmp_path, pair):
    with pytest.raises(ConfigError, match="--stain-norm must be one of"):
        StainTarget.fit("ruifrok", pair[0])
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(ConfigError, match="x.json is not a stain target"):
        StainTarget.from_json(tmp_path / "x.json")
    with pytest.raises(ConfigError, match="go together"):
        load_stain_target("macenko", None)
    with pytest.raises(ConfigError, match="not found"):
        load_stain_target("macenko", tmp_path / "none.png")
    saved = StainTarget.fit("reinhard", pair[0]).to_json(tmp_path / "r.json")
    with pytest.raises(ConfigError, match="reinhard target, not macenko"):
        load_stain_target("macenko", saved)
    assert load_stain_target(None, None) is None
    assert load_stain_target(None, saved).target.method == "reinhard"


def test_target_from_an_image_and_from_slide_tissue(tmp_path, pair):
    png = tmp_path / "target.png"
    Image.fromarray(pair[0]).save(png)
    norm = load_stain_target("vahadane", png, save_to=tmp_path / "run")
    saved = StainTarget.from_json(tmp_path / "run" / "stain.json")
    assert saved == norm.target and saved.source == str(png)
    slide = write_synthetic_slide(tmp_path / "s.tiff", 1200, 1000, mpp=0.5, seed=4, tumour=1)
    from_slide = load_stain_target("macenko", slide, mpp=1.0).target
    assert from_slide.mpp == 1.0 and from_slide.source == str(slide)
    assert np.asarray(from_slide.stain_matrix).shape == (2, 3)
    import tifffile

    rng = np.random.default_rng(0)
    blank = tmp_path / "glass.tiff"
    tifffile.imwrite(blank, (235 + rng.integers(0, 6, (500, 600, 3))).astype(np.uint8))
    with pytest.raises(ConfigError, match="no tissue found in stain target"):
        load_stain_target("macenko", blank)


# --- through the command line -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("stain_cli")
    slide = write_synthetic_slide(d / "s.tiff", 640, 512, mpp=1.0, seed=11, tumour=1)
    target = write_synthetic_slide(d / "t.tiff", 640, 512, mpp=1.0, seed=12, texture="inflamed")
    return slide, target


def test_features_cli_normalises_and_saves_the_target(tiny, tmp_path):
    from slidestream.cli import main
    from slidestream.data.features import feature_path, read_features

    slide, target = tiny
    base = ["features", str(slide), "--encoder", "mean_rgb", "--mpp", "2", "--size", "32"]
    base += ["--workers", "0", "--device", "cpu", "--dtype", "float32"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    stain = ["--stain-norm", "reinhard", "--stain-target", str(target)]
    assert main([*base, *stain, "--out", str(tmp_path / "norm")]) == 0
    saved = StainTarget.from_json(tmp_path / "norm" / "stain.json")
    assert saved.method == "reinhard" and saved.source == str(target) and saved.mpp == 2.0
    plain, _, _ = read_features(feature_path(tmp_path / "plain", slide))
    normed, _, attrs = read_features(feature_path(tmp_path / "norm", slide))
    assert (
        attrs["stain"] == saved.tag
        and StainTarget.from_dict(json.loads(attrs["stain_target"])) == saved
    )
    assert plain.shape == normed.shape and np.abs(plain - normed).max() > 0.05
    assert main([*base, "--out", str(tmp_path / "norm")]) == 1  # other settings: refused


def test_patches_train_patches_and_predict_carry_the_target(tiny, tmp_path, capsys):
    import torch

    from slidestream.cli import main
    from slidestream.data.hdf5 import PatchDatabase
    from slidestream.infer import PatchPredictor
    from slidestream.models.checkpoint import load_checkpoint

    slide, target = tiny
    csv = tmp_path / "c.csv"
    csv.write_text(f"slide,label\n{slide},tumour\n{target},normal\n")
    common = ["patches", str(csv), "--mpp", "2", "--size", "32", "--grid", "32"]
    assert main([*common, "--out", str(tmp_path / "plain" / "db.h5")]) == 0
    stain = ["--stain-norm", "macenko", "--stain-target", str(target)]
    assert main([*common, *stain, "--out", str(tmp_path / "norm" / "db.h5")]) == 0
    saved = StainTarget.from_json(tmp_path / "norm" / "stain.json")
    plain, normed = (
        PatchDatabase(tmp_path / "plain" / "db.h5"),
        PatchDatabase(tmp_path / "norm" / "db.h5"),
    )
    assert normed.params["stain"]["tag"] == saved.tag and len(plain) == len(normed)
    raw, got = plain[3]["image"], normed[3]["image"]
    expect = StainNormalizer(saved)(np.ascontiguousarray(raw.permute(1, 2, 0).numpy()))
    assert torch.equal(got, torch.from_numpy(expect).permute(2, 0, 1)) and not torch.equal(raw, got)
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "norm" / "db.h5")]) == 1  # no mixing
    assert "stain normalisation macenko:" in capsys.readouterr().err

    train = ["train-patches", "--data", str(tmp_path / "norm" / "db.h5"), "--model", "resnet18"]
    train += ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "4", "--workers", "0"]
    assert main([*train, "--out", str(tmp_path / "runs"), "--name", "s"]) == 0
    run = tmp_path / "runs" / "s"
    assert StainTarget.from_json(run / "stain.json") == saved  # inherited from the database
    ckpt = run / "best.pt" if (run / "best.pt").exists() else run / "last.pt"
    assert StainTarget.from_dict(load_checkpoint(ckpt)["stain"]) == saved
    assert PatchPredictor(ckpt, workers=0).stain is not None  # predict reloads it
    assert PatchPredictor(ckpt, workers=0, stain=None).stain is None
    pred = ["predict", str(ckpt), str(slide), "--workers", "0", "--out", str(tmp_path / "p")]
    assert main(pred) == 0
    other = ["--stain-norm", "reinhard", "--stain-target", str(slide)]
    assert main([*pred[:-1], str(tmp_path / "q"), *other]) == 0
    assert StainTarget.from_json(tmp_path / "q" / "stain.json").method == "reinhard"
    capsys.readouterr()


def test_train_patches_streamed_from_slides_normalises_train_and_val(tiny, tmp_path):
    from slidestream.data.transforms import StainNormalize
    from slidestream.train.patch_config import PatchTrainConfig
    from slidestream.train.patches import _load_data

    slide, target = tiny
    csv = tmp_path / "c.csv"
    csv.write_text(f"slide,label\n{slide},tumour\n{target},normal\n")
    cfg = PatchTrainConfig(
        data=str(csv), val_data=str(csv), size=32, mpp=2.0, stain_norm="vahadane",
        stain_target=str(target), augmentation="none",
    )  # fmt: skip
    data = _load_data(cfg)
    assert isinstance(data.train.transform, StainNormalize) and data.stain["method"] == "vahadane"
    assert data.val.transform is data.train.transform and data.stain["mpp"] == 2.0
    with pytest.raises(ConfigError, match="stain_norm must be one of"):
        PatchTrainConfig(data=str(csv), stain_norm="ruifrok")


@pytest.mark.parametrize("method", METHODS)
def test_real_he_patch_restained_comes_back(shared_data, method):
    """A real H&E patch with its stains changed (other vectors, H x1.3, E x0.8) normalised to
    the original comes back to within the two-stain model's own reconstruction error."""
    from slidestream.data.stain import _tissue
    from slidestream.io import open_slide

    patch = open_slide(shared_data / "cmu_small_region.svs").read(800, 1200, 224, 224)
    od = optical_density(patch)
    tissue = _tissue(patch, od)
    m = _macenko_matrix(od[tissue])
    conc = np.linalg.lstsq(m.T, od[tissue].T, rcond=None)[0].T
    other = _unit(m + [[0.0, 0.1, 0.15], [0.1, 0.0, -0.1]])
    restained = patch.copy()
    restained[tissue] = _from_od(conc * [1.3, 0.8] @ other)
    norm = StainNormalizer(StainTarget.fit(method, patch))
    floor = np.abs(norm(patch).astype(int) - patch).mean()  # 0 for reinhard, ~3-5 otherwise
    before = np.abs(restained.astype(int) - patch).mean()
    after = np.abs(norm(restained).astype(int) - patch).mean()
    assert after < before - 2.5 and after < floor + 0.8 * (before - floor), (floor, before, after)


def test_feature_extractor_rebuilt_from_file_attrs_keeps_the_stain(tiny, tmp_path):
    from slidestream.infer.features import FeatureExtractor

    slide, target = tiny
    kw = {"workers": 0, "device": "cpu", "dtype": "float32"}
    ex = FeatureExtractor("mean_rgb", mpp=2.0, size=32, **kw)
    ex.set_stain(load_stain_target("macenko", target, mpp=2.0))
    again = FeatureExtractor.from_attrs(ex.attrs, **kw)
    assert again.attrs == ex.attrs and again.stain.target == ex.stain.target
    xy = np.array([[64, 64], [128, 96]])
    from slidestream.io import open_slide

    s = open_slide(slide)
    np.testing.assert_array_equal(again.encode(s, xy), ex.encode(s, xy))
    with pytest.raises(ConfigError, match="feature files"):
        FeatureExtractor.from_attrs({**ex.attrs, "weights_hash": "0" * 12}, **kw)
