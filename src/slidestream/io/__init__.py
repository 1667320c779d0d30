"""Slide readers: one :class:`Slide` API over OpenSlide, pyvips, tiffslide and plain images."""

from __future__ import annotations

from slidestream.io._registry import (
    BACKENDS as BACKENDS,
)
from slidestream.io._registry import (
    SLIDE_SUFFIXES as SLIDE_SUFFIXES,
)
from slidestream.io._registry import (
    auto_candidates as auto_candidates,
)
from slidestream.io._registry import (
    find_slides as find_slides,
)
from slidestream.io._registry import (
    list_backends as list_backends,
)
from slidestream.io._registry import (
    open_slide as open_slide,
)
from slidestream.io.base import Slide as Slide
