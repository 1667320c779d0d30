"""Model helpers: torchvision backbones split into a streamable trunk and a head, and patch
classifiers by name."""

from __future__ import annotations

from slidestream.models.backbones import MODEL_NAMES, FrozenNormTrunk, split_model, stage_names
from slidestream.models.classifiers import create_classifier, replace_head

__all__ = [
    "MODEL_NAMES",
    "FrozenNormTrunk",
    "split_model",
    "stage_names",
    "create_classifier",
    "replace_head",
]
