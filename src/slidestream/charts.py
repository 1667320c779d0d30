"""Charts with real axes, drawn with matplotlib (Agg, no display): training curves, ROC and
precision–recall curves with their AUC, confusion matrices, calibration. Every function returns
a ``matplotlib.figure.Figure``; :func:`save` writes it as PNG and/or SVG, :func:`to_array` gives
(H, W, 3) uint8 pixels (for a PNG or TensorBoard from one draw)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "calibration_figure",
    "confusion_figure",
    "curves_figure",
    "pr_figure",
    "roc_figure",
    "save",
    "to_array",
]


def _figure(w: float, h: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def curves_figure(history: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> Any:
    """One panel per metric of ``keys`` over the epochs of ``history`` (rows with ``epoch``),
    each on its own y axis with values and integer epoch ticks; a single epoch is a point."""
    keys = [k for k in keys if any(_num(r.get(k)) is not None for r in history)]
    cols = min(3, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    fig = _figure(4.2 * cols, 3.0 * rows)
    epochs = [int(r["epoch"]) for r in history]
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        pts = [(e, _num(r.get(key))) for e, r in zip(epochs, history, strict=True)]
        pts = [(e, v) for e, v in pts if v is not None]
        ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", markersize=4)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if key.endswith(("auc", "accuracy")):
            lo = min(v for _, v in pts)
            ax.set_ylim(min(0.0, lo) - 0.02, 1.02)
    if not keys:
        fig.add_subplot(1, 1, 1).text(0.5, 0.5, "no epochs yet", ha="center")
    return fig


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _one_vs_rest(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]):  # noqa: ANN202
    """(name, binary truth, score) per curve: the positive class for two classes, else each."""
    probs = np.asarray(probs, float)
    if probs.shape[1] == 2:
        return [(classes[1] if len(classes) > 1 else "1", y == 1, probs[:, 1])]
    return [(c, y == k, probs[:, k]) for k, c in enumerate(classes) if 0 < (y == k).sum() < len(y)]


def roc_figure(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> Any:
    """ROC curve(s) of labels ``y`` (N,) against class probabilities (N, C), with each AUC
    (``sklearn.metrics.roc_auc_score``) in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for name, truth, score in _one_vs_rest(np.asarray(y), probs, classes):
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, score)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(truth, score):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title("ROC")
    if ax.get_lines()[:-1]:
        ax.legend(loc="lower right", fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def pr_figure(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> Any:
    """Precision–recall curve(s) with average precision in the legend."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for name, truth, score in _one_vs_rest(np.asarray(y), probs, classes):
        if not truth.any():
            continue
        prec, rec, _ = precision_recall_curve(truth, score)
        ax.plot(rec, prec, label=f"{name} (AP {average_precision_score(truth, score):.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title("precision–recall")
    if ax.get_lines():
        ax.legend(loc="lower left", fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def confusion_figure(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> Any:
    """Confusion matrix (rows: true, columns: predicted) with counts and class names."""
    m = np.asarray(matrix, dtype=float)
    n = len(classes)
    fig = _figure(1.2 + 0.9 * n, 1.0 + 0.8 * n)
    ax = fig.add_subplot(1, 1, 1)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{int(m[i, j])}",
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.6 else "black",
                fontsize=11,
            )
    ax.set_xticks(range(n), [str(c) for c in classes], rotation=30, ha="right")
    ax.set_yticks(range(n), [str(c) for c in classes])
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title("confusion (counts)")
    return fig


def calibration_figure(y: np.ndarray, p_pos: np.ndarray, bins: int = 10) -> Any:
    """Reliability diagram of a binary task: observed positive rate per bin of predicted
    probability ``p_pos``, against the diagonal."""
    from sklearn.calibration import calibration_curve

    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    observed, predicted = calibration_curve(np.asarray(y), np.asarray(p_pos), n_bins=bins)
    ax.plot(predicted, observed, marker="o", label="model")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    ax.set(xlabel="predicted probability", ylabel="observed rate", xlim=(0, 1), ylim=(0, 1))
    ax.set_title("calibration")
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def save(fig: Any, path: str | Path, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Write ``fig`` as ``path`` with each suffix of ``formats`` (PNG at 100 dpi); returns
    the files."""
    base = Path(path).with_suffix("")
    out = []
    for fmt in formats:
        target = base.with_suffix(f".{fmt}")
        fig.savefig(target, format=fmt)
        out.append(target)
    return out


def to_array(fig: Any) -> np.ndarray:
    """The figure's pixels, (H, W, 3) uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
