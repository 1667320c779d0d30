"""Cohorts and patch samplers (where to read patches; no pixels are read here)."""

from __future__ import annotations

from slidestream.sampling.annotations import (
    Annotations as Annotations,
)
from slidestream.sampling.annotations import (
    AnnotationSampler as AnnotationSampler,
)
from slidestream.sampling.annotations import (
    load_annotations as load_annotations,
)
from slidestream.sampling.balance import slide_weights as slide_weights
from slidestream.sampling.base import (
    PatchGeometry as PatchGeometry,
)
from slidestream.sampling.base import (
    PatchLocation as PatchLocation,
)
from slidestream.sampling.base import (
    PatchSampler as PatchSampler,
)
from slidestream.sampling.cohort import (
    Cohort as Cohort,
)
from slidestream.sampling.cohort import (
    SlideEntry as SlideEntry,
)
from slidestream.sampling.cohort import (
    load_cohort as load_cohort,
)
from slidestream.sampling.grid import GridPatchSampler as GridPatchSampler
from slidestream.sampling.random import RandomPatchSampler as RandomPatchSampler
from slidestream.sampling.shards import parse_shard as parse_shard
from slidestream.sampling.shards import shard_items as shard_items
from slidestream.sampling.shards import shard_path as shard_path
from slidestream.sampling.splits import (
    parse_split as parse_split,
)
from slidestream.sampling.splits import (
    split_by_patient as split_by_patient,
)
