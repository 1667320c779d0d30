"""Patch classifiers by name: any torchvision classification model, timm with the extra.

``weights`` is None (random init), a torchvision weights name such as ``"DEFAULT"`` or
``"IMAGENET1K_V1"`` (loaded from the torch hub cache; no download happens on a machine without
it beyond what torchvision does), or a path to a state dict file (loaded with
``weights_only=True``). The classification layer is replaced to fit ``num_classes``.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from slidestream.errors import ConfigError
from slidestream.models.weights import load_weights

__all__ = ["create_classifier", "head_name", "replace_head"]


def create_classifier(
    name: str, num_classes: int, weights: str | os.PathLike[str] | None = None
) -> nn.Module:
    """A classifier with ``num_classes`` outputs (``timm/<name>`` uses timm if installed).

    ``weights`` go through :func:`~slidestream.models.weights.load_weights` with the model's
    declared classification layer dropped (the new head keeps its fresh initialisation).
    Raises ConfigError for unknown models or weights that do not fit.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if name.startswith("timm/"):
        try:
            import timm
        except ImportError as exc:
            raise ConfigError(
                f"{name} needs timm: pip install timm (or slidestream[timm])"
            ) from exc
        try:
            model = timm.create_model(name[5:], pretrained=False, num_classes=num_classes)
        except RuntimeError as exc:
            raise ConfigError(f"unknown timm model {name!r}: {exc}") from exc
        head = [model.pretrained_cfg.get("classifier", "head")]
        if weights is not None and not Path(str(weights)).is_file():
            weights = name  # a pretrained tag: the timm hub cache of this model
    else:
        import torchvision

        if name not in torchvision.models.list_models(torchvision.models):
            raise ConfigError(
                f"unknown torchvision model {name!r}; e.g. densenet121, resnet18, "
                f"efficientnet_b0, convnext_tiny (or timm/<name> with timm)"
            )
        model = torchvision.models.get_model(name, weights=None)
        head = [replace_head(model, num_classes)]
    if weights is not None:
        load_weights(model, weights, arch=name, drop=head)
    return model


def head_name(model: nn.Module) -> str:
    """Qualified name of the last Linear of a torchvision classifier's head (e.g. ``fc``,
    ``classifier.1``, ``heads.head``); ConfigError if there is none."""
    for attr in ("fc", "classifier", "head", "heads"):
        parent = getattr(model, attr, None)
        if parent is None:
            continue
        if isinstance(parent, nn.Linear):
            return attr
        linears = [n for n, m in parent.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            return f"{attr}.{linears[-1]}"
    raise ConfigError(f"cannot find the classification layer of {type(model).__name__}")


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Swap the last Linear of a torchvision classifier for one with ``num_classes`` outputs;
    returns its qualified name."""
    path = head_name(model)
    owner = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    last = model.get_submodule(path)
    setattr(owner, path.rsplit(".", 1)[-1], nn.Linear(last.in_features, num_classes))
    return path
