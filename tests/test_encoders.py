"""Foundation-model encoders by name: architectures, dims, HF-cache loading, errors, warnings."""

from __future__ import annotations

import logging
import re
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("timm")

from slidestream.errors import ConfigError  # noqa: E402
from slidestream.infer.features import FeatureExtractor  # noqa: E402
from slidestream.io import open_slide  # noqa: E402
from slidestream.models.encoders import (  # noqa: E402
    ENCODERS,
    EncoderSpec,
    build_encoder_model,
    build_named_encoder,
    hf_cache_dir,
)
from slidestream.models.mil import create_encoder  # noqa: E402
from slidestream.sampling import PatchLocation  # noqa: E402
from slidestream.synthetic import write_synthetic_slide  # noqa: E402

# Parameter counts published on the model cards / in the papers (millions).
PUBLISHED_M = {
    "uni": 303,  # ViT-L/16
    "uni2-h": 681,
    "virchow2": 632,
    "h-optimus-0": 1135,  # "1.1B"
    "prov-gigapath": 1135,  # demo prints 1,134,953,984
    "ctranspath": 27.5,  # "28M"
}


def _small(name: str) -> dict:
    return {"depth": 1} if not ENCODERS[name].arch.startswith("swin") else {"depths": (1, 1, 1, 1)}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_full_architecture_dims_on_meta_device(name):
    spec = ENCODERS[name]
    with torch.device("meta"):
        model = build_named_encoder(name)
        out = model(torch.empty(2, 3, spec.size, spec.size))
    assert tuple(out.shape) == (2, spec.dim)
    if name in PUBLISHED_M:
        params = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(params - PUBLISHED_M[name]) / PUBLISHED_M[name] < 0.01, params


def test_token_layout_matches_the_model_cards():
    with torch.device("meta"):
        virchow = build_encoder_model(ENCODERS["virchow2"])
        uni2 = build_encoder_model(ENCODERS["uni2-h"])
        hopt = build_encoder_model(ENCODERS["h-optimus-0"])
        giga = build_encoder_model(ENCODERS["prov-gigapath"])
    assert virchow.num_prefix_tokens == 5 and virchow.embed_dim == 1280  # cls + 4 registers
    assert uni2.num_prefix_tokens == 9 and uni2.patch_embed.patch_size == (14, 14)
    assert hopt.num_prefix_tokens == 5 and len(hopt.blocks) == 40
    assert giga.patch_embed.patch_size == (16, 16) and len(giga.blocks) == 40
    assert giga.blocks[0].mlp.fc1.out_features == 8192  # SwiGLU packed: 2 x 4096
    assert giga.blocks[0].mlp.fc2.in_features == 4096


@pytest.mark.parametrize("name", list(ENCODERS))
def test_small_random_encoder_gives_finite_features(name):
    spec = ENCODERS[name]
    torch.manual_seed(0)
    model = build_named_encoder(name, **_small(name)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, spec.size, spec.size))
    assert out.shape == (1, spec.dim) and torch.isfinite(out).all()


def test_cls_plus_mean_is_class_token_and_mean_of_patch_tokens():
    torch.manual_seed(0)
    enc = build_named_encoder("virchow2", depth=1).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = enc.model.forward_features(x)
        out = enc(x)
    assert tokens.shape[1] == 5 + 16 * 16
    torch.testing.assert_close(out[:, :1280], tokens[:, 0])
    torch.testing.assert_close(out[:, 1280:], tokens[:, 5:].mean(1))  # registers left out


def _cache_entry(root, repo, fname, state, repo_type="model", rev="abc123"):
    base = root / f"{repo_type}s--{repo.replace('/', '--')}"
    snap = base / "snapshots" / rev / fname
    snap.parent.mkdir(parents=True, exist_ok=True)
    if fname.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(snap))
    else:
        torch.save(state, snap)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(rev)
    return snap


def _same_output(a, b, size):
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize(
    ("name", "fname"),
    [("uni", "model.safetensors"), ("h-optimus-0", "pytorch_model.bin"), ("uni2-h", None)],
)
def test_weights_load_from_a_fake_hf_cache(name, fname, tmp_path, monkeypatch):
    spec = ENCODERS[name]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    torch.manual_seed(1)
    src = build_named_encoder(name, depth=1)
    _cache_entry(tmp_path, spec.repo, fname or spec.files[-1], src.model.state_dict())
    torch.manual_seed(2)
    loaded = build_named_encoder(name, "hf", depth=1)
    _same_output(src, loaded, spec.size)


