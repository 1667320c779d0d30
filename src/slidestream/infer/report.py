"""HTML report of training runs and predictions: metrics, curves, thumbnails and heatmaps.

``write_report(DIR)`` looks under ``DIR`` for training runs (folders with ``metrics.csv``),
prediction tables (``predictions.csv`` with ``slide``/``label`` columns) and per-slide pictures
(``<stem>.qc.png`` tissue overlays, ``<stem>.heatmap.png``), copies the pictures into
``DIR/report/`` and writes ``DIR/report/index.html``, which opens without a server.
"""

from __future__ import annotations

import csv
import html
import math
import shutil
from pathlib import Path
from typing import Any

__all__ = ["held_out_metrics", "write_report"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text().splitlines()))


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


def _copy(src: Path, dst_dir: Path, name: str) -> str:
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst_dir / name)
    return f"img/{name}"


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
    parts.append(_methods_section(root))
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
    (out / "index.html").write_text(page)
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
        src = _copy(run / "curves.png", img, f"{str(name).replace('/', '_')}_curves.png")
        parts.append(f"<p><img src='{src}' alt='training curves of {html.escape(str(name))}'></p>")
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
    for p in preds:
        for r in _read_csv(p):
            stem = Path(r["slide"]).stem
            probs = {k[2:]: float(v) for k, v in r.items() if k.startswith("p_") and v}
            call = r.get("call") or (max(probs, key=probs.get) if probs else "?")
            ok = "ok" if call == r.get("label") else "bad"
            detail = ", ".join(f"{k} {v:.2f}" for k, v in probs.items())
            calls.setdefault(stem, []).append(
                f"<b>{html.escape(p.parent.name)}</b>: <span class='{ok}'>{html.escape(call)}</span>"
                f" ({html.escape(detail)}); truth {html.escape(r.get('label') or '?')}"
            )
    if not calls:
        return ""
    parts = [
        "<h2>Held-out slides</h2><div class='slides'><b>tissue</b><b>heatmap</b>"
        "<b>prediction vs truth</b>"
    ]
    for stem in sorted(calls):
        pics = []
        for suffix in (".qc.png", ".heatmap.png"):
            found = next((p for p in root.rglob(f"{stem}{suffix}") if img not in p.parents), None)
            pics.append(
                f"<img src='{_copy(found, img, found.name)}' alt='{stem}{suffix}'>"
                if found
                else "<i>none</i>"
            )
        parts.append(
            f"<div>{pics[0]}<br>{html.escape(stem)}</div><div>{pics[1]}</div>"
            f"<div>{'<br>'.join(calls[stem])}</div>"
        )
    parts.append("</div>")
    return "".join(parts)


def _methods_section(root: Path) -> str:
    """Streaming vs MIL side by side on the held-out slides (``predict_slide`` and
    ``predict_mil`` prediction tables, as the demo writes them); empty without both."""
    tables = {"streaming": root / "predict_slide", "MIL": root / "predict_mil"}
    if not all((d / "predictions.csv").is_file() for d in tables.values()):
        return ""
    rows = {
        name: {Path(r["slide"]).stem: r for r in _read_csv(d / "predictions.csv")}
        for name, d in tables.items()
    }
    metrics = {name: held_out_metrics(d / "predictions.csv") for name, d in tables.items()}
    pos = metrics["streaming"].get("positive", "tumour")
    head = "".join(f"<th>{n} p({html.escape(pos)})</th>" for n in tables)
    parts = [
        f"<h2>Streaming vs MIL on the held-out slides</h2><table><tr><th>slide</th>"
        f"<th>truth</th>{head}</tr>"
    ]
    for stem in sorted(rows["streaming"]):
        label = rows["streaming"][stem].get("label", "")
        cells = "".join(
            f"<td>{_fmt(_num(rows[n].get(stem, {}).get(f'p_{pos}', '')))}</td>" for n in tables
        )
        parts.append(f"<tr><td>{html.escape(stem)}</td><td>{html.escape(label)}</td>{cells}</tr>")
    aucs = "".join(f"<td><b>{_fmt(metrics[n].get('auc', math.nan))}</b></td>" for n in tables)
    parts.append(f"<tr><td><b>AUC</b></td><td></td>{aucs}</tr></table>")
    return "".join(parts)
