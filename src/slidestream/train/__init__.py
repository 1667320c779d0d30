"""Training: configs, checkpoints, metrics and the patch-classifier trainer.

The names below are resolved on first use, so the command line can read the config dataclasses
(``slidestream.train.config``) without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slidestream._lazy import lazy_getattr

_LAZY = {
    "load_checkpoint": "slidestream.models.checkpoint",
    "save_checkpoint": "slidestream.models.checkpoint",
    "load_config": "slidestream.train.config",
    "classification_metrics": "slidestream.train.metrics",
    "regression_metrics": "slidestream.train.metrics",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from slidestream.models.checkpoint import load_checkpoint as load_checkpoint
    from slidestream.models.checkpoint import save_checkpoint as save_checkpoint
    from slidestream.train.config import load_config as load_config
    from slidestream.train.metrics import classification_metrics as classification_metrics
    from slidestream.train.metrics import regression_metrics as regression_metrics


__getattr__ = lazy_getattr("slidestream.train", _LAZY, globals())
