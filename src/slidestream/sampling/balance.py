"""Slide-level sampling weights: how often each slide of a cohort is visited."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from slidestream.errors import ConfigError

__all__ = ["slide_weights"]


def slide_weights(
    labels: Sequence[str | None], balance: str | Mapping[str, float] | None = None
) -> np.ndarray:
    """Probabilities (summing to 1) of visiting each slide.

    ``None``: every slide equally. ``"balanced"``: every label equally often (each slide gets
    ``1 / (n_labels * count(label))``; unlabelled slides count as their own group). A mapping
    ``{label: weight}``: labels in that proportion (labels not named get weight 0).
    """
    n = len(labels)
    if n == 0:
        return np.zeros(0)
    if balance is None:
        return np.full(n, 1.0 / n)
    counts = Counter(labels)
    if balance == "balanced":
        w = np.array([1.0 / (len(counts) * counts[lab]) for lab in labels])
    elif isinstance(balance, Mapping):
        unknown = set(balance) - {str(k) for k in counts}
        if unknown:
            raise ConfigError(f"balance names labels not in the cohort: {sorted(unknown)}")
        if any(v < 0 for v in balance.values()):
            raise ConfigError("balance weights must be >= 0")
        w = np.array([balance.get(lab, 0.0) / counts[lab] for lab in labels])
    else:
        raise ConfigError(
            f"balance must be None, 'balanced' or a {{label: weight}} mapping, got {balance!r}"
        )
    if w.sum() <= 0:
        raise ConfigError("balance gives every slide weight 0")
    return w / w.sum()
