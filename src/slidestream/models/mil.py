"""Multiple-instance learning (MIL) over frozen patch features, and the patch encoders.

A bag is one slide: ``(N, D)`` float features of its N patches. :class:`MILModel` standardises
each feature (training-set mean and standard deviation, kept as buffers), embeds each
instance (Linear → ReLU → dropout to ``hidden``), pools the bag with an aggregator and applies a
linear head. Every aggregator returns the pooled ``(hidden,)`` vector and one non-negative
weight per instance summing to 1 (the attention heatmap):

- ``abmil`` (default): gated attention (Ilse et al. 2018): ``a_i = w·(tanh(V h_i) ⊙ σ(U h_i))``,
  weights ``softmax(a)``, pooled ``Σ weight_i h_i``;
- ``mean`` / ``max``: baselines; mean weights are uniform, max weights are the share of the
  ``hidden`` dimensions whose maximum instance ``i`` is;
- ``transmil``: TransMIL-style: a class token and ``layers`` pre-norm transformer blocks
  (full softmax self-attention, 4 heads) over the instances; the pooled vector is the class
  token, the weights its head-averaged attention over the instances in the last block. Unlike
  TransMIL (Shao et al. 2021) it has no Nyström approximation and no PPEG positional layer.

Encoders (:func:`create_encoder`) map uint8-normalised ``(B, 3, H, W)`` float patches to
``(B, D)`` features: any torchvision classifier with its head removed (``resnet18``),
a ResNet cut after a stage and average-pooled (``resnet18@layer2``), ``timm/<name>`` with timm,
or ``mean_rgb`` (per-channel mean and standard deviation, D = 6: a cheap test encoder).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from slidestream.errors import ConfigError

__all__ = [
    "AGGREGATORS",
    "MILModel",
    "MILSpec",
    "build_mil_model",
    "create_encoder",
    "load_mil_model",
]

AGGREGATORS = ("abmil", "mean", "max", "transmil")

logger = logging.getLogger(__name__)


class GatedAttention(nn.Module):
    """Gated attention pooling (ABMIL): (N, hidden) → (hidden,), weights (N,)."""

    def __init__(self, hidden: int, attn_dim: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.v = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.u = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.w(self.v(h) * self.u(h)).squeeze(-1).float()
        weights = torch.softmax(scores, 0)
        return (weights.to(h.dtype)[:, None] * h).sum(0), weights


class MeanPool(nn.Module):
    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = h.shape[0]
        return h.mean(0), torch.full((n,), 1.0 / n, device=h.device)


class MaxPool(nn.Module):
    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, idx = h.max(0)
        counts = torch.bincount(idx, minlength=h.shape[0]).float()
        return pooled, counts / counts.sum()


class _Block(nn.Module):
    """Pre-norm transformer block; also returns the class token's attention (heads averaged)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(
        self, x: torch.Tensor, keep: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1, T, dim) → same, and (when ``keep``) the class token's (T,) attention averaged
        over heads. Fused attention (``scaled_dot_product_attention``) never forms the (T, T)
        matrix, so memory grows with T, not T²; the result is ``nn.MultiheadAttention``'s
        (whose parameters this block uses)."""
        a = self.attn
        y = self.norm1(x)
        q, k, v = (t.view(1, -1, a.num_heads, a.head_dim).transpose(1, 2) for t in self._qkv(y))
        drop = a.dropout if self.training else 0.0
        out = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        out = a.out_proj(out.transpose(1, 2).reshape(y.shape))
        weights = None
        if keep:
            scores = (q[0, :, :1] @ k[0].transpose(-1, -2))[:, 0] / a.head_dim**0.5
            weights = torch.softmax(scores.float(), -1).mean(0)
        x = x + out
        return x + self.mlp(self.norm2(x)), weights

    def _qkv(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        return nn.functional.linear(y, w, b).chunk(3, dim=-1)


class TransformerPool(nn.Module):
    """Class token + transformer blocks over the instances (TransMIL-style, see module doc)."""

    def __init__(self, hidden: int, layers: int = 2, heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"hidden must be a multiple of {heads} for transmil, got {hidden}")
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
        nn.init.normal_(self.cls, std=0.02)
        self.blocks = nn.ModuleList(_Block(hidden, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.cls.to(h.dtype), h[None]], 1)
        weights = torch.ones(x.shape[1], device=h.device)
        for i, block in enumerate(self.blocks):
            x, w = block(x, keep=i == len(self.blocks) - 1)
            weights = w if w is not None else weights
        att = weights[1:].float()
        return self.norm(x[0, 0]), att / att.sum().clamp_min(1e-12)


@dataclass
class MILSpec:
    """What rebuilds a MIL model: input feature size, aggregator and head outputs."""

    in_dim: int
    outputs: int
    aggregator: str = "abmil"
    hidden: int = 256
    dropout: float = 0.25
    layers: int = 2  # transmil blocks
    task: str = "binary"
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.aggregator not in AGGREGATORS:
            raise ConfigError(f"aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}")
        if self.in_dim < 1 or self.outputs < 1 or self.hidden < 1:
            raise ConfigError("in_dim, outputs and hidden must be >= 1")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class MILModel(nn.Module):
    """Instance embedding, bag pooling and a linear head. ``forward((N, D))`` → logits
    ``(1, outputs)``; :meth:`forward_attention` also returns the ``(N,)`` instance weights."""

    def __init__(self, spec: MILSpec) -> None:
        super().__init__()
        self.spec = spec
        h = spec.hidden
        self.embed = nn.Sequential(nn.Linear(spec.in_dim, h), nn.ReLU(), nn.Dropout(spec.dropout))
        pools: dict[str, Any] = {
            "abmil": lambda: GatedAttention(h, max(h // 2, 1), spec.dropout),
            "mean": MeanPool,
            "max": MaxPool,
            "transmil": lambda: TransformerPool(h, spec.layers, dropout=spec.dropout),
        }
        self.pool = pools[spec.aggregator]()
        self.fc = nn.Linear(h, spec.outputs)
        # per-feature standardisation (training-set statistics, saved with the weights)
        self.register_buffer("feat_mean", torch.zeros(spec.in_dim))
        self.register_buffer("feat_std", torch.ones(spec.in_dim))

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Subtract ``mean`` and divide by ``std`` (both (D,)) before the instance embedding."""
        self.feat_mean.copy_(mean)
        self.feat_std.copy_(std.clamp_min(1e-6))

    def forward_attention(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, outputs) logits and (N,) float32 instance weights of one bag (N, D)."""
        if bag.dim() == 3:
            bag = bag[0]
        if bag.dim() != 2 or bag.shape[0] == 0:
            raise ConfigError(f"a bag must be (N, D) with N >= 1, got {tuple(bag.shape)}")
        bag = (bag - self.feat_mean.to(bag.dtype)) / self.feat_std.to(bag.dtype)
        pooled, weights = self.pool(self.embed(bag))
        return self.fc(pooled)[None], weights.float()

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        return self.forward_attention(bag)[0]


def build_mil_model(spec: MILSpec) -> MILModel:
    return MILModel(spec)


def load_mil_model(ckpt: dict[str, Any]) -> tuple[MILModel, MILSpec]:
    """The model of a ``kind == "mil"`` checkpoint, weights loaded, in eval mode."""
    if ckpt.get("kind") != "mil":
        raise ConfigError(f"not a MIL checkpoint (kind {ckpt.get('kind')!r}); train one: train-mil")
    spec = MILSpec(**ckpt["model"])
    model = MILModel(spec)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), spec


# --- encoders ---------------------------------------------------------------------------------
class MeanRGB(nn.Module):
    """Per-channel mean and standard deviation of a (B, 3, H, W) batch → (B, 6)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def _pretrained_hint(name: str, named: dict) -> str:
    if name in named:
        return "hf (its Hugging Face cache)"
    if name.startswith("timm/"):
        return "pretrained (timm's hub cache)"
    return "DEFAULT (torchvision's ImageNet weights)"


