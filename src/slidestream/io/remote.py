"""Slides in object storage or on web servers: ``s3://``, ``gs://``, ``http(s)://`` URLs.

URLs are read by the tiffslide backend through fsspec (the optional extra ``remote``:
``pip install 'slidestream[remote]'`` brings fsspec, aiohttp, s3fs and gcsfs). Reads go through an
fsspec block cache (``blockcache``): the parts of the file that reads touch (TIFF header, tile
offsets, the tiles themselves) are fetched once and kept in a sparse local file under
``cache_dir`` (default ``$SLIDESTREAM_CACHE/remote``, else ``~/.cache/slidestream/remote``), so
a slide visited again, by any process, reads from disk. ``cache_dir=False`` reads straight from
the server.

A URL stays a string: :class:`RemotePath` gives it the few ``pathlib`` members the rest of the
library uses (``name``, ``stem``, ``suffix``, ``resolve()``, ``stat()``, ``exists()``) without
turning ``s3://bucket/a.svs`` into ``s3:/bucket/a.svs``. Credentials come the usual way of each
filesystem (AWS/GCP environment variables and config files); none are handled here.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any

from slidestream.errors import BackendUnavailableError, SlideOpenError

__all__ = ["REMOTE_SCHEMES", "RemotePath", "as_slide_path", "is_url", "open_remote"]

REMOTE_SCHEMES = ("s3", "gs", "gcs", "http", "https")
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)
_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}


def is_url(value: Any) -> bool:
    """True for ``s3://``, ``gs://``, ``gcs://``, ``http://`` and ``https://`` strings."""
    if isinstance(value, RemotePath):
        return True
    m = _URL.match(str(value)) if isinstance(value, str) else None
    return bool(m) and m[1].lower() in REMOTE_SCHEMES


def default_cache_dir() -> Path:
    """``$SLIDESTREAM_CACHE/remote`` (or ``~/.cache/slidestream/remote``)."""
    root = os.environ.get("SLIDESTREAM_CACHE") or Path.home() / ".cache" / "slidestream"
    return Path(root) / "remote"


class RemotePath:
    """A slide URL with the ``pathlib`` members the library uses; ``str()`` is the URL as given.

    ``cache_dir``: where fetched blocks are kept (None: :func:`default_cache_dir`; False: none).
    Equal (and hashed) by URL only."""

    __slots__ = ("url", "cache_dir")

    def __init__(self, url: str, cache_dir: str | os.PathLike[str] | bool | None = None) -> None:
        if not is_url(url):
            raise SlideOpenError(f"not a slide URL (s3://, gs://, http(s)://): {url!r}")
        self.url, self.cache_dir = str(url), cache_dir

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: object) -> bool:
        return str(self) < str(other)

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0].lower()

    @property
    def name(self) -> str:
        """The last path segment, without query string (``a.svs`` of ``https://h/x/a.svs?v=1``)."""
        return (
            self.url.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0].rstrip("/").split("/")[-1]
        )

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    def resolve(self) -> RemotePath:
        return self

    def expanduser(self) -> RemotePath:
        return self

    def is_absolute(self) -> bool:
        return True

    def is_dir(self) -> bool:
        return False

    def exists(self) -> bool:
        """Asks the server (one request); False when it says the object is not there."""
        fs, path = _filesystem(self.url)
        try:
            return bool(fs.exists(path))
        except OSError:
            return False

    is_file = exists

    def stat(self) -> SimpleNamespace:
        """``st_size`` (bytes) and ``st_mtime_ns``: the server's modification time, or a number
        derived from its ETag, so a changed object gets a new tissue-mask cache key."""
        fs, path = _filesystem(self.url)
        try:
            info = fs.info(path)
        except (OSError, ValueError) as exc:
            raise SlideOpenError(f"cannot reach {self.url}: {exc}") from exc
        stamp = info.get("LastModified") or info.get("mtime") or info.get("updated")
        stamp = stamp or info.get("ETag") or info.get("etag") or info.get("md5Hash") or ""
        digest = hashlib.sha1(str(stamp).encode()).hexdigest()[:15]  # the same in every process
        return SimpleNamespace(st_size=int(info.get("size") or 0), st_mtime_ns=int(digest, 16))


def as_slide_path(value: str | os.PathLike[str]) -> Path | RemotePath:
    """A :class:`RemotePath` for a URL (kept as is), a :class:`~pathlib.Path` otherwise."""
    if isinstance(value, RemotePath):
        return value
    return RemotePath(value) if is_url(value) else Path(value)


def _filesystem(url: str) -> tuple[Any, str]:
    """fsspec filesystem and path of ``url``; BackendUnavailableError naming what to install."""
    scheme = url.split("://", 1)[0].lower()
    try:
        from fsspec.core import url_to_fs

        return url_to_fs(url)
    except ImportError as exc:
        package = _PACKAGES.get(scheme, "fsspec")
        raise BackendUnavailableError(
            f"reading {scheme}:// slides needs fsspec and {package} ({exc}); install them with: "
            f"pip install 'slidestream[remote]'"
        ) from exc


def open_remote(path: RemotePath) -> Any:
    """A seekable binary file object of ``path``, through the block cache (see module doc).

    Raises SlideOpenError when the object cannot be reached, BackendUnavailableError when the
    filesystem's package is missing."""
    fs, inner = _filesystem(path.url)
    if path.cache_dir is not False:
        from fsspec.implementations.cached import CachingFileSystem

        storage = Path(path.cache_dir) if path.cache_dir else default_cache_dir()
        storage.mkdir(parents=True, exist_ok=True)
        fs = CachingFileSystem(fs=fs, cache_storage=str(storage), check_files=False)
    try:
        return fs.open(inner, "rb")
    except (OSError, ValueError) as exc:
        raise SlideOpenError(f"cannot open {path.url}: {' '.join(str(exc).split())}") from exc
