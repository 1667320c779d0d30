"""The HTML report escapes every name and still finds every picture (issue #18.6)."""

from __future__ import annotations

import csv
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image

from slidestream.infer.report import write_report

HOSTILE = [
    "a' onerror='alert(document.domain)' x='",
    'b" onload="alert(1)',
    "<script>alert(1)</script>",
    "c&amp;d <b>",
    "ünïcødé 切片 ☃",
    "with space # and ?q=1",
    "%41 percent",
]
ALLOWED = {
    "html",
    "head",
    "meta",
    "title",
    "style",
    "body",
    "h1",
    "h2",
    "p",
    "code",
    "table",
    "tr",
    "th",
    "td",
    "div",
    "b",
    "br",
    "i",
    "span",
    "img",
    "a",
    "ul",
    "li",
    "figure",
    "figcaption",
    "small",
}
ATTRS = {
    "a": {"href"},
    "img": {"src", "alt"},
    "span": {"class"},
    "div": {"class"},
    "meta": {"charset"},
    "figure": {"class"},
}


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_hostile_names_are_text_and_pictures_resolve(tmp_path):
    root = tmp_path / "run"
    run = root / "runs" / "r' onmouseover='x"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("epoch,loss,<b>acc</b>\n1,0.5,0.9\n")
    _png(run / "curves.png", 10)
    pred = root / "pred <i>"
    pred.mkdir()
    rows = []
    for i, name in enumerate(HOSTILE):
        stem = f"{name}-{i}" if i == 0 else name
        _png(pred / f"{stem}.heatmap.png", 20 + i)
        (pred / f"{stem}.viewer.html").write_text(f"<html>{i}</html>")
        _png(root / "tissue" / f"{stem}.qc.png", 100 + i)
        rows.append([f"/data/case{i}/{name}.tiff", stem, "tumour", "normal", 0.2, 0.8])
    with open(pred / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["slide", "stem", "label", "call", "p_normal", "p_tumour"])
        w.writerows(rows)
    index = write_report(root, title="<script>t</script>")
    page = index.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(page)
    tags = [t for t, _ in parser.tags]
    assert set(tags) <= ALLOWED and "script" not in tags
    for tag, attrs in parser.tags:
        assert set(attrs) <= ATTRS.get(tag, set()), (tag, attrs)
    charts = [a for t, a in parser.tags if t == "img" and a["alt"].startswith(("ROC", "conf"))]
    imgs = [a for t, a in parser.tags if t == "img" and a not in charts]
    assert len(charts) == 1  # confusion of the labelled rows (one class: no ROC)
    assert len(imgs) == 1 + 2 * len(HOSTILE)  # curves + (qc, heatmap) per slide
    links = [a["href"] for t, a in parser.tags if t == "a"]
    assert len(links) == len(HOSTILE)  # one viewer per slide, each its own page
    pages = {(index.parent / unquote(urlsplit(h).path)).read_text() for h in links}
    assert len(pages) == len(HOSTILE)
    copied = []
    for a in imgs:
        url = urlsplit(a["src"])
        assert not url.query and not url.fragment and not url.scheme
        target = index.parent / unquote(url.path)
        assert target.is_file() and target.parent == index.parent / "img"
        copied.append(np.asarray(Image.open(target))[0, 0, 0])
    # each slide got its own pictures (no two share a copy), in the right rows
    assert len(set(copied)) == len(copied)
    text = "".join(parser.text)
    for name in HOSTILE[1:]:
        assert name in text  # shown as text, literally
    assert "<script>t</script>" in text and "r' onmouseover='x" in text


def test_slides_with_one_name_keep_their_own_pictures(tmp_path):
    root = tmp_path / "run"
    pred, tissue = root / "pred", root / "tissue"
    rows = []
    for i, case in enumerate(("case1", "case2")):
        slide = tmp_path / case / "HE.svs"
        _png(pred / f"HE-{i}.heatmap.png", 50 + i)
        _png(tissue / f"HE-t{i}.qc.png", 150 + i)  # tissue named them its own way
        (tissue / f"HE-t{i}.tissue.json").write_text(f'{{"slide": "{slide}"}}')
        rows.append([str(slide), f"HE-{i}", "tumour", "tumour", 0.1, 0.9])
    with open(pred / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "stem", "label", "call", "p_normal", "p_tumour"])
        w.writerows(rows)
    index = write_report(root)
    parser = _Collect()
    parser.feed(index.read_text(encoding="utf-8"))
    values = [
        int(np.asarray(Image.open(index.parent / unquote(a["src"])))[0, 0, 0])
        for t, a in parser.tags
        if t == "img" and not a["alt"].startswith(("ROC", "conf"))
    ]
    assert values == [150, 50, 151, 51]  # (qc, heatmap) of case1, then of case2
