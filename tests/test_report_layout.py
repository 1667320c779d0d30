"""The report shows each model's ROC, precision-recall, calibration and confusion charts on one
row, for held-out predictions and for training runs (issue #22 item 8)."""

from __future__ import annotations

import csv
from html.parser import HTMLParser

import numpy as np
from PIL import Image

from slidestream.infer.report import write_report


class _Rows(HTMLParser):
    """The alt texts of the images inside each ``<div class='charts'>``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.depth = 0  # div nesting inside the current charts row

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div":
            if self.depth:
                self.depth += 1
            elif attrs.get("class") == "charts":
                self.rows.append([])
                self.depth = 1
        elif tag == "img" and self.depth:
            self.rows[-1].append(attrs["alt"])

    def handle_endtag(self, tag):
        if tag == "div" and self.depth:
            self.depth -= 1


def _predictions(folder, n=12, classes=("normal", "tumour")):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "label", *[f"p_{c}" for c in classes]])
        for i in range(n):
            label = classes[i % len(classes)]
            p = rng.dirichlet(np.ones(len(classes)))
            w.writerow([f"/data/s{i}.tiff", label, *[f"{v:.3f}" for v in p]])


def test_each_model_has_roc_pr_calibration_and_confusion_on_one_row(tmp_path):
    _predictions(tmp_path / "patch_model")
    _predictions(tmp_path / "mil_model")
    _predictions(tmp_path / "three", classes=("a", "b", "c"))
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("epoch,train_loss\n1,0.5\n")
    for name in ("curves", "roc", "pr", "calibration", "confusion"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(run / f"{name}.png")
    parser = _Rows()
    parser.feed(write_report(tmp_path).read_text())
    kinds = [[alt.split(",")[0].split(" (")[0] for alt in row] for row in parser.rows]
    binary = ["ROC", "precision-recall", "calibration of p(tumour)", "confusion"]
    assert kinds == [
        binary,  # mil_model
        binary,  # patch_model
        ["ROC", "precision-recall", "confusion"],  # three classes: no calibration
        [
            "validation ROC",
            "validation precision-recall",
            "validation calibration",
            "validation confusion matrix",
        ],
    ], kinds
    assert [row[0].split(", ")[1] for row in parser.rows[:3]] == [
        "mil_model/predictions.csv",
        "patch_model/predictions.csv",
        "three/predictions.csv",
    ]
    assert (
        ".charts{display:grid;grid-template-columns:repeat(4,1fr)"
        in (tmp_path / "report" / "index.html").read_text()
    )
