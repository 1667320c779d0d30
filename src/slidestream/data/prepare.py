"""Prepare slides for whole-slide (streamed) training: crop to tissue at a target mpp.

For each slide the tissue region is read at ``mpp`` (e.g. 2 µm/px), cropped to the tissue bounding
box (plus a margin), optionally with the empty rows and columns between tissue pieces removed so
biopsies pack tightly, and written as a tiled pyramidal JPEG TIFF (pyvips) with its tissue mask
and a thumbnail. A ``<stem>.json`` written last marks a slide as done, so re-runs skip it.
``prepared.csv`` lists the outputs with the cohort's label, patient and split, and the source path
of each (``<stem>`` is unique per source path, see :mod:`slidestream.sampling.naming`).

Crash safety: every file is written under a temporary name and renamed into place, so a run killed
at any moment (workers die with it, see :mod:`slidestream.parallel`) leaves only whole outputs and
temporary files, which the next run removes before it starts. A region whose pixels cannot be
decoded (damaged tiles) is left white and counted; the slide's row names how many.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from slidestream.errors import ConfigError, SlideReadError, SlideStreamError
from slidestream.io import open_slide
from slidestream.parallel import exclusive_lock, process_pool
from slidestream.sampling import Cohort, SlideEntry
from slidestream.sampling.cohort import failure_message
from slidestream.sampling.naming import output_stems
from slidestream.sampling.shards import read_shard_tables, shard_items, shard_path
from slidestream.tissue import TissueMask, detect_tissue

__all__ = ["PrepareResult", "merge_prepared", "prepare_cohort", "prepare_slide", "tissue_runs"]

log = logging.getLogger(__name__)

_BLOCK = 512  # output px: the unit in which a region with damaged tiles is re-read and skipped
_COLUMNS = [
    "slide",
    "label",
    "patient",
    "split",
    "mpp",
    "width",
    "height",
    "source",
    "damaged_regions",
]


@dataclass
class PrepareResult:
    """Rows of ``prepared.csv`` and the slides that failed (with the reason)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    skipped: int = 0
    damaged: dict[str, int] = field(default_factory=dict)  # source path -> regions left white


