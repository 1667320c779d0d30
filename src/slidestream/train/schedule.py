"""Learning-rate schedules of every trainer: constant, cosine or step, after a linear warm-up.

Pure arithmetic (no torch): :func:`lr_factor` is the multiplier of each parameter group's
``lr`` at an optimizer step; :meth:`slidestream.train.task.Task.make_scheduler` turns it into a
per-step ``LambdaLR``, whose state ``last.pt`` keeps for resume.
"""

from __future__ import annotations

import math

from slidestream.errors import ConfigError

__all__ = ["SCHEDULES", "check_schedule", "lr_factor"]

# "none" is the patch trainer's older name of "constant"
SCHEDULES = ("constant", "cosine", "step", "none")
STEP_AT = (0.5, 0.75)  # "step": lr × STEP_GAMMA at these fractions of the post-warm-up steps
STEP_GAMMA = 0.1


def check_schedule(schedule: str, warmup_epochs: float, epochs: int) -> None:
    """Raise ConfigError unless ``schedule`` is known and ``0 <= warmup_epochs <= epochs``."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {SCHEDULES[:3]}, got {schedule!r}")
    if not 0 <= warmup_epochs <= epochs:
        raise ConfigError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based) of ``total_steps``.

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (reaching the
    full lr at the last warm-up step). After it, over the remaining steps (progress ``t`` from
    0 to 1 over the steps left, so the last step's ``t`` is just under 1): ``constant`` (or
    ``none``) 1; ``cosine`` ``(1 + cos(pi t)) / 2``, towards 0; ``step`` 1, then ×0.1 from
    t = 0.5 and ×0.01 from t = 0.75.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "step":
        return STEP_GAMMA ** sum(t >= at for at in STEP_AT)
    return 1.0
