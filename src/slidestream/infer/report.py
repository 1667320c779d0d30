"""HTML report of training runs and predictions: metrics, curves, thumbnails and heatmaps.

``write_report(DIR)`` looks under ``DIR`` for training runs (folders with ``metrics.csv``),
prediction tables (``predictions.csv`` with ``slide``/``label`` columns) and per-slide pictures
(``<stem>.qc.png`` tissue overlays, ``<stem>.heatmap.png``), copies the pictures into
``DIR/report/`` and writes ``DIR/report/index.html``, which opens without a server.

Every text and attribute value is HTML-escaped and every file name in a ``src`` is URL-quoted,
so slide and folder names with quotes, ``<``, ``&``, ``#``, ``?``, spaces or any Unicode show as
text and their pictures still load. Pictures are copied under names made unique by a hash of their
source path, and a prediction's heatmap is taken from the folder of its ``predictions.csv``
(through its ``stem`` column), so slides that share a file name do not swap pictures.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

from slidestream.infer.report_results import (
    _float,
    _fmt,
    _read_csv,
    held_out_metrics,
    results_section,
)
from slidestream.sampling.naming import path_hash

__all__ = ["held_out_metrics", "write_report"]


def _copy(src: Path, dst_dir: Path) -> str:
    """Copy ``src`` into ``dst_dir`` under a unique name; its relative URL, quoted."""
    name = f"{path_hash(src)}-{src.name}"
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst_dir / name)
    return "img/" + quote(name)


def _copy_viewer(page: Path, dst_dir: Path) -> str:
    """Copy a viewer page with its tile pyramid into ``dst_dir``; its relative URL, quoted."""
    from slidestream.infer.viewer import copy_viewer

    return "img/" + quote(copy_viewer(page, dst_dir, f"{path_hash(page)}-{page.name}").name)


def _img(src: Path, dst_dir: Path, alt: str) -> str:
    url = _copy(src, dst_dir)
    return f'<img src="{html.escape(url)}" alt="{html.escape(alt)}">'


_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1250px;color:#222}table{border-collapse:"
    "collapse;margin:1em 0;display:block;overflow-x:auto}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
    "img{max-width:100%}figure{display:inline-block;margin:0 1em 1em 0;max-width:31%;"
    "vertical-align:top}.charts{display:grid;grid-template-columns:repeat(4,1fr);gap:10px;"
    "margin-bottom:1em}.charts figure{max-width:100%;margin:0}figure.wide{max-width:100%;display:block}figcaption{font-size:85%;color:#555}.slides{display:grid;"
    "grid-template-columns:1fr 1.2fr 1fr;gap:10px;align-items:start}.ok{color:#080}"
    ".bad{color:#b00}.unknown{color:#777}small{color:#555}"
)


def write_report(root: str | Path, title: str = "slidestream report") -> Path:
    """Write ``root/report/index.html`` from what ``root`` holds; returns its path.

    Sections: what ran (``about.json`` if present: a summary, the steps with their commands,
    a description per folder), held-out results per ``predictions.csv`` (AUC, accuracy, ROC
    curve and confusion matrix of the labelled slides), each training run (settings from its
    ``config.yaml``, best epoch from ``summary.json``, metrics, curves, validation ROC and
    confusion, the last validation patch grid), and one row per predicted slide (tissue
    overlay, heatmap, link to its zoomable viewer, calls against truth). Every figure names
    the file it comes from. Pictures and viewer pages are copied into ``root/report``, so the
    folder opens offline and moves as one.
    """
    root = Path(root)
    out = root / "report"
    img = out / "img"
    if img.exists():
        shutil.rmtree(img)
    about = _about(root)
    runs = sorted(p.parent for p in root.rglob("metrics.csv") if out not in p.parents)
    preds = [
        p for p in sorted(root.rglob("predictions.csv")) if out not in p.parents and _read_csv(p)
    ]
    parts = [f"<h1>{html.escape(title)}</h1>", _about_section(root, about)]
    if preds:
        parts.append(results_section(root, preds, img, about))
        parts.append(_methods_section(root))
    for run in runs:
        parts.append(_run_section(root, run, img))
    parts.append(_slides_section(root, preds, img, about))
    out.mkdir(parents=True, exist_ok=True)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def _about(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / "about.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _about_section(root: Path, about: dict[str, Any]) -> str:
    parts = [f"<p>Folder: <code>{html.escape(str(root))}</code></p>"]
    if about.get("summary"):
        parts.append(f"<p>{html.escape(str(about['summary']))}</p>")
    steps = about.get("steps") or []
    if steps:
        parts.append("<h2>What ran</h2><ul>")
        for step in steps:
            cmd = (
                f" <code>{html.escape(str(step['command']))}</code>" if step.get("command") else ""
            )
            parts.append(f"<li>{html.escape(str(step.get('what', '')))}{cmd}</li>")
        parts.append("</ul>")
    return "".join(parts)


def _figure(src: Path, dst_dir: Path, root: Path, caption: str, wide: bool = False) -> str:
    """A copied picture with a caption naming its source file."""
    where = html.escape(str(src.relative_to(root)) if root in src.parents else str(src))
    tag = "<figure class='wide'>" if wide else "<figure>"
    return (
        f"{tag}{_img(src, dst_dir, caption)}<figcaption>{html.escape(caption)} "
        f"<small>(from <code>{where}</code>)</small></figcaption></figure>"
    )


def _run_section(root: Path, run: Path, img: Path) -> str:
    rows = _read_csv(run / "metrics.csv")
    name = run.relative_to(root)
    parts = [f"<h2>Training run <code>{html.escape(str(name))}</code></h2>"]
    parts.append(_settings(run))
    if rows:
        keys = [k for k in rows[-1] if k]
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>")
        for r in rows:
            cells = "".join(f"<td>{_fmt(_num(r.get(k, '')))}</td>" for k in keys)
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</table>")
    if (run / "curves.png").exists():
        parts.append(_figure(run / "curves.png", img, root, "training curves", wide=True))
    captions = {  # one row: the charts of the last validated epoch
        "roc.png": "validation ROC",
        "pr.png": "validation precision-recall",
        "calibration.png": "validation calibration",
        "confusion.png": "validation confusion matrix",
    }
    row = [
        _figure(run / file, img, root, f"{caption} (last validated epoch)")
        for file, caption in captions.items()
        if (run / file).exists()
    ]
    if row:
        parts.append(f"<div class='charts'>{''.join(row)}</div>")
    grids = sorted(run.glob("val_grid_epoch*.png"), key=lambda q: int(q.stem[14:] or 0))
    if grids:
        parts.append(_figure(grids[-1], img, root, "validation patches, true vs predicted class"))
    return "".join(parts)


def _settings(run: Path) -> str:
    """What the run was: its settings (config.yaml) and its best epoch (summary.json)."""
    import yaml

    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    try:
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    keys = (
        "data",
        "val_data",
        "model",
        "task",
        "mpp",
        "size",
        "image_size",
        "tile_size",
        "stages",
        "epochs",
        "batch_size",
        "accumulate",
        "lr",
        "optimizer",
        "amp",
        "device",
    )
    items = [(k, cfg[k]) for k in keys if isinstance(cfg, dict) and cfg.get(k) is not None]
    if summary.get("best_epoch"):
        items.append(
            (
                "best epoch",
                f"{summary['best_epoch']} ({summary.get('best_metric_name')} "
                f"{_fmt(summary.get('best_metric'))})",
            )
        )
    if not items:
        return ""
    cells = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items
    )
    return f"<table>{cells}</table>"


def _num(text: str) -> Any:
    if text.isdigit():
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _slides_section(
    root: Path, preds: list[Path], img: Path, about: dict[str, Any] | None = None
) -> str:
    calls: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    heatmaps: dict[str, Path] = {}
    viewers: dict[str, list[tuple[str, Path]]] = {}
    for p in preds:
        for r in _read_csv(p):
            slide = _source_of(r.get("slide") or "?")
            stem = r.get("stem") or Path(slide).stem
            names.setdefault(slide, stem)
            if slide not in heatmaps and (p.parent / f"{stem}.heatmap.png").is_file():
                heatmaps[slide] = p.parent / f"{stem}.heatmap.png"
            if (p.parent / f"{stem}.viewer.html").is_file():
                viewers.setdefault(slide, []).append(
                    (p.parent.name, p.parent / f"{stem}.viewer.html")
                )
            calls.setdefault(slide, []).append(_call(p, r))
    if not calls:
        return ""
    qc = {q.name: q for q in sorted(root.rglob("*.qc.png")) if img not in q.parents}
    qc_of = _qc_by_source(root, img)
    parts = [
        "<h2>Predicted slides</h2><p>Tissue overlay (tissue outlined), the heatmap of the "
        "first prediction folder that has one (colour bar: probability of the class named in "
        "it), links to zoomable viewers (slide, heatmap, contours; open offline), and each "
        "folder's call: <span class='ok'>right</span>, <span class='bad'>wrong</span>, "
        "<span class='unknown'>no truth</span>.</p><div class='slides'><b>tissue</b>"
        "<b>heatmap</b><b>prediction vs truth</b>"
    ]
    for slide in sorted(calls):
        stem = names[slide]
        found = [
            qc_of.get(_resolved(slide))
            or qc.get(f"{stem}.qc.png")
            or qc.get(f"{Path(slide).stem}.qc.png")
        ]
        found.append(heatmaps.get(slide))
        pics = [
            _img(f, img, f"{stem}{suffix}") if f else "<i>none</i>"
            for f, suffix in zip(found, (".qc.png", ".heatmap.png"), strict=True)
        ]
        links = " ".join(
            f'<a href="{html.escape(_copy_viewer(v, img))}">viewer ({html.escape(folder)})</a>'
            for folder, v in viewers.get(slide, [])
        )
        parts.append(
            f"<div>{pics[0]}<br>{html.escape(stem)}</div><div>{pics[1]}<br>{links}</div>"
            f"<div>{'<br>'.join(calls[slide])}</div>"
        )
    parts.append("</div>")
    return "".join(parts)


def _source_of(slide: str) -> str:
    """The source slide of a prepared slide (from the ``<stem>.json`` that ``prepare`` writes
    beside it), so both models' calls on one case share a row; other slides as they are."""
    meta = Path(slide).with_suffix(".json")
    try:
        source = json.loads(meta.read_text(encoding="utf-8"))["row"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return slide
    return source if isinstance(source, str) and source else slide


def _resolved(path: str) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):
        return path


