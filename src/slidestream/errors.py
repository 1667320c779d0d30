"""Exception hierarchy. Every error a user can cause is a :class:`SlideStreamError`.

Messages name the file, what was tried, and the fix.
"""

from __future__ import annotations

__all__ = [
    "SlideStreamError",
    "SlideOpenError",
    "SlideReadError",
    "MissingMppError",
    "BackendUnavailableError",
    "ConfigError",
    "StreamingError",
    "NoPatchesError",
]


class SlideStreamError(Exception):
    """Base class of all slidestream errors."""


class SlideOpenError(SlideStreamError):
    """A slide could not be opened by any (or the requested) backend."""


class SlideReadError(SlideStreamError):
    """A slide opened but a region could not be decoded (corrupt tiles, truncated file)."""


class MissingMppError(SlideStreamError):
    """An mpp-based operation was asked of a slide whose microns-per-pixel is unknown."""


class BackendUnavailableError(SlideOpenError):
    """The requested reader library is not installed or failed to load."""


class ConfigError(SlideStreamError, ValueError):
    """An argument or configuration value is invalid."""


class StreamingError(SlideStreamError, ValueError):
    """A network or geometry cannot be streamed exactly (the message names the module and the fix)."""


class NoPatchesError(SlideStreamError):
    """No slide of a cohort gave a single patch (blank slides, empty tissue masks, ``min_tissue``
    too high, or patches larger than the tissue at the requested mpp); the message names them."""

    def __init__(self, message: str = "") -> None:
        # a DataLoader re-raises a worker's error with the worker's traceback as its message:
        # keep the one line the worker raised
        marker = f"{__name__}.{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)
