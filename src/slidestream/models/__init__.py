"""Models: torchvision backbones split into a streamable trunk and a head, patch classifiers
by name, the streamed slide classifier, the checkpoint format and one weights loader."""

from __future__ import annotations

from slidestream.models.backbones import MODEL_NAMES, FrozenNormTrunk, split_model, stage_names
from slidestream.models.checkpoint import load_checkpoint, save_checkpoint
from slidestream.models.classifiers import create_classifier, head_name, replace_head
from slidestream.models.slide import (
    SlideClassifier,
    SlideSpec,
    build_slide_model,
    load_slide_model,
    predictions,
)
from slidestream.models.weights import WeightsReport, load_weights

__all__ = [
    "MODEL_NAMES",
    "FrozenNormTrunk",
    "SlideClassifier",
    "SlideSpec",
    "WeightsReport",
    "build_slide_model",
    "create_classifier",
    "head_name",
    "load_checkpoint",
    "load_slide_model",
    "load_weights",
    "predictions",
    "replace_head",
    "save_checkpoint",
    "split_model",
    "stage_names",
]
