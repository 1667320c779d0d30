"""Whole-slide inference: tile predictions, heatmaps, GeoJSON and slide-level calls."""

from __future__ import annotations

from slidestream.infer.predict import (
    PatchPredictor as PatchPredictor,
)
from slidestream.infer.predict import (
    SlidePrediction as SlidePrediction,
)
from slidestream.infer.predict import (
    aggregate as aggregate,
)
