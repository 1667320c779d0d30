"""slidestream: deep learning on gigapixel whole-slide images."""

from __future__ import annotations

from slidestream._version import __version__ as __version__
from slidestream.errors import (
    ConfigError as ConfigError,
    MissingMppError as MissingMppError,
    SlideOpenError as SlideOpenError,
    SlideReadError as SlideReadError,
    SlideStreamError as SlideStreamError,
    StreamingError as StreamingError,
)
