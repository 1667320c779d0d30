"""The streamed slide classifier: a CNN trunk run tile by tile, global pooling, a linear layer.

:class:`SlideSpec` describes the model (what a checkpoint records under ``"model"``);
:func:`build_slide_model` makes it from a spec, :func:`load_slide_model` rebuilds it from a
checkpoint. The state dict holds ``trunk.*`` and ``fc.*`` only: tile size, stages and memory
format are run-time choices that can change between training and inference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from slidestream.data.functional import IMAGENET_MEAN, IMAGENET_STD
from slidestream.errors import ConfigError
from slidestream.models.backbones import split_model
from slidestream.streaming import StagedStreamingModule, StreamingModule

__all__ = [
    "SlideClassifier",
    "SlideSpec",
    "build_slide_model",
    "load_slide_model",
    "outputs_for",
    "predictions",
    "slide_spec",
    "TASKS",
]

log = logging.getLogger(__name__)

TASKS = ("binary", "multiclass", "multilabel", "regression")


@dataclass
class SlideSpec:
    """What a streamed slide classifier is: architecture, cut, pooling, outputs, task.

    ``stream_until``: last trunk stage (default: the last convolutional stage); ``stages``:
    trunk children after which the streaming is cut into stages (``StagedStreamingModule``);
    ``tile_size``: streaming tile in input px; ``classes``: class names (empty for regression).
    """

    name: str = "resnet34"
    task: str = "binary"
    classes: list[str] = field(default_factory=list)
    stream_until: str | None = None
    pooling: str = "max"
    tile_size: int = 1024
    stages: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.pooling not in ("max", "mean"):
            raise ConfigError(f"pooling must be max or mean, got {self.pooling!r}")

    @property
    def outputs(self) -> int:
        return outputs_for(self.task, self.classes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def outputs_for(task: str, classes: Sequence[str]) -> int:
    """Logits of a task: 1 (regression), one per class (multilabel), max(2, classes) else."""
    if task == "regression":
        return 1
    return len(classes) if task == "multilabel" else max(2, len(classes))


class SlideClassifier(nn.Module):
    """Streamed trunk → global max/mean pooling → linear.

    Input: (N, 3, H, W) uint8 (or float in [0, 255]) on any device; the trunk normalises each
    tile on its own device (ImageNet mean/std). Output: (N, outputs) float logits.
    ``background_mask`` (bool (H, W) or (N, 1, H, W)) paints pixels outside the tissue white.
    """

    def __init__(
        self,
        trunk: nn.Sequential,
        channels: int,
        outputs: int,
        *,
        tile_size: int,
        pooling: str = "max",
        stages: Sequence[str] = (),
        channels_last: bool = False,
        check_first_use: bool = True,
    ) -> None:
        super().__init__()
        self.trunk, self.pooling = trunk, pooling
        self.check_first_use = check_first_use  # StreamingModule's first-use check
        self.fc = nn.Linear(channels, outputs)
        self.configure(tile_size, stages, channels_last)

    def configure(
        self, tile_size: int, stages: Sequence[str] = (), channels_last: bool = False
    ) -> None:
        """(Re)build the streaming wrapper: tile size (input px), stage cuts, memory format."""
        kw: dict[str, Any] = dict(
            background=255.0,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            input_scale=1.0 / 255.0,
            channels_last=channels_last,
            check_first_use=self.check_first_use,
        )
        stream: nn.Module = (
            StagedStreamingModule(self.trunk, tile_size, list(stages), **kw)
            if stages
            else StreamingModule(self.trunk, tile_size, **kw)
        )
        # not a registered submodule: the state dict stays trunk.* / fc.* whatever the wrapper
        object.__setattr__(self, "stream", stream)
        self.tile_size, self.stages, self.channels_last = tile_size, list(stages), channels_last

    def features(
        self, x: torch.Tensor, background_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The trunk's feature map (N, C, h, w), computed tile by tile."""
        return self.stream(x, background_mask)

    def forward(self, x: torch.Tensor, background_mask: torch.Tensor | None = None) -> torch.Tensor:
        f = self.features(x, background_mask)
        pooled = f.amax(dim=(2, 3)) if self.pooling == "max" else f.mean(dim=(2, 3))
        return self.fc(pooled)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        old = prefix + "stream.trunk."  # checkpoints before 0.2 held the wrapper's keys
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[prefix + "trunk." + key[len(old) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def build_slide_model(
    spec: SlideSpec,
    weights: str | None = None,
    *,
    channels_last: bool = False,
    check_first_use: bool = True,
) -> SlideClassifier:
    """The model of ``spec``; ``weights`` (file, torchvision name, ``timm/…``) fill the trunk.

    From random init, ResNet residual branches start at zero: the trunk's BatchNorm is frozen
    in eval mode and an unnormalised deep trunk diverges under the first updates otherwise.
    """
    trunk, _ = split_model(
        spec.name,
        spec.stream_until,
        weights,
        zero_init_residual=weights is None,
        drop_head=True,
    )
    with torch.no_grad():
        channels = trunk.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
    trunk.train()
    return SlideClassifier(
        trunk,
        channels,
        spec.outputs,
        tile_size=spec.tile_size,
        pooling=spec.pooling,
        stages=spec.stages,
        channels_last=channels_last,
        check_first_use=check_first_use,
    )


def load_slide_model(ckpt: dict[str, Any]) -> tuple[SlideClassifier, SlideSpec]:
    """Rebuild a streamed model from a ``kind="streaming"`` checkpoint (its spec, then its
    weights). Raises ConfigError for other kinds or weights that do not fit."""
    if ckpt.get("kind") != "streaming":
        raise ConfigError(f"not a streaming checkpoint (kind {ckpt.get('kind')!r})")
    spec = slide_spec(ckpt)
    model = build_slide_model(spec)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ConfigError(f"checkpoint weights do not fit {spec.name}: {str(exc)[:200]}") from exc
    return model, spec


def slide_spec(ckpt: dict[str, Any]) -> SlideSpec:
    """The :class:`SlideSpec` a checkpoint records (older ones: from their config)."""
    model = dict(ckpt.get("model") or {})
    cfg = ckpt.get("config") or {}
    fields = SlideSpec.__dataclass_fields__
    values = {k: v for k, v in model.items() if k in fields}
    values.setdefault("task", ckpt.get("task", cfg.get("task", "binary")))
    values.setdefault("classes", list(ckpt.get("classes", [])))
    tile = ckpt.get("tile_size", cfg.get("tile_size", 1024))
    values.setdefault("tile_size", int(tile) if str(tile).isdigit() else 1024)
    return SlideSpec(**values)


def predictions(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Probabilities (classification) or values (regression) of (N, outputs) logits, float32."""
    if task in ("binary", "multiclass"):
        return torch.softmax(logits.float(), 1)
    if task == "multilabel":
        return torch.sigmoid(logits.float())
    return logits.float().view(-1, 1)
