"""Pathology foundation-model patch encoders by name, weights from the local Hugging Face cache.

``ENCODERS["uni"]`` describes one published encoder: its timm architecture and kwargs, input
size (px), mpp (µm/px), normalisation, output feature and embedding size, and where its weights
live on the Hugging Face hub. :func:`build_named_encoder` builds it (needs timm:
``pip install 'slidestream[timm]'``) and loads weights from a file or from the Hugging Face cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``, read at call time);
nothing is ever downloaded.

Provenance (``EncoderSpec.source``): the kwargs were checked against the model cards and
TRIDENT's loaders (``trident/patch_encoder_models/load.py``, 2025); the checkpoint converters for
phikon-v2 (transformers Dinov2 names) and ctranspath (timm-0.5 Swin names) follow those formats
but were not run against the released files here (no weights can be downloaded).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from slidestream.errors import ConfigError
from slidestream.models._encoder_parts import (
    ConchVisionTower,
    ConvStem,
    TokenFeatures,
    convert_state,
)
from slidestream.models.weights import fit_state_dict, read_state_dict

__all__ = [
    "ENCODERS",
    "OUTPUTS",
    "EncoderSpec",
    "build_encoder_model",
    "build_named_encoder",
    "hf_cache_dir",
    "hf_cache_weights",
]

log = logging.getLogger(__name__)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OUTPUTS = ("cls", "cls+mean", "pooled", "attn_pool")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class EncoderSpec:
    """One named encoder.

    ``arch`` + ``kwargs``: the timm model; ``size`` px input at ``mpp`` µm/px; ``mean``/``std``
    (0-1 RGB) normalisation; ``output``: ``"cls"`` (class token), ``"cls+mean"`` (class token
    and the mean of the patch tokens, concatenated), ``"pooled"`` (timm's pooled output) or
    ``"attn_pool"`` (CONCH's attention pooler); ``dim`` of the (B, dim) feature; ``repo`` and
    ``files`` (tried in order) on the Hugging Face hub, ``repo_type`` ``"model"`` or
    ``"dataset"``; ``convert``: the checkpoint's key layout (None: timm's own); ``source``: what
    the entry was checked against, ``note``: what is a guess.
    """

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    size: int = 224
    mpp: float = 0.5
    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]
    output: str = "cls"
    dim: int = 1024
    repo: str | None = None
    files: tuple[str, ...] = _HF_FILES
    repo_type: str = "model"
    convert: str | None = None
    source: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ConfigError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if self.size < 1 or self.mpp <= 0 or self.dim < 1:
            raise ConfigError(
                f"size, mpp and dim must be > 0, got {self.size}, {self.mpp}, {self.dim}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"mean and std need 3 values, std > 0; got {self.mean}, {self.std}")
        if self.repo_type not in ("model", "dataset"):
            raise ConfigError(f"repo_type must be model or dataset, got {self.repo_type!r}")


_VIT = {"num_classes": 0, "init_values": 1e-5, "dynamic_img_size": True}
_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
_TRIDENT = "model card + TRIDENT load.py"

ENCODERS: dict[str, EncoderSpec] = {
    "uni": EncoderSpec(
        "vit_large_patch16_224",
        dict(_VIT, img_size=224, patch_size=16),
        repo="MahmoodLab/UNI",
        source=_TRIDENT,
    ),
    "uni2-h": EncoderSpec(
        "vit_giant_patch14_224",
        dict(
            _VIT,
            **_SWIGLU,
            img_size=224,
            patch_size=14,
            depth=24,
            num_heads=24,
            embed_dim=1536,
            mlp_ratio=2.66667 * 2,
            no_embed_class=True,
            reg_tokens=8,
        ),
        dim=1536,
        repo="MahmoodLab/UNI2-h",
        source=_TRIDENT,
    ),
    "conch_v1_5": EncoderSpec(
        "vit_large_patch16_224",
        {"num_classes": 0, "init_values": 1.0, "img_size": 448, "dynamic_img_size": True},
        size=448,
        output="attn_pool",
        dim=768,
        repo="MahmoodLab/conchv1_5",
        files=("pytorch_model_vision.bin",),
        convert="conch",
        source="TRIDENT conchv1_5.py (CONCHVisionTower: ViT-L/16 trunk, attention pooler, "
        "LayerNorm to 768)",
        note="the trunk's pos_embed is resampled to 448 px once at load; TRIDENT resamples it "
        "to 224 then interpolates each forward pass",
    ),
    "virchow2": EncoderSpec(
        "vit_huge_patch14_224",
        dict(_VIT, **_SWIGLU, img_size=224, mlp_ratio=5.3375, reg_tokens=4),
        output="cls+mean",
        dim=2560,
        repo="paige-ai/Virchow2",
        source=_TRIDENT + " (class token + mean of patch tokens, 4 register tokens skipped)",
    ),
    "h-optimus-0": EncoderSpec(
        "vit_giant_patch14_reg4_dinov2",
        {"num_classes": 0, "init_values": 1e-5, "img_size": 224, "dynamic_img_size": False},
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        dim=1536,
        repo="bioptimus/H-optimus-0",
        source=_TRIDENT,
    ),
    "prov-gigapath": EncoderSpec(
        "vit_giant_patch14_dinov2",
        {
            "num_classes": 0,
            "init_values": 1e-5,
            "img_size": 224,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "mlp_ratio": 5.33334,
            "dynamic_img_size": True,
        },
        dim=1536,
        repo="prov-gigapath/prov-gigapath",
        source=_TRIDENT + " (timm's dinov2 giant keeps its SwiGLU MLP)",
    ),
    "phikon-v2": EncoderSpec(
        "vit_large_patch16_224",
        dict(_VIT, img_size=224, patch_size=16),
        repo="owkin/phikon-v2",
        convert="hf_dinov2",
        source="TRIDENT load.py (transformers Dinov2Model, last_hidden_state[:, 0])",
        note="the transformers-Dinov2 to timm key mapping is not run against the released file",
    ),
    "ctranspath": EncoderSpec(
        "swin_tiny_patch4_window7_224",
        {"num_classes": 0},
        output="pooled",
        dim=768,
        repo="MahmoodLab/hest-bench",
        repo_type="dataset",
        files=("fm_v1/ctranspath/CHIEF_CTransPath.pth",),
        convert="swin_v1",
        source="TRIDENT load.py / TransPath (Swin-T, conv stem, head removed)",
        note="mpp 0.5 is a guess (TRIDENT sets no magnification); timm-0.5 key layout converted "
        "with timm's swin checkpoint_filter_fn, not run against the released file",
    ),
}


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (environment read at each call)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home).expanduser() / "hub"


def hf_cache_weights(
    repo: str, files: tuple[str, ...] = _HF_FILES, repo_type: str = "model"
) -> Path | None:
    """The first of ``files`` in a cached snapshot of ``repo`` (the ``refs/main`` snapshot first,
    then the others in name order), or None. Layout: ``models--ORG--NAME/snapshots/REV/FILE``."""
    root = hf_cache_dir() / f"{repo_type}s--{repo.replace('/', '--')}"
    ref = root / "refs" / "main"
    snaps = [root / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    snaps += sorted((root / "snapshots").glob("*")) if (root / "snapshots").is_dir() else []
    for snap in snaps:
        for fname in files:
            if (snap / fname).is_file():
                return snap / fname
    return None


def _weights_file(name: str, spec: EncoderSpec, weights: str | os.PathLike[str]) -> Path:
    if str(weights) != "hf":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"encoder {name}: weights file {path} not found; pass an existing file"
            )
        return path
    if spec.repo is None:
        raise ConfigError(f"encoder {name} has no Hugging Face repo; pass --weights FILE")
    found = hf_cache_weights(spec.repo, spec.files, spec.repo_type)
    if found is None:
        dataset = spec.repo_type == "dataset"
        url = f"https://huggingface.co/{'datasets/' if dataset else ''}{spec.repo}"
        plain = "huggingface-cli download"
        download = "huggingface-cli download --repo-type dataset" if dataset else plain
        raise ConfigError(
            f"encoder {name}: {spec.files[0]} of {spec.repo} is not in the Hugging Face cache "
            f"{hf_cache_dir()}; accept the licence at {url}, run `huggingface-cli login`, then "
            f"`{download} {spec.repo} {spec.files[0]}` (or pass --weights FILE)"
        )
    return found


def build_encoder_model(spec: EncoderSpec, **overrides: Any) -> nn.Module:
    """The bare model of ``spec`` with random weights (timm model, or CONCH's vision tower);
    ``overrides`` replace kwargs (e.g. ``depth=1`` in tests). Build under
    ``with torch.device("meta"):`` to check shapes without memory.

    Raises:
        ConfigError: timm is not installed.
    """
    try:
        import timm
        from timm.layers import SwiGLUPacked
    except ImportError as exc:
        raise ConfigError(f"{spec.arch} needs timm: pip install 'slidestream[timm]'") from exc
    kwargs = {**spec.kwargs, **overrides}
    if kwargs.get("mlp_layer") == "swiglu_packed":
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    if spec.arch.startswith("swin"):
        kwargs.setdefault("embed_layer", ConvStem)
    model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    if spec.output == "attn_pool":
        return ConchVisionTower(model)
    return model


def build_named_encoder(
    name: str, weights: str | os.PathLike[str] | None = None, **overrides: Any
) -> nn.Module:
    """Encoder ``name`` of :data:`ENCODERS`: (B, 3, size, size) normalised float32 → (B, dim).

    ``weights``: None (random init), ``"hf"`` (the repo's file in the Hugging Face cache) or a
    ``.safetensors``/``.bin``/``.pth`` state-dict file; every tensor the model needs must be
    there with the right shape. ``overrides`` as in :func:`build_encoder_model`.

    Raises:
        ConfigError: unknown name, timm missing, weights absent (naming the repo id, the
            licence and login steps) or not fitting the architecture.
    """
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    spec = ENCODERS[name]
    model = build_encoder_model(spec, **overrides)
    if weights is not None:
        path = _weights_file(name, spec, weights)
        state = convert_state(read_state_dict(path), model, spec.convert)
        fit_state_dict(model, state, str(path))
        log.info("encoder %s: weights from %s", name, path)
    return TokenFeatures(model, spec.output)
