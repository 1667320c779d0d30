"""Evaluation metrics (scikit-learn) for classification and regression."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["classification_metrics", "regression_metrics"]


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, num_classes: int | None = None
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, ROC AUC (one-vs-rest for >2 classes), quadratic-weighted
    kappa and the confusion matrix of ``labels`` (N,) against ``probs`` (N, C)."""
    from sklearn.metrics import (
        balanced_accuracy_score,
        cohen_kappa_score,
        confusion_matrix,
        roc_auc_score,
    )

    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    n_cls = num_classes or probs.shape[1]
    pred = probs.argmax(1)
    out: dict[str, Any] = {"accuracy": float((pred == labels).mean()) if len(labels) else 0.0}
    present = np.unique(labels)
    out["balanced_accuracy"] = float(balanced_accuracy_score(labels, pred)) if len(labels) else 0.0
    out["auc"] = float("nan")
    if len(present) >= 2:
        if n_cls == 2:
            out["auc"] = float(roc_auc_score(labels, probs[:, 1]))
        elif len(present) == n_cls:
            p = probs / probs.sum(1, keepdims=True)
            out["auc"] = float(roc_auc_score(labels, p, multi_class="ovr", labels=range(n_cls)))
    out["kappa_quadratic"] = (
        float(cohen_kappa_score(labels, pred, weights="quadratic"))
        if len(present) >= 2
        else float("nan")
    )
    out["confusion"] = confusion_matrix(labels, pred, labels=list(range(n_cls))).tolist()
    return out


def regression_metrics(targets: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """Mean absolute error and Spearman rank correlation."""
    from scipy.stats import spearmanr
    from sklearn.metrics import mean_absolute_error

    targets, preds = np.asarray(targets, float).ravel(), np.asarray(preds, float).ravel()
    rho = spearmanr(targets, preds).statistic if len(targets) > 1 else float("nan")
    return {"mae": float(mean_absolute_error(targets, preds)), "spearman": float(rho)}
