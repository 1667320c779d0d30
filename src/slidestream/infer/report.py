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

import csv
import html
import json
import math
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

from slidestream.sampling.naming import path_hash

__all__ = ["held_out_metrics", "write_report"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text(encoding="utf-8", errors="replace").splitlines()))


def held_out_metrics(pred_csv: Path) -> dict[str, Any]:
    """AUC (tumour/positive class vs rest) and accuracy of a predictions table with labels."""
    from sklearn.metrics import roc_auc_score

    rows = [r for r in _read_csv(pred_csv) if r.get("label")]
    prob_cols = [c for c in (rows[0] if rows else {}) if c.startswith("p_")]
    if not rows or not prob_cols:
        return {"slides": len(rows)}
    positive = "p_tumour" if "p_tumour" in prob_cols else prob_cols[-1]
    y = [f"p_{r['label']}" == positive for r in rows]
    p = [float(r[positive]) for r in rows]
    calls = [r.get("call") or max(prob_cols, key=lambda c, r=r: float(r[c]))[2:] for r in rows]
    acc = sum(c == r["label"] for c, r in zip(calls, rows, strict=True)) / len(rows)
    auc = float(roc_auc_score(y, p)) if len(set(y)) == 2 else math.nan
    return {"slides": len(rows), "auc": auc, "accuracy": acc, "positive": positive[2:]}


def _copy(src: Path, dst_dir: Path) -> str:
    """Copy ``src`` into ``dst_dir`` under a unique name; its relative URL, quoted."""
    name = f"{path_hash(src)}-{src.name}"
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst_dir / name)
    return "img/" + quote(name)


def _img(src: Path, dst_dir: Path, alt: str) -> str:
    url = _copy(src, dst_dir)
    return f'<img src="{html.escape(url)}" alt="{html.escape(alt)}">'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.3f}"
    return html.escape(str(v))


def write_report(root: str | Path, title: str = "slidestream report") -> Path:
    """Write ``root/report/index.html`` from what ``root`` holds; returns its path."""
    root = Path(root)
    out = root / "report"
    img = out / "img"
    runs = sorted(p.parent for p in root.rglob("metrics.csv") if out not in p.parents)
    preds = sorted(p for p in root.rglob("predictions.csv") if out not in p.parents)
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Folder: <code>{html.escape(str(root))}</code></p>",
    ]
    if preds:
        parts.append(
            "<h2>Held-out results</h2><table><tr><th>predictions</th><th>slides</th>"
            "<th>AUC</th><th>accuracy</th></tr>"
        )
        for p in preds:
            m = held_out_metrics(p)
            parts.append(
                f"<tr><td>{html.escape(str(p.relative_to(root)))}</td>"
                f"<td>{m.get('slides', 0)}</td><td>{_fmt(m.get('auc', math.nan))}</td>"
                f"<td>{_fmt(m.get('accuracy', math.nan))}</td></tr>"
            )
        parts.append("</table>")
    for run in runs:
        parts.append(_run_section(root, run, img))
    parts.append(_slides_section(root, preds, img))
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:"
        "collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:"
        "100%}.slides{display:grid;grid-template-columns:1fr 1fr 1.2fr;gap:8px;"
        "align-items:start}.ok{color:#080}.bad{color:#b00}"
    )
    out.mkdir(parents=True, exist_ok=True)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def _run_section(root: Path, run: Path, img: Path) -> str:
    rows = _read_csv(run / "metrics.csv")
    name = run.relative_to(root)
    parts = [f"<h2>Training run <code>{html.escape(str(name))}</code></h2>"]
    if rows:
        keys = [k for k in rows[-1] if k != "time_s"]
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>")
        for r in rows:
            cells = "".join(f"<td>{_fmt(_num(r.get(k, '')))}</td>" for k in keys)
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</table>")
    if (run / "curves.png").exists():
        parts.append(f"<p>{_img(run / 'curves.png', img, f'training curves of {name}')}</p>")
    return "".join(parts)


def _num(text: str) -> Any:
    if text.isdigit():
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _slides_section(root: Path, preds: list[Path], img: Path) -> str:
    calls: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    heatmaps: dict[str, Path] = {}
    for p in preds:
        for r in _read_csv(p):
            slide = r.get("slide") or "?"
            stem = r.get("stem") or Path(slide).stem
            names.setdefault(slide, stem)
            if slide not in heatmaps and (p.parent / f"{stem}.heatmap.png").is_file():
                heatmaps[slide] = p.parent / f"{stem}.heatmap.png"
            calls.setdefault(slide, []).append(_call(p, r))
    if not calls:
        return ""
    qc = {q.name: q for q in sorted(root.rglob("*.qc.png")) if img not in q.parents}
    qc_of = _qc_by_source(root, img)
    parts = [
        "<h2>Held-out slides</h2><div class='slides'><b>tissue</b><b>heatmap</b>"
        "<b>prediction vs truth</b>"
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
        parts.append(
            f"<div>{pics[0]}<br>{html.escape(stem)}</div><div>{pics[1]}</div>"
            f"<div>{'<br>'.join(calls[slide])}</div>"
        )
    parts.append("</div>")
    return "".join(parts)


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
    ok = "ok" if call == r.get("label") else "bad"
    detail = ", ".join(f"{k} {v:.2f}" for k, v in probs.items())
    return (
        f"<b>{html.escape(pred_csv.parent.name)}</b>: <span class='{ok}'>{html.escape(call)}"
        f"</span> ({html.escape(detail)}); truth {html.escape(r.get('label') or '?')}"
    )


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan
