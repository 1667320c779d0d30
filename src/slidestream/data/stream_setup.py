"""Setup helpers of ``PatchStream``: where masks are cached, imports for forked workers, and
the per-slide mask job of ``PatchStream.prepare``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from slidestream.errors import SlideStreamError
from slidestream.io import open_slide
from slidestream.sampling import SlideEntry
from slidestream.tissue import detect_tissue

__all__ = ["default_mask_dir", "prepare_masks"]


def default_mask_dir() -> Path:
    """Where masks are cached when no ``mask_dir`` is given (``$SLIDESTREAM_CACHE/masks``)."""
    root = os.environ.get("SLIDESTREAM_CACHE") or Path.home() / ".cache" / "slidestream"
    return Path(root) / "masks"


def _warm_imports() -> None:
    """Import what workers need lazily now, so forked DataLoader workers inherit it instead of
    each importing the readers, scikit-image and SciPy before their first patch."""
    import contextlib
    import importlib

    names = "scipy.ndimage skimage.color skimage.filters skimage.morphology tifffile tiffslide"
    for name in [*names.split(), "pyvips", "openslide"]:
        with contextlib.suppress(ImportError, OSError):  # a missing optional reader is fine
            importlib.import_module(name)


def _mask_job(entry: SlideEntry, backend: str, tissue: Any, mask_dir: str) -> str:
    try:
        with open_slide(entry.path, backend=backend, mpp=entry.mpp) as slide:
            detect_tissue(slide, tissue, cache_dir=mask_dir)
    except SlideStreamError as exc:
        return " ".join(str(exc).split())
    return ""


def prepare_masks(stream: Any, workers: int) -> list[str]:
    """``PatchStream.prepare``: every slide's mask made (or loaded) in ``workers`` processes;
    failed slides are left out of ``stream.cohort`` and returned as ``"path: reason"``."""
    from tqdm import tqdm

    from slidestream.parallel import process_pool

    args = [(e, stream.backend, stream.tissue, str(stream.mask_dir)) for e in stream.cohort]
    failed, dropped = [], []
    with process_pool(workers) as pool:
        results = pool.map(_mask_job, *zip(*args, strict=True))
        for entry, err in tqdm(
            zip(stream.cohort, results, strict=True),
            total=len(args),
            desc="tissue masks",
            unit="slide",
        ):
            if err:
                failed.append(f"{entry.path}: {err}")
                dropped.append(entry.path)
    stream.cohort = stream.cohort.without(dropped)
    stream.cohort.problems.extend(failed)
    return failed
