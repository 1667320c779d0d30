"""Predict a cohort with any predictor, one shard at a time, into one ``predictions.csv``.

Shard ``i/n`` predicts every n-th slide from i (cluster array jobs, or the torchrun rank), so no
slide is done twice. With one shard the table is ``predictions.csv``; with several each shard
writes ``predictions.<i>of<n>.csv`` (and a ``.json`` naming its checkpoint) and the shard that
finishes last (the one that finds all n parts, made with the same checkpoint) merges them into ``predictions.csv`` in cohort order.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slidestream.errors import SlideStreamError
from slidestream.infer.engine import Predictor, SlidePrediction
from slidestream.sampling import Cohort, SlideEntry
from slidestream.sampling.cohort import failure_message
from slidestream.sampling.naming import output_stems

__all__ = ["CohortPredictions", "HEADER", "merge_shards", "predict_cohort"]

log = logging.getLogger(__name__)

HEADER = ["slide", "stem", "label", "call", "heatmap_class", "tiles", "damaged_tiles"]


@dataclass
class CohortPredictions:
    """What one shard did: ``table`` it wrote, ``merged`` (predictions.csv once all shards
    are in, else None), slides ``predicted``, ``failed`` (path -> one-line error) and
    ``damaged`` (path -> tiles left out)."""

    table: Path
    merged: Path | None = None
    predicted: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    damaged: dict[str, int] = field(default_factory=dict)


def predict_cohort(
    predictor: Predictor,
    cohort: Cohort,
    out: str | os.PathLike[str],
    *,
    shard: tuple[int, int] = (0, 1),
    on_slide: Callable[[SlideEntry, SlidePrediction | None], None] | None = None,
    slide_mpp: float | None = None,
    **options: Any,
) -> CohortPredictions:
    """Predict shard ``i/n`` of ``cohort`` into ``out`` and write its prediction table
    (columns :data:`HEADER` then ``p_<class>``); ``options`` go to
    :meth:`Predictor.predict` (``backend``, ``threshold``, ``geojson``, ``target``, ...).
    Output stems are the slides' file stems (plus a path hash where two share one), the same
    in every shard. A slide that fails is listed in ``failed``, never fatal; ``on_slide(entry,
    result or None)`` after each one."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    i, n = shard
    stems = dict(zip(cohort.slides, output_stems([e.path for e in cohort]), strict=True))
    name = "predictions.csv" if n == 1 else f"predictions.{i}of{n}.csv"
    done = CohortPredictions(out / name)
    if n > 1:  # the merged table of an earlier run is out of date: the last shard rewrites it
        (out / "predictions.csv").unlink(missing_ok=True)
    rows = []
    for entry in cohort.slides[i::n]:
        mpp = entry.mpp or slide_mpp
        try:
            res = predictor.predict(entry.path, out, slide_mpp=mpp, stem=stems[entry], **options)
        except SlideStreamError as exc:
            done.failed[str(entry.path)] = failure_message(entry.path, exc)
            log.info("%s (skipped)", done.failed[str(entry.path)])
            res = None
        else:
            if res.damaged:
                done.damaged[res.slide] = res.damaged
            rows.append(_row(entry, res))
        if on_slide is not None:
            on_slide(entry, res)
    done.predicted = len(rows)
    _write_table(done.table, predictor, rows, stamp=n > 1)
    if n > 1:
        done.merged = merge_shards(out, cohort, n, _stamp(predictor))
    return done


def _row(entry: SlideEntry, res: SlidePrediction) -> list[Any]:
    probs = [f"{p:.5f}" for p in res.probs]
    return [
        res.slide,
        res.stem,
        entry.label or "",
        res.call,
        res.heatmap_class,
        res.tiles,
        res.damaged,
        *probs,
    ]


def _stamp(predictor: Predictor) -> dict[str, Any]:
    """The checkpoint a shard used: resolved path, size and modification time."""
    path = predictor.checkpoint.resolve()
    st = path.stat()
    return {"checkpoint": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_table(path: Path, predictor: Predictor, rows: list[list[Any]], stamp: bool) -> None:
    """The prediction table, written atomically; a shard's part gets a ``.json`` beside it
    naming the checkpoint (the merge takes parts of one checkpoint only)."""
    if stamp:
        path.with_suffix(".json").write_text(json.dumps(_stamp(predictor)))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*HEADER, *[f"p_{c}" for c in predictor.classes]])
        w.writerows(rows)
    os.replace(tmp, path)


def merge_shards(
    out: str | os.PathLike[str], cohort: Cohort, n: int, stamp: dict[str, Any]
) -> Path | None:
    """Merge ``out/predictions.<i>of<n>.csv`` (i = 0..n-1) into ``out/predictions.csv``, rows in
    cohort order, once all n exist and their ``.json`` hold ``stamp`` (same checkpoint); None
    until then.
    A part from another checkpoint, or holding a slide outside its shard, is left unmerged
    with a warning naming it."""
    out = Path(out)
    order = {str(e.path): k for k, e in enumerate(cohort.slides)}
    header, rows = None, []
    for i in range(n):
        part = out / f"predictions.{i}of{n}.csv"
        if not part.is_file() or not part.with_suffix(".json").is_file():
            return None
        theirs = json.loads(part.with_suffix(".json").read_text())
        if theirs != stamp:
            log.warning(
                "%s: made with %s, not %s; not merged (rerun that shard with this checkpoint, "
                "or predict into another --out)",
                part,
                theirs.get("checkpoint"),
                stamp["checkpoint"],
            )
            return None
        table = list(csv.reader(part.read_text().splitlines()))
        header = header or table[0]
        wrong = [r[0] for r in table[1:] if r[0] not in order or order[r[0]] % n != i]
        if wrong:
            log.warning("%s holds %s, not of shard %d/%d; not merged", part, wrong[0], i, n)
            return None
        rows += table[1:]
    rows.sort(key=lambda r: order[r[0]])
    merged = out / "predictions.csv"
    tmp = merged.with_name(f".{merged.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    os.replace(tmp, merged)
    return merged
