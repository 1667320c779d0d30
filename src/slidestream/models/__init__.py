"""Model helpers: torchvision backbones split into a streamable trunk and a head."""

from __future__ import annotations

from slidestream.models.backbones import MODEL_NAMES, FrozenNormTrunk, split_model, stage_names

__all__ = ["MODEL_NAMES", "FrozenNormTrunk", "split_model", "stage_names"]
