"""slidestream: deep learning on gigapixel whole-slide images."""

from __future__ import annotations

from slidestream._version import __version__ as __version__
from slidestream.errors import (
    ConfigError as ConfigError,
)
from slidestream.errors import (
    MissingMppError as MissingMppError,
)
from slidestream.errors import (
    NoPatchesError as NoPatchesError,
)
from slidestream.errors import (
    SlideOpenError as SlideOpenError,
)
from slidestream.errors import (
    SlideReadError as SlideReadError,
)
from slidestream.errors import (
    SlideStreamError as SlideStreamError,
)
from slidestream.errors import (
    StreamingError as StreamingError,
)
from slidestream.io import Slide as Slide
from slidestream.io import list_backends as list_backends
from slidestream.io import open_slide as open_slide
from slidestream.tissue import TissueMask as TissueMask
from slidestream.tissue import detect_tissue as detect_tissue
from slidestream.types import SlideInfo as SlideInfo