def test_hf_home_is_respected(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hf_cache_dir() == tmp_path / "hfhome" / "hub"


def test_conch_v1_5_checkpoint_with_a_224_pos_embed_loads(tmp_path, monkeypatch):
    spec = ENCODERS["conch_v1_5"]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    torch.manual_seed(1)
    src = build_named_encoder("conch_v1_5", depth=1)
    state = src.model.state_dict()
    assert set(k.split(".")[0] for k in state) == {"trunk", "attn_pool_contrast", "ln_contrast"}
    _cache_entry(tmp_path, spec.repo, "pytorch_model_vision.bin", state)
    _same_output(src, build_named_encoder("conch_v1_5", "hf", depth=1), 448)
    small = build_encoder_model(spec, depth=1, img_size=224).state_dict()  # 14x14 grid
    state["trunk.pos_embed"] = small["trunk.pos_embed"]
    _cache_entry(tmp_path, spec.repo, "pytorch_model_vision.bin", state)
    loaded = build_named_encoder("conch_v1_5", "hf", depth=1)
    assert loaded.model.trunk.pos_embed.shape == (1, 1 + 28 * 28, 1024)


def _to_hf_dinov2(state: dict) -> dict:
    """timm ViT names → transformers Dinov2Model names (the inverse of the converter)."""
    out = {"embeddings.mask_token": torch.zeros(1, 1024)}
    for k, v in state.items():
        m = re.match(r"blocks\.(\d+)\.(.*)", k)
        if k == "cls_token":
            out["embeddings.cls_token"] = v
        elif k == "pos_embed":
            out["embeddings.position_embeddings"] = v
        elif k.startswith("patch_embed.proj."):
            out[k.replace("patch_embed.proj.", "embeddings.patch_embeddings.projection.")] = v
        elif k.startswith("norm."):
            out[k.replace("norm.", "layernorm.")] = v
        elif m and m.group(2).startswith("attn.qkv."):
            kind = m.group(2).rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), v.chunk(3, 0), strict=True):
                out[f"encoder.layer.{m.group(1)}.attention.attention.{name}.{kind}"] = part
        elif m:
            rest = m.group(2).replace("attn.proj.", "attention.output.dense.")
            rest = re.sub(r"ls(\d)\.gamma", r"layer_scale\1.lambda1", rest)
            out[f"encoder.layer.{m.group(1)}.{rest}"] = v
    return out


def test_phikon_v2_transformers_checkpoint_converts(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    torch.manual_seed(1)
    src = build_named_encoder("phikon-v2", depth=2)
    hf = _to_hf_dinov2(src.model.state_dict())
    assert not any(k.startswith(("blocks", "cls_token")) for k in hf)
    _cache_entry(tmp_path, "owkin/phikon-v2", "model.safetensors", hf)
    _same_output(src, build_named_encoder("phikon-v2", "hf", depth=2), 224)


def test_ctranspath_old_timm_checkpoint_converts(tmp_path, monkeypatch):
    spec = ENCODERS["ctranspath"]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    torch.manual_seed(1)
    src = build_named_encoder("ctranspath")
    old = {}
    for k, v in src.model.state_dict().items():  # timm 0.5: downsample ends the stage before
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k)
        old[k] = v
    old["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    old["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    path = _cache_entry(tmp_path, spec.repo, spec.files[0], {"model": old}, "dataset")
    assert "datasets--MahmoodLab--hest-bench" in str(path)
    _same_output(src, build_named_encoder("ctranspath", "hf"), 224)
    _same_output(src, build_named_encoder("ctranspath", path), 224)  # or the file itself


def test_absent_weights_name_repo_login_and_licence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError) as err:
        build_named_encoder("uni", "hf", depth=1)
    msg = str(err.value)
    assert "\n" not in msg and "MahmoodLab/UNI" in msg and "huggingface-cli login" in msg
    assert "https://huggingface.co/MahmoodLab/UNI" in msg and str(tmp_path) in msg
    with pytest.raises(ConfigError, match="--repo-type dataset MahmoodLab/hest-bench"):
        build_named_encoder("ctranspath", "hf")
    with pytest.raises(ConfigError, match="not found"):
        build_named_encoder("uni", tmp_path / "nope.bin", depth=1)


