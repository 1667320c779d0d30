"""The report's held-out results: metrics, ROC curves and confusion matrices drawn from each
``predictions.csv`` (:func:`results_section`)."""

from __future__ import annotations

import csv
import html
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

from slidestream.sampling.naming import path_hash

__all__ = ["held_out_metrics", "results_section"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text(encoding="utf-8", errors="replace").splitlines()))


def held_out_metrics(pred_csv: Path) -> dict[str, Any]:
    """AUC (tumour/positive class vs rest) and accuracy over the labelled rows of a
    predictions table; ``slides`` counts labelled rows, ``unlabelled`` the others."""
    from sklearn.metrics import roc_auc_score

    every = _read_csv(pred_csv)
    rows = [r for r in every if r.get("label")]
    unlabelled = len(every) - len(rows)
    prob_cols = [c for c in (rows[0] if rows else {}) if c.startswith("p_")]
    if not rows or not prob_cols:
        return {"slides": len(rows), "unlabelled": unlabelled}
    positive = "p_tumour" if "p_tumour" in prob_cols else prob_cols[-1]
    y = [f"p_{r['label']}" == positive for r in rows]
    p = [float(r[positive]) for r in rows]
    calls = [r.get("call") or max(prob_cols, key=lambda c, r=r: float(r[c]))[2:] for r in rows]
    acc = sum(c == r["label"] for c, r in zip(calls, rows, strict=True)) / len(rows)
    auc = float(roc_auc_score(y, p)) if len(set(y)) == 2 else math.nan
    return {
        "slides": len(rows),
        "unlabelled": unlabelled,
        "auc": auc,
        "accuracy": acc,
        "positive": positive[2:],
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.3f}"
    return html.escape(str(v))


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _chart(fig: Any, dst_dir: Path, name: str, caption: str, source: str) -> str:
    from slidestream import charts

    dst_dir.mkdir(parents=True, exist_ok=True)
    (png,) = charts.save(fig, dst_dir / name, formats=("png",))
    return (
        f'<figure><img src="{html.escape("img/" + quote(png.name))}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)} <small>(drawn from <code>{html.escape(source)}"
        "</code>)</small></figcaption></figure>"
    )


def _labelled(pred_csv: Path) -> tuple[list[str], Any, list[str]] | None:
    """(labels, probabilities (N, C), classes) of the labelled rows, or None."""
    import numpy as np

    rows = [r for r in _read_csv(pred_csv) if r.get("label")]
    classes = [c[2:] for c in (rows[0] if rows else {}) if c and c.startswith("p_")]
    rows = [r for r in rows if r["label"] in classes]
    if len(rows) < 2 or not classes:
        return None
    probs = np.array([[_float(r[f"p_{c}"]) for c in classes] for r in rows])
    return [r["label"] for r in rows], probs, classes


def results_section(root: Path, preds: list[Path], img: Path, about: dict[str, Any]) -> str:
    """The held-out table (one line per ``predictions.csv``) and, per model, one row of its
    charts (see :func:`_model_charts`)."""
    folders = about.get("folders") or {}
    parts = [
        "<h2>Held-out results</h2><table><tr><th>predictions</th><th>what</th>"
        "<th>labelled slides</th><th>unlabelled</th><th>AUC</th><th>accuracy</th></tr>"
    ]
    figures = []
    for p in preds:
        rel = str(p.relative_to(root))
        m = held_out_metrics(p)
        what = folders.get(str(p.parent.relative_to(root))) or _kind(p)
        parts.append(
            f"<tr><td><code>{html.escape(rel)}</code></td><td>{html.escape(what)}</td>"
            f"<td>{m.get('slides', 0)}</td><td>{m.get('unlabelled', 0)}</td>"
            f"<td>{_fmt(m.get('auc', math.nan))}</td><td>{_fmt(m.get('accuracy', math.nan))}</td></tr>"
        )
        row = _model_charts(p, rel, img)
        if row:
            figures.append(f"<p><code>{html.escape(rel)}</code>: {html.escape(what)}</p>{row}")
    parts.append("</table>")
    return "".join(parts) + "".join(figures)


def _model_charts(pred_csv: Path, rel: str, img: Path) -> str:
    """One row of a model's held-out charts: ROC, precision-recall and (two classes)
    calibration when both classes occur, and the confusion matrix; '' without labels."""
    import numpy as np
    from sklearn.metrics import confusion_matrix

    from slidestream import charts

    data = _labelled(pred_csv)
    if data is None:
        return ""
    labels, probs, classes = data
    y = np.array([classes.index(lab) for lab in labels])
    figures = []
    if len(set(y.tolist())) > 1:
        figures.append(("roc", "ROC", charts.roc_figure(y, probs, classes)))
        figures.append(("pr", "precision-recall", charts.pr_figure(y, probs, classes)))
        if len(classes) == 2:
            calibration = charts.calibration_figure(y == 1, probs[:, 1])
            figures.append(("calibration", f"calibration of p({classes[1]})", calibration))
    matrix = confusion_matrix(y, probs.argmax(1), labels=list(range(len(classes))))
    figures.append(("confusion", "confusion", charts.confusion_figure(matrix, classes)))
    key = path_hash(pred_csv)
    cells = [
        _chart(fig, img, f"{key}-{name}", f"{what}, {rel}", rel) for name, what, fig in figures
    ]
    return f"<div class='charts'>{''.join(cells)}</div>"


def _kind(pred_csv: Path) -> str:
    if any(pred_csv.parent.glob("*.tiles.csv")):
        return "patch classifier on a tile grid, tiles aggregated per slide"
    return "slide-level model (one call per slide)"
