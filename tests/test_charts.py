"""Charts carry their data: AUC in the legend equals scikit-learn's, real axes, counts."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from slidestream import charts


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_roc_legend_is_sklearns_auc_and_axes_are_real(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    fig = charts.roc_figure(y, probs, ["normal", "tumour"])
    ax = fig.axes[0]
    (label,) = [t.get_text() for t in ax.get_legend().get_texts()]
    assert label == f"tumour (AUC {roc_auc_score(y, p1):.3f})"
    assert ax.get_xlim() == (0, 1) and ax.get_xlabel() == "false positive rate"
    assert len(ax.get_xticks()) >= 3 and len(ax.get_yticks()) >= 3
    files = charts.save(fig, tmp_path / "roc.png")
    assert [f.name for f in files] == ["roc.png", "roc.svg"] and all(
        f.stat().st_size for f in files
    )
    assert charts.to_array(fig).shape[2] == 3
    multi = charts.roc_figure(
        np.array([0, 1, 2, 2, 1, 0]), np.eye(3)[[0, 1, 2, 1, 1, 0]], ["a", "b", "c"]
    )
    assert len(multi.axes[0].get_legend().get_texts()) == 3  # one curve per class


def test_confusion_shows_counts_and_names():
    fig = charts.confusion_figure([[5, 1], [0, 7]], ["normal", "tumour"])
    assert sorted(_texts(fig)) == ["0", "1", "5", "7"]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["normal", "tumour"]
    assert ax.get_ylabel() == "true" and ax.get_xlabel() == "predicted"


def test_curves_have_values_on_their_own_axes_even_for_one_epoch():
    history = [{"epoch": 1, "train_loss": 0.7, "val_auc": 1.0}]
    fig = charts.curves_figure(history, ["train_loss", "val_auc", "absent"])
    assert [ax.get_title() for ax in fig.axes] == ["train_loss", "val_auc"]
    auc_ax = fig.axes[1]
    line = auc_ax.get_lines()[0]
    assert list(line.get_ydata()) == [1.0]  # a constant AUC of 1.0 is drawn at 1.0
    lo, hi = auc_ax.get_ylim()
    assert lo <= 0.0 and hi >= 1.0 and auc_ax.get_xlabel() == "epoch"
    longer = [{"epoch": e, "train_loss": 1 / e} for e in range(1, 6)]
    ticks = charts.curves_figure(longer, ["train_loss"]).axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)


def test_pr_and_calibration():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    p = np.array([0.1, 0.3, 0.8, 0.6, 0.9, 0.4, 0.7, 0.2])
    pr = charts.pr_figure(y, np.stack([1 - p, p], 1), ["n", "t"])
    assert pr.axes[0].get_legend().get_texts()[0].get_text().startswith("t (AP 1.000")
    cal = charts.calibration_figure(y, p, bins=4)
    assert cal.axes[0].get_xlabel() == "predicted probability"
