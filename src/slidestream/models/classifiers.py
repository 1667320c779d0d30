"""Patch classifiers by name: any torchvision classification model, timm with the extra.

``weights`` is None (random init), a torchvision weights name such as ``"DEFAULT"`` or
``"IMAGENET1K_V1"`` (loaded from the torch hub cache; no download happens on a machine without
it beyond what torchvision does), or a path to a state dict file (loaded with
``weights_only=True``). The classification layer is replaced to fit ``num_classes``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from slidestream.errors import ConfigError

__all__ = ["create_classifier", "replace_head"]


def create_classifier(
    name: str, num_classes: int, weights: str | os.PathLike[str] | None = None
) -> nn.Module:
    """A classifier with ``num_classes`` outputs (``timm/<name>`` uses timm if installed)."""
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if name.startswith("timm/"):
        try:
            import timm
        except ImportError as exc:
            raise ConfigError(
                f"{name} needs timm: pip install timm (or slidestream[timm])"
            ) from exc
        pretrained = weights is not None and not Path(str(weights)).is_file()
        model = timm.create_model(name[5:], pretrained=pretrained, num_classes=num_classes)
    else:
        import torchvision

        if name not in torchvision.models.list_models(torchvision.models):
            raise ConfigError(
                f"unknown torchvision model {name!r}; e.g. densenet121, resnet18, "
                f"efficientnet_b0, convnext_tiny (or timm/<name> with timm)"
            )
        tv_weights = weights if weights is not None and not Path(str(weights)).is_file() else None
        try:
            model = torchvision.models.get_model(name, weights=tv_weights)
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"unknown weights {weights!r} for {name}: {exc}") from exc
        replace_head(model, num_classes)
    if weights is not None and Path(str(weights)).is_file():
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        if len(missing) > 4 or unexpected:
            raise ConfigError(
                f"{weights} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return model


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the last Linear of a torchvision classifier for one with ``num_classes`` outputs."""
    for attr in ("fc", "classifier", "head", "heads"):
        parent = getattr(model, attr, None)
        if parent is None:
            continue
        if isinstance(parent, nn.Linear):
            setattr(model, attr, nn.Linear(parent.in_features, num_classes))
            return model
        linears = [(n, m) for n, m in parent.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            path, last = linears[-1]
            owner = parent.get_submodule(path.rsplit(".", 1)[0]) if "." in path else parent
            setattr(owner, path.rsplit(".", 1)[-1], nn.Linear(last.in_features, num_classes))
            return model
    raise ConfigError(f"cannot find the classification layer of {type(model).__name__}")
