"""One weights loader: a torchvision weights name, a ``timm/<name>`` model's weights, or a file.

Every trainer and builder goes through :func:`load_weights`, so every source is read the same
way: files with ``torch.load(..., weights_only=True)`` (a plain state dict, a ``{"state_dict":
...}`` wrapper or a slidestream checkpoint; a DDP ``module.`` prefix is stripped), torchvision
names from the torch hub cache (``"DEFAULT"``, ``"IMAGENET1K_V1"`` or
``"ResNet34_Weights.IMAGENET1K_V1"``), timm names from the Hugging Face cache. The
classification head is dropped by its declared module name (``drop=("fc",)``), never by
guessing from shapes. Missing and unexpected keys are logged; keys the model needs that the
source lacks, or tensors of the wrong shape, raise :class:`~slidestream.errors.ConfigError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slidestream.errors import ConfigError

__all__ = ["WeightsReport", "fit_state_dict", "load_weights", "read_state_dict"]

log = logging.getLogger(__name__)


@dataclass
class WeightsReport:
    """What :func:`load_weights` did: the source, keys loaded, dropped, missing and unexpected."""

    source: str
    loaded: int = 0
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def read_state_dict(source: str | os.PathLike[str], arch: str | None = None) -> dict:
    """The state dict of ``source``: a file (``.safetensors`` or ``torch.save``), a torchvision weights name for torchvision model
    ``arch``, or ``timm/<name>`` (needs timm). Raises ConfigError naming the source and the fix."""
    text = str(source)
    if Path(text).is_file() and text.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return {k.removeprefix("module."): v for k, v in load_file(text).items()}
        except Exception as exc:
            raise ConfigError(f"cannot read weights file {text}: {exc}") from exc
    if Path(text).is_file():
        try:
            state = torch.load(text, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError(f"cannot read weights file {text}: {exc}") from exc
        if isinstance(state, dict):
            for key in ("state_dict", "model_state_dict", "model"):
                if isinstance(state.get(key), dict):
                    state = state[key]
                    break
        if not isinstance(state, dict):
            raise ConfigError(f"{text} holds no state dict")
        return {k.removeprefix("module."): v for k, v in state.items()}
    if text.startswith("timm/"):
        try:
            import timm
        except ImportError as exc:
            raise ConfigError(f"{text} needs timm: pip install 'slidestream[timm]'") from exc
        try:
            return timm.create_model(text[5:], pretrained=True).state_dict()
        except Exception as exc:  # not in the cache and no network, or no such model
            raise ConfigError(f"cannot load timm weights {text}: {exc}") from exc
    return _torchvision_state(text, arch)


def _torchvision_state(text: str, arch: str | None) -> dict:
    import torchvision

    try:
        if "." in text:  # "ResNet34_Weights.IMAGENET1K_V1"
            enum_name, member = text.split(".", 1)
            weights = getattr(torchvision.models, enum_name)[member]
        else:
            if arch is None:
                raise KeyError(text)
            weights = torchvision.models.get_model_weights(arch)[text]
    except (KeyError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"unknown weights {text!r}"
            + (f" for {arch}" if arch else "")
            + ": pass a torchvision weights name such as 'DEFAULT' or 'IMAGENET1K_V1', "
            "'timm/<name>', or a path to a weights file"
        ) from exc
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # not in the hub cache and no network
        raise ConfigError(
            f"cannot load {weights} (torch hub cache {torch.hub.get_dir()}): {exc}; "
            "download it once on a machine with internet, or pass a weights file"
        ) from exc


def load_weights(
    model: nn.Module,
    source: str | os.PathLike[str],
    *,
    arch: str | None = None,
    drop: Sequence[str] = (),
) -> WeightsReport:
    """Load ``source`` into ``model`` (in place) and report what happened.

    Args:
        model: the module to fill.
        source: weights file, torchvision weights name (for torchvision model ``arch``) or
            ``timm/<name>``.
        arch: torchvision model name, needed for short weights names such as ``"DEFAULT"``.
        drop: module names whose keys are removed from the source first (the head a new task
            replaces, e.g. ``("fc",)``); the model keeps its own initialisation there.

    Raises:
        ConfigError: the source cannot be read, lacks keys the model needs outside ``drop``,
            or holds a tensor whose shape differs from the model's.
    """
    return fit_state_dict(model, read_state_dict(source, arch), str(source), drop=drop)


def fit_state_dict(
    model: nn.Module, state: dict, source: str, *, drop: Sequence[str] = ()
) -> WeightsReport:
    """Load the already-read ``state`` into ``model`` as :func:`load_weights` does; ``source``
    names it in messages. Raises ConfigError for missing keys or shapes that differ."""
    report = WeightsReport(str(source))
    report.dropped = [k for k in state if _under(k, drop)]
    state = {k: v for k, v in state.items() if not _under(k, drop)}
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and hasattr(v, "shape") and v.shape != own[k].shape
    ]
    if wrong:
        raise ConfigError(f"weights {source} do not fit the model: shapes differ at {wrong[:3]}")
    result = model.load_state_dict(state, strict=False)
    report.missing = [k for k in result.missing_keys if not _under(k, drop)]
    report.unexpected = list(result.unexpected_keys)
    report.loaded = len(state) - len(report.unexpected)
    if report.missing:
        raise ConfigError(
            f"weights {source} lack {len(report.missing)} keys the model needs, "
            f"e.g. {report.missing[:3]}: are they for another architecture?"
        )
    if report.unexpected:
        log.warning(
            "weights %s: %d unexpected keys ignored, e.g. %s",
            source,
            len(report.unexpected),
            report.unexpected[:3],
        )
    log.info(
        "loaded %d tensors from %s (dropped %d head keys)",
        report.loaded,
        source,
        len(report.dropped),
    )
    return report