def create_encoder(name: str, weights: str | os.PathLike[str] | None = None) -> nn.Module:
    """A frozen patch encoder in eval mode: (B, 3, H, W) normalised float → (B, D) features.

    ``name``: ``mean_rgb``; a torchvision classifier (head replaced by identity);
    ``resnet18@layer2`` (a ResNet trunk cut after a stage, then global average pooling);
    ``timm/<name>`` (needs timm; ``num_classes=0``); a foundation model of
    :data:`~slidestream.models.encoders.ENCODERS` (``uni``, ``virchow2``, ...; ``weights="hf"``
    loads it from the Hugging Face cache). ``weights`` as in
    :func:`~slidestream.models.weights.load_weights` (file, torchvision name, hub cache).
    A learned encoder without ``weights`` logs a warning naming it: its features are random.
    """
    from slidestream.models.encoders import ENCODERS, build_named_encoder

    if weights is None and name != "mean_rgb":
        logger.warning(
            "encoder %s has random weights (no weights given): features will not be "
            "meaningful; compute them with slidestream features --weights %s or a weights file",
            name,
            _pretrained_hint(name, ENCODERS),
        )
    if name == "mean_rgb":
        model: nn.Module = MeanRGB()
    elif name in ENCODERS:
        model = build_named_encoder(name, weights)
    elif "@" in name:
        from slidestream.models.backbones import split_model

        arch, until = name.split("@", 1)
        trunk, _ = split_model(arch, until, weights=weights, drop_head=True)
        model = nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    else:
        from slidestream.models.classifiers import create_classifier, head_name

        model = create_classifier(name, 1, weights)
        if name.startswith("timm/"):
            model.reset_classifier(0)
        else:
            path = head_name(model)
            owner = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
            setattr(owner, path.rsplit(".", 1)[-1], nn.Identity())
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
