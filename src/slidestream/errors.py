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
