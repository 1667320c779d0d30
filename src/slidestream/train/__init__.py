"""Training: configs, checkpoints, metrics and the patch-classifier trainer."""

from __future__ import annotations

from slidestream.models.checkpoint import (
    load_checkpoint as load_checkpoint,
)
from slidestream.models.checkpoint import (
    save_checkpoint as save_checkpoint,
)
from slidestream.train.config import load_config as load_config
from slidestream.train.metrics import (
    classification_metrics as classification_metrics,
)
from slidestream.train.metrics import (
    regression_metrics as regression_metrics,
)
