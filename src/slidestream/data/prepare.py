"""Prepare slides for whole-slide (streamed) training: crop to tissue at a target mpp.

For each slide the tissue region is read at ``mpp`` (e.g. 2 µm/px), cropped to the tissue bounding
box (plus a margin), optionally with the empty rows and columns between tissue pieces removed so
biopsies pack tightly, and written as a tiled pyramidal JPEG TIFF (pyvips) with its tissue mask
and a thumbnail. A ``<stem>.json`` written last marks a slide as done, so re-runs skip it.
``prepared.csv`` lists the outputs with the cohort's label, patient and split.
"""

from __future__ import annotations

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

from slidestream.errors import ConfigError, SlideStreamError
from slidestream.io import open_slide
from slidestream.parallel import process_pool
from slidestream.sampling import Cohort, SlideEntry
from slidestream.tissue import TissueMask, detect_tissue

__all__ = ["PrepareResult", "prepare_cohort", "prepare_slide", "tissue_runs"]

log = logging.getLogger(__name__)


@dataclass
class PrepareResult:
    """Rows of ``prepared.csv`` and the slides that failed (with the reason)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    skipped: int = 0


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
    remove_empty: bool = True,
    margin_um: float = 64.0,
    backend: str = "auto",
    tissue: str = "otsu",
    quality: int = 90,
) -> dict[str, Any]:
    """Prepare one slide; returns its ``prepared.csv`` row (reusing a finished one)."""
    import pyvips

    out_dir = Path(out_dir)
    stem = entry.path.stem
    tiff, meta_path = out_dir / f"{stem}.tiff", out_dir / f"{stem}.json"
    if meta_path.exists() and tiff.exists():
        return {**json.loads(meta_path.read_text())["row"], "skipped": True}
    with open_slide(entry.path, backend=backend, mpp=entry.mpp) as slide:
        mpp_x, mpp_y = slide.require_mpp()
        mask = detect_tissue(slide, tissue, cache_dir=out_dir / "masks")
        if mask.is_empty:
            raise ConfigError(f"{entry.path.name}: no tissue found, nothing to prepare")
        margin = int(np.ceil(margin_um / (mask.mpp or 8.0)))
        rows = tissue_runs(mask.mask.any(1), margin, remove_empty)
        cols = tissue_runs(mask.mask.any(0), margin, remove_empty)
        dx, dy = mask.downsample
        image = np.concatenate(
            [
                np.concatenate(
                    [
                        _read_run(
                            slide,
                            c0 * dx,
                            r0 * dy,
                            (c1 - c0) * dx,
                            (r1 - r0) * dy,
                            mpp,
                            mpp_x,
                            mpp_y,
                        )
                        for c0, c1 in cols
                    ],
                    axis=1,
                )
                for r0, r1 in rows
            ],
            axis=0,
        )
        packed_mask = np.concatenate(
            [
                np.concatenate([mask.mask[r0:r1, c0:c1] for c0, c1 in cols], axis=1)
                for r0, r1 in rows
            ],
            axis=0,
        )
    h, w = image.shape[:2]
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{stem}.tiff.partial"
    vimg = pyvips.Image.new_from_array(image).copy(interpretation="srgb")
    vimg.tiffsave(
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
    )
    os.replace(tmp, tiff)
    TissueMask(packed_mask, (w, h), mask.mpp, mask.method, mask.params).save(
        out_dir / f"{stem}.tissue.png"
    )
    thumb = Image.fromarray(image)
    thumb.thumbnail((512, 512))
    thumb.save(out_dir / f"{stem}.thumb.png")
    row = {
        "slide": tiff.name,  # relative to prepared.csv, so the folder can move
        "label": entry.label or "",
        "patient": entry.patient_id,
        "split": entry.split or "",
        "mpp": mpp,
        "width": w,
        "height": h,
        "source": str(entry.path.resolve()),
    }
    meta = {
        "row": row,
        "rows": rows,
        "cols": cols,
        "mask_downsample": [dx, dy],
        "remove_empty": remove_empty,
        "margin_um": margin_um,
    }
    meta_path.write_text(json.dumps(meta, indent=1))  # written last: marks the slide done
    return row


def _read_run(
    slide: Any, x: float, y: float, w: float, h: float, mpp: float, mpp_x: float, mpp_y: float
) -> np.ndarray:
    out_w, out_h = max(1, round(w * mpp_x / mpp)), max(1, round(h * mpp_y / mpp))
    return slide.read(x, y, out_w, out_h, mpp=mpp)


def _job(args: tuple[Any, ...]) -> tuple[dict[str, Any] | None, str]:
    entry, out_dir, mpp, kwargs = args
    try:
        return prepare_slide(entry, out_dir, mpp, **kwargs), ""
    except SlideStreamError as exc:
        return None, f"{entry.path}: {' '.join(str(exc).split())}"


def prepare_cohort(
    cohort: Cohort,
    out_dir: str | os.PathLike[str],
    mpp: float,
    *,
    workers: int = 2,
    progress: bool = True,
    **kwargs: Any,
) -> PrepareResult:
    """Prepare every slide (in parallel processes) and write ``out_dir/prepared.csv``."""
    from tqdm import tqdm

    if not mpp > 0:
        raise ConfigError(f"mpp must be positive, got {mpp}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = PrepareResult(failures=list(cohort.problems))
    jobs = [(e, out_dir, mpp, kwargs) for e in cohort]
    with process_pool(workers) as pool:
        for row, err in tqdm(
            pool.map(_job, jobs),
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
    keys = ["slide", "label", "patient", "split", "mpp", "width", "height", "source"]
    with open(out_dir / "prepared.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(result.rows)
    return result
