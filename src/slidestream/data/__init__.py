"""Patches as tensors: the on-the-fly ``PatchStream``, augmentations and loader monitoring."""

from __future__ import annotations

from slidestream.data.functional import normalize as normalize
from slidestream.data.loader import PatchCollate as PatchCollate
from slidestream.data.loader import PatchLoader as PatchLoader
from slidestream.data.monitor import LoaderMonitor as LoaderMonitor
from slidestream.data.stream import PatchStream as PatchStream
from slidestream.data.stream import default_mask_dir as default_mask_dir
from slidestream.data.transforms import (
    CoarseElastic as CoarseElastic,
)
from slidestream.data.transforms import (
    HEDJitter as HEDJitter,
)
from slidestream.data.transforms import (
    MultiView as MultiView,
)
from slidestream.data.transforms import (
    RandomFlipRot90 as RandomFlipRot90,
)
from slidestream.data.transforms import (
    StainNormalize as StainNormalize,
)
from slidestream.data.transforms import (
    default_augmentation as default_augmentation,
)