def _qc_by_source(root: Path, img: Path) -> dict[str, Path]:
    """QC overlays of ``slidestream tissue`` keyed by their slide (from ``<stem>.tissue.json``)."""
    found = {}
    for meta in sorted(root.rglob("*.tissue.json")):
        png = meta.with_name(meta.name[: -len(".tissue.json")] + ".qc.png")
        if img in meta.parents or not png.is_file():
            continue
        try:
            slide = json.loads(meta.read_text(encoding="utf-8")).get("slide")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(slide, str):
            found.setdefault(_resolved(slide), png)
    return found


def _call(pred_csv: Path, r: dict[str, str]) -> str:
    probs = {k[2:]: _float(v) for k, v in r.items() if k and k.startswith("p_") and v}
    call = r.get("call") or (max(probs, key=probs.get) if probs else "?")
    truth = r.get("label") or ""
    ok = "unknown" if not truth else "ok" if call == truth else "bad"
    detail = ", ".join(f"{k} {v:.2f}" for k, v in probs.items())
    return (
        f"<b>{html.escape(pred_csv.parent.name)}</b>: <span class='{ok}'>{html.escape(call)}"
        f"</span> ({html.escape(detail)}); truth {html.escape(truth or 'unknown')}"
    )


def _methods_section(root: Path) -> str:
    """Streaming vs MIL side by side on the held-out slides (the ``predict_slide`` and
    ``predict_mil`` prediction tables the demo writes); empty without both."""
    tables = {"streaming": root / "predict_slide", "MIL": root / "predict_mil"}
    if not all((d / "predictions.csv").is_file() for d in tables.values()):
        return ""
    rows = {
        name: {_source_of(r["slide"]): r for r in _read_csv(d / "predictions.csv")}
        for name, d in tables.items()
    }
    metrics = {name: held_out_metrics(d / "predictions.csv") for name, d in tables.items()}
    pos = metrics["streaming"].get("positive", "tumour")
    head = "".join(f"<th>{n} p({html.escape(pos)})</th>" for n in tables)
    parts = [
        "<h2>Streaming vs MIL on the held-out slides</h2><p>The same slides, labels and "
        "splits: the streamed CNN trained end to end on whole images, and gated-attention MIL "
        "on frozen patch features.</p><table><tr><th>slide</th>"
        f"<th>truth</th>{head}</tr>"
    ]
    for slide in sorted(rows["streaming"]):
        label = rows["streaming"][slide].get("label", "")
        cells = "".join(
            f"<td>{_fmt(_num(rows[n].get(slide, {}).get(f'p_{pos}', '')))}</td>" for n in tables
        )
        parts.append(
            f"<tr><td>{html.escape(Path(slide).stem)}</td><td>{html.escape(label)}</td>{cells}</tr>"
        )
    aucs = "".join(f"<td><b>{_fmt(metrics[n].get('auc', math.nan))}</b></td>" for n in tables)
    parts.append(f"<tr><td><b>AUC</b></td><td></td>{aucs}</tr></table>")
    return "".join(parts)
