"""Backend registry and ``open_slide``: pick a reader by name or automatically."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from slidestream.errors import BackendUnavailableError, ConfigError, SlideOpenError
from slidestream.io._pixels import RefusedFileError
from slidestream.io.base import Slide
from slidestream.io.image import ImageSlide
from slidestream.io.openslide import OpenSlideSlide
from slidestream.io.pyvips import PyvipsSlide
from slidestream.io.remote import RemotePath, is_url
from slidestream.io.tiffslide import TiffSlideSlide

__all__ = [
    "BACKENDS",
    "SLIDE_SUFFIXES",
    "open_slide",
    "list_backends",
    "auto_candidates",
    "find_slides",
]

log = logging.getLogger(__name__)

BACKENDS: dict[str, type[Slide]] = {
    "pyvips": PyvipsSlide,
    "tiffslide": TiffSlideSlide,
    "openslide": OpenSlideSlide,
    "image": ImageSlide,
}

_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".btf", ".tf2", ".tf8", ".qptiff"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
_OPENSLIDE_SUFFIXES = {".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".dcm", ".svslide"}

SLIDE_SUFFIXES = frozenset(_TIFF_SUFFIXES | _IMAGE_SUFFIXES | _OPENSLIDE_SUFFIXES)


def find_slides(inputs: list[str | os.PathLike[str]], recursive: bool = False) -> list[Any]:
    """Expand files, folders and globs into slide paths, in a stable order.

    Folders contribute files with a slide suffix; the files of one DICOM slide (a folder of
    ``.dcm`` instances) count once. A path that does not exist is returned as is, so that the
    caller reports it. URLs come back as :class:`~slidestream.io.remote.RemotePath`, unchecked.
    """
    import glob

    found: list[Any] = []
    for item in inputs:
        if is_url(item):  # kept as given (a RemotePath); folders and globs of URLs are not expanded
            found.append(item if isinstance(item, RemotePath) else RemotePath(str(item)))
            continue
        item = Path(item)
        if item.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(
                p for p in item.glob(pattern) if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
            )
            found.extend(_one_dicom_per_folder(files))
        elif not item.exists() and any(c in str(item) for c in "*?["):
            found.extend(sorted(Path(p) for p in glob.glob(str(item), recursive=recursive)))
        else:
            found.append(item)
    seen: set[Path] = set()
    return [p for p in found if not (p in seen or seen.add(p))]


def _one_dicom_per_folder(files: list[Path]) -> list[Path]:
    dicom_dirs: set[Path] = set()
    out = []
    for p in files:
        if p.suffix.lower() == ".dcm":
            if p.parent in dicom_dirs:
                continue
            dicom_dirs.add(p.parent)
        out.append(p)
    return out


def list_backends() -> list[str]:
    """Names accepted by ``open_slide(backend=...)`` besides ``"auto"``."""
    return list(BACKENDS)


def auto_candidates(path: str | os.PathLike[str]) -> list[str]:
    """Backends to try for ``path``, fastest first (pyvips decoded 256² regions ~1.8x faster)."""
    suffix = Path(path).suffix.lower()
    if suffix in _IMAGE_SUFFIXES:
        return ["image"]
    if suffix in _TIFF_SUFFIXES:
        return ["pyvips", "tiffslide", "openslide", "image"]
    if suffix in _OPENSLIDE_SUFFIXES:
        return ["openslide", "tiffslide"]
    return ["openslide", "tiffslide", "image"]


def open_slide(
    path: str | os.PathLike[str],
    backend: str = "auto",
    *,
    mpp: float | None = None,
    resample: str = "bilinear",
    cache_dir: str | os.PathLike[str] | bool | None = None,
) -> Slide:
    """Open a whole-slide image: a local file, or an ``s3://``, ``gs://`` or ``http(s)://`` URL.

    ``backend`` is ``"auto"`` (the fastest reader that opens the file) or one of
    :func:`list_backends`. ``mpp`` (µm per level-0 pixel) overrides the file's own value and is
    required for mpp-based reads of files that carry none. ``resample`` is the filter used
    when a read needs resizing. URLs are read by tiffslide through fsspec with a block cache in
    ``cache_dir`` (see :mod:`slidestream.io.remote`; needs the ``remote`` extra). Raises
    SlideOpenError (file missing or unreadable by every reader) or ConfigError (bad option).
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ConfigError(f"backend must be 'auto' or one of {list_backends()}, got {backend!r}")
    if is_url(path):
        return _open_url(path, backend, mpp, resample, cache_dir)
    path = Path(path)
    if not path.exists():
        raise SlideOpenError(f"slide not found: {path}")
    if path.is_dir():
        raise SlideOpenError(f"{path} is a folder, not a slide file (for MRXS give the .mrxs file)")
    names = auto_candidates(path) if backend == "auto" else [backend]
    reasons = []
    for name in names:
        try:
            return BACKENDS[name](path, mpp=mpp, resample=resample)
        except RefusedFileError:  # the file's header or pixels: every reader refuses it alike
            raise
        except (SlideOpenError, ConfigError) as exc:
            if isinstance(exc, ConfigError):
                raise
            log.debug("%s could not open %s: %s", name, path, exc)
            reasons.append(f"{name}: {_short(exc, path, name)}")
    tried = "; ".join(reasons)
    hint = (
        "the file may be corrupt or in a format none of the readers supports"
        if backend == "auto"
        else "try backend='auto'"
    )
    raise SlideOpenError(f"cannot open {path} ({tried}); {hint}") from None


def _open_url(
    url: str | os.PathLike[str],
    backend: str,
    mpp: float | None,
    resample: str,
    cache_dir: str | os.PathLike[str] | bool | None,
) -> Slide:
    if backend not in ("auto", "tiffslide"):
        raise ConfigError(
            f"{url}: URLs are read by the tiffslide backend; use backend 'auto' or 'tiffslide', "
            f"not {backend!r}"
        )
    path = url if isinstance(url, RemotePath) else RemotePath(str(url))
    if cache_dir is not None:
        path = RemotePath(path.url, cache_dir)
    return TiffSlideSlide(path, mpp=mpp, resample=resample)


def _short(exc: Exception, path: Path, name: str) -> str:
    text = str(exc).replace(str(path), path.name).strip()
    for prefix in (f"{name}: ", f"{name} "):
        text = text.removeprefix(prefix)
    if isinstance(exc, BackendUnavailableError):
        return text
    return text.splitlines()[0][:200] if text else type(exc).__name__
