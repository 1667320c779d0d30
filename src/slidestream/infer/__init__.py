"""Whole-slide inference: tile predictions, heatmaps, GeoJSON and slide-level calls."""

from __future__ import annotations

from slidestream.infer.engine import (
    Predictor as Predictor,
)
from slidestream.infer.engine import (
    SlidePrediction as SlidePrediction,
)
from slidestream.infer.engine import (
    load_predictor as load_predictor,
)
from slidestream.infer.predict import (
    PatchPredictor as PatchPredictor,
)
from slidestream.infer.predict import (
    aggregate as aggregate,
)
