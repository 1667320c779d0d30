"""Tissue detection: ``detect_tissue(slide, method=...) -> TissueMask``, with an on-disk cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from slidestream.errors import ConfigError
from slidestream.io.base import Slide
from slidestream.tissue.base import TissueDetector as TissueDetector
from slidestream.tissue.hsv import HSVDetector as HSVDetector
from slidestream.tissue.mask import TissueMask as TissueMask
from slidestream.tissue.mask import qc_overlay as qc_overlay
from slidestream.tissue.otsu import OtsuDetector as OtsuDetector

__all__ = [
    "DETECTORS",
    "NEAR_EMPTY",
    "TissueDetector",
    "TissueMask",
    "OtsuDetector",
    "HSVDetector",
    "create_detector",
    "detect_tissue",
    "qc_overlay",
    "warn_if_near_empty",
]

log = logging.getLogger(__name__)

NEAR_EMPTY = 0.001  # tissue fraction of the slide area below which a mask is near-empty
_WARNED: set[tuple[str, str, float]] = set()

DETECTORS: dict[str, type[TissueDetector]] = {"otsu": OtsuDetector, "hsv": HSVDetector}


def create_detector(method: str = "otsu", **params: Any) -> TissueDetector:
    """A detector by name (``"otsu"`` or ``"hsv"``) with its parameters checked."""
    if method not in DETECTORS:
        raise ConfigError(f"tissue method must be one of {sorted(DETECTORS)}, got {method!r}")
    try:
        return DETECTORS[method](**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameter for tissue method {method!r}: {exc}") from exc


def detect_tissue(
    slide: Slide,
    method: str | TissueDetector = "otsu",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    **params: Any,
) -> TissueMask:
    """Detect tissue on a low-resolution image of ``slide``.

    With ``cache_dir`` the mask is stored there as ``<stem>.<key>.tissue.png`` + ``.json`` and
    reused while the slide file, its mpp, the method and its parameters are unchanged. The key
    is of the file itself (resolved path, size, mtime), so symbolic links to one file under
    other names share its mask; ``<stem>`` is that file's. A mask
    with less than ``NEAR_EMPTY`` tissue (computed or cached) is named in a warning.
    """
    detector = method if isinstance(method, TissueDetector) else create_detector(method, **params)
    mask = _detect_or_load(slide, detector, cache_dir)
    warn_if_near_empty(mask, slide.path)
    return mask


def warn_if_near_empty(mask: TissueMask, path: str | os.PathLike[str]) -> bool:
    """Log a warning naming ``path`` when ``mask`` covers less than ``NEAR_EMPTY`` of the slide
    (once per slide, method and fraction in this process); True when it does."""
    if mask.fraction >= NEAR_EMPTY:
        return False
    key = (str(path), mask.method, round(mask.fraction, 6))
    if key not in _WARNED:
        _WARNED.add(key)
        other = "hsv" if mask.method == "otsu" else "otsu"
        what = "no tissue" if mask.is_empty else f"only {100 * mask.fraction:.3f}% tissue"
        log.warning(
            "%s: %s found by tissue method %r, so it gives few or no patches; check that the "
            "slide is not blank or all background, or compare method %r (slidestream tissue "
            "--method %s draws its mask)",
            path,
            what,
            mask.method,
            other,
            other,
        )
    return True


def _detect_or_load(
    slide: Slide, detector: TissueDetector, cache_dir: str | os.PathLike[str] | None
) -> TissueMask:
    if cache_dir is None:
        return detector.detect(slide)
    # named after the file a link points to: links to one file (under any name) share a mask
    path = Path(cache_dir) / f"{slide.path.resolve().stem}.{_cache_key(slide, detector)}.tissue.png"
    if path.exists() and path.with_suffix(".json").exists():
        try:
            return TissueMask.load(path)
        except ConfigError as exc:
            log.warning("ignoring unreadable cached mask %s: %s", path, exc)
    mask = detector.detect(slide)
    mask.save(path, slide=str(slide.path))
    return mask


def _cache_key(slide: Slide, detector: TissueDetector) -> str:
    stat = slide.path.stat()
    key = {
        "path": str(slide.path.resolve()),
        "size": stat.st_size,
        "mtime": stat.st_mtime_ns,
        "mpp": slide.mpp,
        "method": detector.name,
        "params": detector.params(),
    }
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