def tissue_runs(present: np.ndarray, margin: int, remove_empty: bool) -> list[tuple[int, int]]:
    """[start, stop) runs of mask rows (or columns) to keep: those with tissue, grown by
    ``margin``; without ``remove_empty``, one run from the first to the last."""
    idx = np.flatnonzero(present)
    if not len(idx):
        return []
    if not remove_empty:
        return [(max(0, int(idx[0]) - margin), min(len(present), int(idx[-1]) + 1 + margin))]
    keep = ndimage.binary_dilation(present, iterations=margin) if margin else present
    edges = np.flatnonzero(np.diff(np.r_[0, keep.astype(np.int8), 0]))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def prepare_slide(
    entry: SlideEntry,
    out_dir: str | os.PathLike[str],
    mpp: float,
    *,
    stem: str | None = None,
    remove_empty: bool = True,
    margin_um: float = 64.0,
    backend: str = "auto",
    tissue: str = "otsu",
    quality: int = 90,
) -> dict[str, Any]:
    """Prepare one slide as ``out_dir/<stem>.tiff`` (``stem``: the slide's file stem unless
    given); returns its ``prepared.csv`` row (reusing a finished one of the same source)."""
    out_dir = Path(out_dir)
    stem = stem or entry.path.stem
    source = str(entry.path.resolve())
    tiff, meta_path = out_dir / f"{stem}.tiff", out_dir / f"{stem}.json"
    if meta_path.exists() and tiff.exists():
        try:
            row = json.loads(meta_path.read_text())["row"]
        except (ValueError, KeyError, OSError):
            row = {}
        if row.get("source") == source:
            return {"damaged_regions": 0, **row, "skipped": True}
    with open_slide(entry.path, backend=backend, mpp=entry.mpp) as slide:
        slide.require_mpp()
        mask = detect_tissue(slide, tissue, cache_dir=out_dir / "masks")
        if mask.is_empty:
            raise ConfigError(f"{entry.path.name}: no tissue found, nothing to prepare")
        margin = int(np.ceil(margin_um / (mask.mpp or 8.0)))
        rows = tissue_runs(mask.mask.any(1), margin, remove_empty)
        cols = tissue_runs(mask.mask.any(0), margin, remove_empty)
        image, damaged = _packed_image(slide, mask, rows, cols, mpp)
    h, w = image.shape[:2]
    _write_images(out_dir, stem, image, mask, rows, cols, mpp, quality)
    row = {
        "slide": tiff.name,  # relative to prepared.csv, so the folder can move
        "label": entry.label or "",
        "patient": entry.patient_id,
        "split": entry.split or "",
        "mpp": mpp,
        "width": w,
        "height": h,
        "source": source,
        "damaged_regions": len(damaged),
    }
    meta = {
        "row": row,
        "rows": rows,
        "cols": cols,
        "mask_downsample": list(mask.downsample),
        "remove_empty": remove_empty,
        "margin_um": margin_um,
        "damaged_regions_l0": damaged,  # level-0 (x, y, w, h) boxes left white
    }
    # written last: marks the slide done
    _replace_into(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    return row


def _write_images(
    out_dir: Path,
    stem: str,
    image: np.ndarray,
    mask: TissueMask,
    rows: list[tuple[int, int]],
    cols: list[tuple[int, int]],
    mpp: float,
    quality: int,
) -> None:
    """``<stem>.tiff``, its packed tissue mask and thumbnail, each renamed into place."""
    packed = np.concatenate(
        [np.concatenate([mask.mask[r0:r1, c0:c1] for c0, c1 in cols], axis=1) for r0, r1 in rows],
        axis=0,
    )
    h, w = image.shape[:2]
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_tiff(image, out_dir / f"{stem}.tiff", mpp, quality)
    TissueMask(packed, (w, h), mask.mpp, mask.method, mask.params).save(
        out_dir / f"{stem}.tissue.png"
    )
    thumb = Image.fromarray(image)
    thumb.thumbnail((512, 512))
    _replace_into(out_dir / f"{stem}.thumb.png", lambda tmp: thumb.save(tmp, format="PNG"))


def _replace_into(path: Path, write: Any) -> None:
    """Call ``write(tmp)`` on a hidden temporary name next to ``path``, then rename it into place
    (a crash leaves ``path`` as it was, never half written)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_tiff(image: np.ndarray, path: Path, mpp: float, quality: int) -> None:
    import pyvips

    vimg = pyvips.Image.new_from_array(image).copy(interpretation="srgb")
    _replace_into(
        path,
        lambda tmp: vimg.tiffsave(
            str(tmp),
            tile=True,
            tile_width=256,
            tile_height=256,
            pyramid=True,
            compression="jpeg",
            Q=quality,
            xres=1000.0 / mpp,
            yres=1000.0 / mpp,
            resunit="cm",
        ),
    )


def _packed_image(
    slide: Any, mask: TissueMask, rows: list[tuple[int, int]], cols: list[tuple[int, int]], mpp
) -> tuple[np.ndarray, list[list[float]]]:
    """The tissue runs read at ``mpp`` and packed edge to edge; and the damaged boxes."""
    mpp_x, mpp_y = slide.require_mpp()
    dx, dy = mask.downsample
    damaged: list[list[float]] = []
    image = np.concatenate(
        [
            np.concatenate(
                [
                    _read_run(
                        slide,
                        (c0 * dx, r0 * dy, (c1 - c0) * dx, (r1 - r0) * dy),
                        mpp,
                        (mpp_x, mpp_y),
                        damaged,
                    )
                    for c0, c1 in cols
                ],
                axis=1,
            )
            for r0, r1 in rows
        ],
        axis=0,
    )
    return image, damaged


def _read_run(
    slide: Any,
    box: tuple[float, float, float, float],
    mpp: float,
    slide_mpp: tuple[float, float],
    damaged: list[list[float]],
) -> np.ndarray:
    """A level-0 ``box`` read at ``mpp``; if it holds undecodable tiles, it is re-read in blocks
    of ``_BLOCK`` output px and the blocks that still fail are left white (and appended to
    ``damaged`` as level-0 boxes)."""
    x, y, w, h = box
    sx, sy = mpp / slide_mpp[0], mpp / slide_mpp[1]  # level-0 px per output px
    out_w, out_h = max(1, round(w / sx)), max(1, round(h / sy))
    try:
        return slide.read(x, y, out_w, out_h, mpp=mpp)
    except SlideReadError as exc:
        log.info("%s: damaged pixels in (%g, %g, %g, %g): %s", slide.path, *box, exc)
    out = np.full((out_h, out_w, 3), 255, np.uint8)
    read = 0
    for j in range(0, out_h, _BLOCK):
        for i in range(0, out_w, _BLOCK):
            bw, bh = min(_BLOCK, out_w - i), min(_BLOCK, out_h - j)
            try:
                out[j : j + bh, i : i + bw] = slide.read(x + i * sx, y + j * sy, bw, bh, mpp=mpp)
                read += 1
            except SlideReadError:
                damaged.append([x + i * sx, y + j * sy, bw * sx, bh * sy])
    if not read:
        raise SlideReadError(
            f"{slide.path.name}: no pixels of the tissue region at ({x:.0f}, {y:.0f}) could be "
            f"decoded; the file is damaged (re-scan or re-export it)"
        )
    return out


def _job(args: tuple[Any, ...]) -> tuple[dict[str, Any] | None, str]:
    entry, out_dir, mpp, kwargs = args
    try:
        return prepare_slide(entry, out_dir, mpp, **kwargs), ""
    except SlideStreamError as exc:
        return None, failure_message(entry.path, exc)


def clean_partial_files(out_dir: Path) -> int:
    """Remove temporary files that a killed run left in ``out_dir`` (and its ``masks``)."""
    removed = 0
    for folder in (out_dir, out_dir / "masks"):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name.startswith(".") and p.name.endswith((".partial", ".tmp")):
                    p.unlink(missing_ok=True)
                    removed += 1
    if removed:
        log.info("removed %d temporary files left by an interrupted run in %s", removed, out_dir)
    return removed


def prepare_cohort(
    cohort: Cohort,
    out_dir: str | os.PathLike[str],
    mpp: float,
    *,
    workers: int = 2,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    **kwargs: Any,
) -> PrepareResult:
    """Prepare every slide (in ``workers`` parallel processes; in this one for ``workers=1``)
    and write ``out_dir/prepared.csv``. With ``shard=(i, n)`` only the slides of shard ``i/n``
    (:mod:`slidestream.sampling.shards`) are done and their rows go to
    ``prepared.shard-i-of-n.csv``, for :func:`merge_prepared`."""
    if not mpp > 0:
        raise ConfigError(f"mpp must be positive, got {mpp}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = shard_path(out_dir / "prepared.csv", shard)
    with exclusive_lock(table, "slidestream prepare"):
        clean_partial_files(out_dir)
        result = _run_jobs(cohort, out_dir, mpp, workers, progress, kwargs, shard)
        _replace_into(table, lambda tmp: _write_csv(tmp, result.rows))
    return result


def merge_prepared(cohort: Cohort, out_dir: str | os.PathLike[str]) -> PrepareResult:
    """Write ``out_dir/prepared.csv`` from the shards' ``prepared.shard-i-of-n.csv``, rows in
    cohort order (as an unsharded run writes them); slides in no shard's table (they failed,
    or were not in that run's cohort) are listed in ``failures``. Raises ConfigError when a
    shard's table is missing."""
    out_dir = Path(out_dir)
    with exclusive_lock(out_dir / "prepared.csv", "slidestream prepare"):
        _, table = read_shard_tables(out_dir / "prepared.csv")
        by_source = {r["source"]: r for r in table}
        result = PrepareResult(failures=list(cohort.problems))
        for entry in cohort:
            row = by_source.get(str(entry.path.resolve()))
            if row is None:
                result.failures.append(f"{entry.path}: in no shard's prepared table (failed?)")
                continue
            result.rows.append(row)
            if int(row["damaged_regions"] or 0):
                result.damaged[row["source"]] = int(row["damaged_regions"])
        _replace_into(out_dir / "prepared.csv", lambda tmp: _write_csv(tmp, result.rows))
    return result


def _run_jobs(
    cohort: Cohort,
    out_dir: Path,
    mpp: float,
    workers: int,
    progress: bool,
    kwargs: Any,
    shard: tuple[int, int],
) -> PrepareResult:
    from tqdm import tqdm

    result = PrepareResult(failures=list(cohort.problems))
    stems = output_stems([e.path for e in cohort])
    jobs = [(e, out_dir, mpp, {**kwargs, "stem": s}) for e, s in zip(cohort, stems, strict=True)]
    jobs = shard_items(jobs, shard)  # stems of the whole cohort: the same in every shard
    pool = process_pool(workers) if workers > 1 else contextlib.nullcontext()
    with pool:  # one worker: this process (no start-up cost, same as slidestream tissue)
        for row, err in tqdm(
            pool.map(_job, jobs) if workers > 1 else map(_job, jobs),
            total=len(jobs),
            desc="prepare",
            unit="slide",
            disable=not progress,
        ):
            if err:
                result.failures.append(err)
            elif row is not None:
                result.skipped += int(row.pop("skipped", False))
                result.rows.append(row)
                if row["damaged_regions"]:
                    result.damaged[row["source"]] = int(row["damaged_regions"])
    return result


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, _COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
