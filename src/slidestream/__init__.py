"""slidestream: deep learning on gigapixel whole-slide images.

The public names below are resolved on first use (PEP 562 ``__getattr__``), so ``import slidestream``
and the command line's ``--help`` load no numpy, torch or slide reader; ``slidestream.open_slide``
imports the reader layer the first time it is looked up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slidestream._lazy import lazy_getattr
from slidestream._version import __version__ as __version__

# public name -> module that defines it
_LAZY = {
    "ConfigError": "slidestream.errors",
    "MissingMppError": "slidestream.errors",
    "NoPatchesError": "slidestream.errors",
    "SlideOpenError": "slidestream.errors",
    "SlideReadError": "slidestream.errors",
    "SlideStreamError": "slidestream.errors",
    "StreamingError": "slidestream.errors",
    "Slide": "slidestream.io",
    "list_backends": "slidestream.io",
    "open_slide": "slidestream.io",
    "TissueMask": "slidestream.tissue",
    "detect_tissue": "slidestream.tissue",
    "SlideInfo": "slidestream.types",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # static analysers see the plain re-exports
    from slidestream.errors import ConfigError as ConfigError
    from slidestream.errors import MissingMppError as MissingMppError
    from slidestream.errors import NoPatchesError as NoPatchesError
    from slidestream.errors import SlideOpenError as SlideOpenError
    from slidestream.errors import SlideReadError as SlideReadError
    from slidestream.errors import SlideStreamError as SlideStreamError
    from slidestream.errors import StreamingError as StreamingError
    from slidestream.io import Slide as Slide
    from slidestream.io import list_backends as list_backends
    from slidestream.io import open_slide as open_slide
    from slidestream.tissue import TissueMask as TissueMask
    from slidestream.tissue import detect_tissue as detect_tissue
    from slidestream.types import SlideInfo as SlideInfo


__getattr__ = lazy_getattr("slidestream", _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
