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
    "TissueDetector",
    "TissueMask",
    "OtsuDetector",
    "HSVDetector",
    "create_detector",
    "detect_tissue",
    "qc_overlay",
]

log = logging.getLogger(__name__)

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
    reused while the slide file, its mpp, the method and its parameters are unchanged.
    """
    detector = method if isinstance(method, TissueDetector) else create_detector(method, **params)
    if cache_dir is None:
        return detector.detect(slide)
    path = Path(cache_dir) / f"{slide.path.stem}.{_cache_key(slide, detector)}.tissue.png"
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
