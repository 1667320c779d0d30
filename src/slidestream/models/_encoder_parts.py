"""Modules and checkpoint converters behind :mod:`slidestream.models.encoders`.

``ConvStem`` is CTransPath's patch embedding, ``ConchVisionTower`` CONCH v1.5's vision tower
(ViT trunk → attention pooler → LayerNorm), ``TokenFeatures`` picks the output feature of a timm
ViT, and :func:`convert_state` maps a released checkpoint's key layout onto the timm model.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConchVisionTower", "ConvStem", "TokenFeatures", "convert_state"]


class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3x3 conv+BN+ReLU, then a 1x1 conv.

    (B, 3, H, W) float → (B, H/4, W/4, embed_dim) channels-last, as timm's Swin expects.
    """

    def __init__(
        self,
        img_size: Any = 224,
        patch_size: Any = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: Any = None,
        **_: Any,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, cout = in_chans, embed_dim // 8
        for _i in range(2):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            cin, cout = cout, cout * 2
        layers.append(nn.Conv2d(cin, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()
        size = tuple(img_size) if isinstance(img_size, tuple | list) else (img_size, img_size)
        self.img_size, self.grid_size = size, (size[0] // 4, size[1] // 4)
        self.patch_size, self.num_patches = (4, 4), self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class AttentionalPooler(nn.Module):
    """CoCa/CONCH attention pooling: ``n_queries`` learned queries attend to the tokens.

    (B, N, context_dim) → (B, n_queries, d_model); parameter names as in the CONCH checkpoint.
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.heads = n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_k, self.ln_q = nn.LayerNorm(context_dim), nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, d_model * 2, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, h, n, d_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.to_q(self.ln_q(self.query)).expand(x.shape[0], -1, -1)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        return self.to_out(out.transpose(1, 2).flatten(2))


class ConchVisionTower(nn.Module):
    """CONCH v1.5 image encoder: ViT-L/16 tokens → attention pooler (768) → LayerNorm.

    (B, 3, H, W) normalised float → (B, 768). Keys ``trunk.*``, ``attn_pool_contrast.*``,
    ``ln_contrast.*`` as in ``pytorch_model_vision.bin``.
    """

    def __init__(self, trunk: nn.Module, dim: int = 768) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(dim, trunk.embed_dim, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


class TokenFeatures(nn.Module):
    """(B, 3, H, W) → (B, D): the class token, class token + mean of the patch tokens
    (prefix tokens such as registers skipped), or the model's own output (``pooled``,
    ``attn_pool``)."""

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output in ("pooled", "attn_pool"):
            return self.model(x)
        tokens = self.model.forward_features(x)
        cls = tokens[:, 0]
        if self.output == "cls":
            return cls
        return torch.cat([cls, tokens[:, self.model.num_prefix_tokens :].mean(1)], 1)


def _resample_pos(state: dict, key: str, vit: nn.Module) -> None:
    """Resample ``state[key]`` (a ViT pos_embed) to ``vit``'s patch grid when it differs."""
    if key in state and state[key].shape != vit.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        state[key] = resample_abs_pos_embed(
            state[key], list(vit.patch_embed.grid_size), num_prefix_tokens=prefix
        )


_DINOV2 = [  # transformers Dinov2Model names → timm VisionTransformer names
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
    (r"^layernorm\.", "norm."),
]


def _from_hf_dinov2(state: dict, model: nn.Module) -> dict:
    state = {k.removeprefix("dinov2."): v for k, v in state.items() if "mask_token" not in k}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        qkv = re.match(
            r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(\w+)$", key
        )
        if qkv:
            if qkv.group(2) == "query":  # q, k, v stacked into one qkv projection
                i, kind = qkv.group(1), qkv.group(3)
                parts = [
                    state[f"encoder.layer.{i}.attention.attention.{n}.{kind}"]
                    for n in ("query", "key", "value")
                ]
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, 0)
            continue
        for pattern, repl in _DINOV2:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value
    _resample_pos(out, "pos_embed", model)
    return out


def convert_state(state: dict, model: nn.Module, kind: str | None) -> dict:
    """``state`` in the key layout of ``model``: ``None`` (timm's own), ``"conch"`` (pos_embed
    resampled to the trunk's grid), ``"hf_dinov2"`` (transformers Dinov2) or ``"swin_v1"``
    (timm 0.5 Swin: downsample moved to the next stage, buffers dropped)."""
    if kind == "conch":
        state = dict(state)
        _resample_pos(state, "trunk.pos_embed", model.trunk)
    elif kind == "hf_dinov2":
        state = _from_hf_dinov2(state, model)
    elif kind == "swin_v1":
        from timm.models.swin_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, model)
    return state
