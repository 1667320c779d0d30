"""Split torchvision classifiers into a spatially local trunk and a head.

``split_model("resnet34", stream_until="layer4")`` returns ``(trunk, head)`` with
``head(trunk(x)) == model(x)``: the trunk holds the stages up to and including
``stream_until`` (to be streamed tile by tile), the head the remaining stages, global pooling
and the classifier. BatchNorm (and dropout-like layers) in the trunk stay in eval mode even
when ``.train()`` is called on a parent, so the trunk stays spatially local; their affine
parameters remain trainable.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from slidestream.errors import ConfigError
from slidestream.models.weights import load_weights

__all__ = ["FrozenNormTrunk", "MODEL_NAMES", "split_model", "stage_names"]

logger = logging.getLogger(__name__)


class FrozenNormTrunk(nn.Sequential):
    """A Sequential trunk whose normalisation and dropout layers never leave eval mode."""

    def train(self, mode: bool = True) -> FrozenNormTrunk:
        super().train(mode)
        for mod in self.modules():
            frozen = isinstance(
                mod,
                nn.modules.batchnorm._BatchNorm
                | nn.modules.instancenorm._InstanceNorm
                | nn.modules.dropout._DropoutNd,
            ) or type(mod).__name__ in ("StochasticDepth", "DropPath")
            if frozen:
                mod.eval()
        return self


@dataclass(frozen=True)
class _Spec:
    """How to cut one torchvision architecture: its stages in order and its head tail."""

    stages: Callable[[nn.Module], list[tuple[str, nn.Module]]]
    tail: Callable[[nn.Module], list[nn.Module]]
    default_until: str
    head: str = "classifier"  # the declared classification layer (dropped for new heads)


def _resnet_stages(m: nn.Module) -> list[tuple[str, nn.Module]]:
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return [(n, getattr(m, n)) for n in names]


def _features_stages(m: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"features.{n}", mod) for n, mod in m.features.named_children()]


def _densenet_stages(m: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, mod) for n, mod in m.features.named_children()]


_SPECS: dict[str, _Spec] = {
    **{
        name: _Spec(
            _resnet_stages,
            lambda m: [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), m.fc],
            "layer4",
            "fc",
        )
        for name in ("resnet18", "resnet34", "resnet50")
    },
    "densenet121": _Spec(
        _densenet_stages,
        lambda m: [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), m.classifier],
        "norm5",
    ),
    "mobilenet_v2": _Spec(
        _features_stages,
        lambda m: [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), *m.classifier],
        "features.18",
    ),
    "convnext_tiny": _Spec(_features_stages, lambda m: [m.avgpool, *m.classifier], "features.7"),
}

MODEL_NAMES: tuple[str, ...] = tuple(_SPECS)


def _build(
    name: str,
    weights: str | os.PathLike | None,
    zero_init_residual: bool = False,
    drop_head: bool = False,
) -> nn.Module:
    import torchvision

    builder = getattr(torchvision.models, name)
    kwargs = (
        {"zero_init_residual": True} if zero_init_residual and name.startswith("resnet") else {}
    )
    model = builder(weights=None, **kwargs)
    if weights is not None:
        load_weights(model, weights, arch=name, drop=(_spec(name).head,) if drop_head else ())
    return model


def stage_names(name: str) -> list[str]:
    """Names accepted by ``split_model(name, stream_until=...)``, in order."""
    spec = _spec(name)
    return [n for n, _ in spec.stages(_build(name, None))]


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return _SPECS[name]


def split_model(
    name: str,
    stream_until: str | None = None,
    weights: str | os.PathLike | None = None,
    num_classes: int | None = None,
    zero_init_residual: bool = False,
    drop_head: bool | None = None,
) -> tuple[FrozenNormTrunk, nn.Sequential]:
    """Build torchvision model ``name`` and split it into ``(trunk, head)``.

    Args:
        name: one of :data:`MODEL_NAMES`.
        stream_until: last stage kept in the trunk (default: the last convolutional stage),
            e.g. ``"layer4"`` or ``"layer2"`` for a ResNet, ``"features.7"`` for ConvNeXt.
        weights: ``None`` (random init), a torchvision weights name, or a state-dict file.
        num_classes: replace the classifier's last Linear with one of this many outputs.
        zero_init_residual: with random init, start each ResNet residual branch at zero (the
            last BatchNorm's weight is 0; Goyal et al. 2017). With BatchNorm frozen in eval
            mode nothing renormalises the activations, and a deep random-init trunk otherwise
            blows up under the first optimizer steps. Other models ignore it.
        drop_head: leave the declared classification layer (``fc`` for ResNets, ``classifier``
            otherwise) out of ``weights``; default: when ``num_classes`` replaces it.

    Raises:
        ConfigError: unknown model, stage or weights, or weights that do not fit.
    """
    spec = _spec(name)
    model = _build(
        name,
        weights,
        zero_init_residual,
        drop_head=num_classes is not None if drop_head is None else drop_head,
    )
    stages = spec.stages(model)
    names = [n for n, _ in stages]
    until = spec.default_until if stream_until is None else stream_until
    if until not in names:
        raise ConfigError(f"stream_until must be one of {names} for {name}, got {until!r}")
    cut = names.index(until) + 1
    tail = spec.tail(model)
    if num_classes is not None:
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        last = tail[-1]
        tail[-1] = nn.Linear(last.in_features, num_classes)
    trunk = FrozenNormTrunk(OrderedDict((n.replace(".", "_"), m) for n, m in stages[:cut]))
    head = nn.Sequential(*[m for _, m in stages[cut:]], *tail)
    trunk.train()  # keeps norms/dropout frozen, as a training loop would
    logger.debug("split %s at %s: %d trunk stages", name, until, cut)
    return trunk, head