def test_weights_of_another_architecture_are_refused(tmp_path):
    other = build_named_encoder("phikon-v2", depth=1).model.state_dict()
    path = tmp_path / "w.bin"
    torch.save(other, path)
    with pytest.raises(ConfigError, match="w.bin"):
        build_named_encoder("uni2-h", path, depth=1)


def test_missing_timm_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ConfigError, match=r"needs timm: pip install 'slidestream\[timm\]'"):
        build_named_encoder("uni")


def test_unknown_name_and_bad_spec():
    with pytest.raises(ConfigError, match="choose one of uni"):
        build_named_encoder("uni3")
    with pytest.raises(ConfigError, match="output must be one of"):
        EncoderSpec("vit_small_patch16_224", output="avg")


def _one_block(monkeypatch, name):
    spec = ENCODERS[name]
    small = EncoderSpec(**{**spec.__dict__, "kwargs": {**spec.kwargs, "depth": 1}})
    monkeypatch.setitem(ENCODERS, name, small)
    return small


def test_feature_extractor_takes_size_mpp_and_normalisation_from_the_registry(
    monkeypatch, tmp_path
):
    spec = _one_block(monkeypatch, "h-optimus-0")
    ex = FeatureExtractor("h-optimus-0", workers=0, device="cpu", dtype="float32")
    assert ex.sampler.size == 224 and ex.attrs["mpp"] == 0.5 and ex.attrs["output"] == "cls"
    assert ex.attrs["normalization"] == {"mean": list(spec.mean), "std": list(spec.std)}
    seen = []

    class Capture(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return x.mean((2, 3))

    ex.model = Capture()
    slide = open_slide(write_synthetic_slide(tmp_path / "s.tiff", 512, 512, mpp=0.5, seed=3))
    ex.encode(slide, np.array([[64, 64]]))
    raw = ex.sampler.read(slide, PatchLocation(64, 64, 1.0))[100, 100] / 255.0
    expect = (raw - np.array(spec.mean)) / np.array(spec.std)
    np.testing.assert_allclose(seen[0][0, :, 100, 100].numpy(), expect, atol=1e-5)
    other = FeatureExtractor("resnet18@layer1", mpp=2.0, size=32, workers=0, device="cpu")
    assert other.attrs["normalization"]["mean"] == [0.485, 0.456, 0.406]
    assert other.sampler.size == 32 and other.attrs["mpp"] == 2.0


# --- random-init warning (issue #22 item 6) ---------------------------------------------------
def test_random_init_encoder_warns_once_by_name(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="slidestream.models.mil"):
        create_encoder("resnet18@layer1")
    warned = [r.getMessage() for r in caplog.records if "random weights" in r.getMessage()]
    assert len(warned) == 1 and "resnet18@layer1" in warned[0] and "--weights DEFAULT" in warned[0]
    caplog.clear()
    path = tmp_path / "w.pt"
    torch.save(create_encoder("resnet18").state_dict(), path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slidestream.models.mil"):
        create_encoder("resnet18", path)
        create_encoder("mean_rgb")
    assert not [r for r in caplog.records if "random weights" in r.getMessage()]


def test_named_encoder_warning_points_at_the_hf_cache(caplog, monkeypatch):
    _one_block(monkeypatch, "uni")
    with caplog.at_level(logging.WARNING, logger="slidestream.models.mil"):
        create_encoder("uni")
    msgs = [r.getMessage() for r in caplog.records]
    assert any("encoder uni has random weights" in m and "--weights hf" in m for m in msgs)


def test_features_cli_without_weights_is_not_silent(tmp_path):
    import subprocess

    slide = write_synthetic_slide(tmp_path / "s.tiff", 384, 320, mpp=1.0, seed=5, tumour=1)
    cmd = [sys.executable, "-m", "slidestream", "features", str(slide), "--encoder"]
    opts = ["--mpp", "2", "--size", "32", "--workers", "0", "--device", "cpu"]
    run = subprocess.run(
        [*cmd, "resnet18@layer1", *opts, "--out", str(tmp_path / "f")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if "random weights" in ln]
    assert len(lines) == 1 and "encoder resnet18@layer1" in lines[0], run.stderr
    assert "--weights DEFAULT" in lines[0]
    quiet = subprocess.run(
        [*cmd, "mean_rgb", *opts, "--out", str(tmp_path / "g")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert quiet.returncode == 0 and "random weights" not in quiet.stderr
