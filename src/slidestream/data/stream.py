"""``PatchStream``: patches sampled inside tissue straight from the slides, as an IterableDataset.

Each DataLoader worker (on each DDP rank) streams its own share of the slides: it keeps a small
pool of open slides, draws ``patches_per_visit`` patches from one of them, then rotates to
another. Tissue masks are made on a slide's first visit (or loaded from ``mask_dir``), so the
first batch arrives after one slide's mask, not the whole cohort's. All randomness, the
augmentation's included, comes from ``(seed, epoch, rank, worker)``.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from slidestream.data.functional import to_chw
from slidestream.data.nopatches import no_patches_error, warn_empty_slide
from slidestream.data.stream_setup import _warm_imports, prepare_masks
from slidestream.data.stream_setup import default_mask_dir as default_mask_dir
from slidestream.data.transforms import split_hwc
from slidestream.errors import ConfigError, SlideStreamError
from slidestream.io import Slide, open_slide
from slidestream.sampling import (
    Annotations,
    AnnotationSampler,
    Cohort,
    PatchLocation,
    PatchSampler,
    SlideEntry,
    load_annotations,
    load_cohort,
    slide_weights,
)
from slidestream.tissue import TissueDetector, TissueMask, detect_tissue

__all__ = ["PatchStream", "default_mask_dir"]

log = logging.getLogger(__name__)

_PATCHES, _OPENED, _FAILED, _DROPPED, _EMPTY = range(5)
_MASKS_KEPT = 64  # tissue masks (and closed slides) kept in memory per worker
_PAUSED_KEPT = 1024  # evicted slides whose sampling position is kept, per worker


@dataclass
class _SlideState:
    """A slide open in one worker: handle, mask, location iterator, failure count."""

    index: int
    entry: SlideEntry
    slide: Slide
    mask: TissueMask
    locations: Iterator[PatchLocation]
    emitted: int = 0
    failures: int = 0
    annotations: Annotations | None = field(default=None, repr=False)


class PatchStream(IterableDataset):
    """Stream of patch dicts from a cohort.

    Each item has ``image`` (a (3, size, size) uint8 tensor unless ``transform`` changes it),
    ``label`` (class index, -1 if unlabelled), ``slide`` (path), ``x``, ``y`` (level-0 px),
    ``mpp`` (of the patch), ``tissue_fraction`` and, with ``views``, a list ``views``.

    ``patches_per_slide=None`` streams endlessly (for step-based training), visiting slides with
    the probabilities of ``balance`` (``None``, ``"balanced"`` or ``{label: weight}``); an integer
    gives a finite epoch with that many patches per slide (fewer if a slide runs dry).
    A slide whose opening or reading fails ``max_failures`` times is logged, counted and dropped.

    Memory is bounded whatever the cohort size: each worker keeps at most ``pool_size`` slide
    handles open (least recently visited closed first), the metadata of the last 64 closed
    slides and the last 64 tissue masks (others are reloaded from ``mask_dir`` on their next
    visit), and the sampling position of the last 1,024 evicted slides (a slide evicted from
    that too starts its locations again, which only an endless stream can notice). The cohort
    itself is a list of compact :class:`~slidestream.sampling.SlideEntry` rows (~0.5 kB each).
    A slide that gives no patch location (blank, empty mask, ``min_tissue`` too high) is named in
    a warning and counted (``stats()["slides_empty"]``); when no slide gives any patch,
    iteration raises :class:`~slidestream.errors.NoPatchesError` naming them.
    """

    def __init__(
        self,
        cohort: Cohort | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        sampler: PatchSampler,
        *,
        transform: Callable[[torch.Tensor], Any] | None = None,
        views: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
        patches_per_visit: int = 16,
        pool_size: int = 16,
        patches_per_slide: int | None = None,
        balance: str | Mapping[str, float] | None = None,
        tissue: str | TissueDetector = "otsu",
        mask_dir: str | os.PathLike[str] | None = None,
        backend: str = "auto",
        seed: int = 0,
        max_failures: int = 3,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("patches_per_visit", patches_per_visit),
            ("pool_size", pool_size),
            ("max_failures", max_failures),
        ):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if patches_per_slide is not None and patches_per_slide < 1:
            raise ConfigError(f"patches_per_slide must be None or >= 1, got {patches_per_slide}")
        self.cohort = load_cohort(cohort)
        if not len(self.cohort):
            raise ConfigError(
                f"no usable slides in cohort {self.cohort.source}: "
                + "; ".join(self.cohort.problems[:5])
            )
        self.sampler, self.transform, self.views = sampler, transform, views
        self.patches_per_visit, self.pool_size = patches_per_visit, pool_size
        self.patches_per_slide, self.balance = patches_per_slide, balance
        self.tissue, self.backend, self.seed = tissue, backend, seed
        self.mask_dir = Path(mask_dir) if mask_dir is not None else default_mask_dir()
        self.max_failures = max_failures
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.classes = self._classes()
        slide_weights([s.label for s in self.cohort], balance)  # validate early
        self._counters = mp.get_context().Array("q", 5)
        _warm_imports()

    # ----------------------------------------------------------------- public helpers
    def set_epoch(self, epoch: int) -> None:
        """Change the random streams for a new epoch (call before creating the iterator)."""
        self.epoch = int(epoch)

    def stats(self) -> dict[str, int]:
        """Counts summed over all workers so far: patches, slides opened, failures, drops, and
        slides that gave no patch location (``slides_empty``, once per slide and pass)."""
        c = self._counters
        return {
            "patches": c[_PATCHES],
            "slides_opened": c[_OPENED],
            "slide_failures": c[_FAILED],
            "slides_dropped": c[_DROPPED],
            "slides_empty": c[_EMPTY],
        }

    def prepare(self, workers: int = 2) -> list[str]:
        """Make (or load) every slide's tissue mask now, in parallel processes; returns the
        slides that failed, which are then left out of the stream."""
        return prepare_masks(self, workers)

    # ----------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # no cv2.setNumThreads here: in a forked worker it hangs once the parent's OpenCV thread
        # pool has run, and the per-patch OpenCV calls are single-threaded at these sizes anyway
        rank, world = self._dist()
        shard, n_shards = rank * n_workers + worker, world * n_workers
        indices = [int(i) for i in range(len(self.cohort))]
        if len(indices) >= n_shards:
            indices = indices[shard::n_shards]
        elif worker == 0 and rank == 0:
            log.warning(
                "%d slides for %d workers x ranks: every worker streams all slides "
                "(with its own random stream)",
                len(indices),
                n_shards,
            )
        run = _Run(self, np.random.default_rng([self.seed, self.epoch, rank, worker]))
        if self.patches_per_slide is None:
            return run.endless(indices)
        return run.finite(indices)

    def _item(
        self, state: _SlideState, loc: PatchLocation, rng: np.random.Generator
    ) -> dict[str, Any]:
        pixels = self.sampler.read(state.slide, loc)
        label = loc.label if loc.label is not None else state.entry.label
        item: dict[str, Any] = {
            "label": self.classes.index(label) if label in self.classes else -1,
            "slide": str(state.entry.path),
            "x": loc.x,
            "y": loc.y,
            "mpp": float(self.sampler.mpp or (state.slide.mpp or (math.nan,))[0]),
            "tissue_fraction": loc.tissue_fraction,
        }
        if self.transform is None and self.views is None:
            item["image"] = torch.from_numpy(to_chw(pixels))
            return item
        # seed torch's CPU generator from our stream, without touching the caller's state
        # (torch.manual_seed would also queue CUDA seeding, ~0.4 ms a call)
        saved = torch.get_rng_state()
        torch.default_generator.manual_seed(int(rng.integers(2**63)))
        try:
            steps, transform = self._split_transform()
            if steps and not (pixels.dtype == np.uint8 and pixels.shape[2:] == (3,)):
                steps, transform = [], self.transform  # not RGB bytes: the tensor path checks
            for step in steps:  # our own transforms run on the HWC pixels, as read
                pixels = step.hwc(pixels)
            image = torch.from_numpy(to_chw(pixels))
            if self.views is not None:
                item["views"] = self.views(image)
            if transform is not None:
                image = transform(image)
        finally:
            torch.set_rng_state(saved)
        item["image"] = image.contiguous() if isinstance(image, torch.Tensor) else image
        return item

    def _split_transform(self) -> tuple[list[Any], Any]:
        """(leading steps of ``transform`` that run on HWC arrays, the rest), cached for the
        current ``transform`` and its steps; none with ``views``, which see the image as read."""
        steps = getattr(self.transform, "transforms", ())  # a Compose may change in place
        key = (id(self.transform), id(self.views), *map(id, steps))
        if (cached := self.__dict__.get("_split")) is None or cached[0] != key:
            split = split_hwc(self.transform) if self.views is None else ([], self.transform)
            cached = self._split = (key, *split)
        return cached[1], cached[2]

    # ----------------------------------------------------------------- setup helpers
    def _classes(self) -> list[str]:
        if isinstance(self.sampler, AnnotationSampler):
            if self.sampler.classes is not None:
                return sorted(self.sampler.classes)
            names: set[str] = set()
            for entry in self.cohort:
                if entry.annotations is not None:
                    names.update(load_annotations(entry.annotations).classes)
            return sorted(names)
        return self.cohort.classes

    def _dist(self) -> tuple[int, int]:
        if self.rank is not None or self.world_size is not None:
            rank, world = self.rank or 0, self.world_size or 1
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        if not 0 <= rank < world:
            raise ConfigError(f"rank must be in [0, world_size), got {rank} of {world}")
        return rank, world


class _Run:
    """One iteration of one worker: its random generator, open slides and failure counts."""

    def __init__(self, stream: PatchStream, rng: np.random.Generator) -> None:
        self.stream, self.rng = stream, rng
        self.states: OrderedDict[int, _SlideState] = OrderedDict()
        self.failures: dict[int, int] = {}
        # masks and closed slides outlive the open-slide pool: a slide that comes back needs no
        # mask reload and no metadata parsing, just its library handle reopened
        self.masks: OrderedDict[int, TissueMask] = OrderedDict()
        self.closed: OrderedDict[int, Slide] = OrderedDict()
        # samplers without replacement: where each evicted slide's locations stopped, so a
        # slide that comes back goes on instead of repeating (compact location arrays)
        self.paused: dict[int, Iterator[PatchLocation]] = {}
        self.yielded: set[int] = set()  # slides that gave at least one patch in this pass
        self.empty: list[int] = []  # slides that gave no patch location at all

    def endless(self, indices: list[int]) -> Iterator[dict[str, Any]]:
        """Visit slides drawn by weight; the open ones stay in an LRU pool of ``pool_size``."""
        st, alive = self.stream, list(indices)
        labels = {i: st.cohort.slides[i].label for i in indices}
        while alive:
            weights = slide_weights([labels[i] for i in alive], st.balance)
            index = alive[self.rng.choice(len(alive), p=weights)]
            finished, _ = yield from self.visit(index, st.patches_per_visit)
            if finished:
                alive.remove(index)
                old = self.states.pop(index, None)
                if old is not None:
                    old.slide.close()
        self.check_any()

    def finite(self, indices: list[int]) -> Iterator[dict[str, Any]]:
        st = self.stream
        queue, pool, left = [int(i) for i in self.rng.permutation(indices)], [], {}
        while queue or pool:
            while queue and len(pool) < st.pool_size:
                pool.append(i := queue.pop(0))
                left[i] = st.patches_per_slide or 0
            slot = int(self.rng.integers(len(pool)))
            i = pool[slot]
            finished, count = yield from self.visit(i, min(st.patches_per_visit, left[i]))
            left[i] -= count
            if finished or left[i] <= 0:
                pool.pop(slot)
                old = self.states.pop(i, None)
                if old is not None:
                    old.slide.close()
        self.check_any()

    def visit(self, index: int, n: int) -> Iterator[dict[str, Any]]:
        """Up to ``n`` patches of one slide; returns (slide finished or dropped, patches)."""
        state = self.open(index)
        if state is None:
            return self.failures.get(index, 0) >= self.stream.max_failures, 0
        for count in range(n):
            loc = next(state.locations, None)
            if loc is None:
                if index not in self.yielded:
                    self.report_empty(state)
                return True, count
            try:
                item = self.stream._item(state, loc, self.rng)
            except SlideStreamError as exc:
                return self.fail(index, exc), count
            state.emitted += 1
            self.yielded.add(index)
            self.stream._counters[_PATCHES] += 1
            yield item
        return False, n

    def open(self, index: int) -> _SlideState | None:
        if index in self.states:
            self.states.move_to_end(index)
            return self.states[index]
        st, entry = self.stream, self.stream.cohort.slides[index]
        try:
            slide = self.closed.pop(index, None) or open_slide(
                entry.path, backend=st.backend, mpp=entry.mpp
            )
            mask = self.masks.pop(index, None) or detect_tissue(
                slide, st.tissue, cache_dir=st.mask_dir
            )
            self.masks[index] = mask
            while len(self.masks) > _MASKS_KEPT:
                self.masks.popitem(last=False)
            ann = load_annotations(entry.annotations) if entry.annotations else None
        except SlideStreamError as exc:
            self.fail(index, exc)
            return None
        st._counters[_OPENED] += 1
        locations = self.paused.pop(index, None)
        if locations is None:
            locations = st.sampler.iter_locations(slide, mask, self.rng, ann)
        state = _SlideState(index, entry, slide, mask, locations, annotations=ann)
        self.states[index] = state
        while len(self.states) > st.pool_size:
            old_index, old = self.states.popitem(last=False)
            old.slide.close()
            self.closed[old_index] = old.slide
            while len(self.closed) > _MASKS_KEPT:
                self.closed.popitem(last=False)
            if not st.sampler.with_replacement:
                self.paused[old_index] = old.locations
                while len(self.paused) > _PAUSED_KEPT:
                    del self.paused[next(iter(self.paused))]
        return state

    def report_empty(self, state: _SlideState) -> None:
        """Name and count a slide that gave no patch location."""
        st = self.stream
        warn_empty_slide(state.entry.path, state.mask, st.sampler)
        self.empty.append(state.index)
        with st._counters.get_lock():
            st._counters[_EMPTY] += 1

    def check_any(self) -> None:
        """At the end of a pass that gave nothing: raise when no worker's slides gave a patch
        (every slide of the cohort is empty or dropped, counted over all workers)."""
        st = self.stream
        if self.yielded:
            return
        with st._counters.get_lock():
            c = st._counters
            done = c[_EMPTY] + c[_DROPPED] >= len(st.cohort) and c[_PATCHES] == 0
        if done:
            dropped = [i for i, n in self.failures.items() if n >= st.max_failures]
            names = [st.cohort.slides[i].path for i in self.empty]
            raise no_patches_error(names, st.sampler, total=len(st.cohort), failed=len(dropped))

    def fail(self, index: int, exc: Exception) -> bool:
        """Count a failure of slide ``index``; True when it is dropped."""
        st, entry = self.stream, self.stream.cohort.slides[index]
        st._counters[_FAILED] += 1
        n = self.failures[index] = self.failures.get(index, 0) + 1
        dropped = n >= st.max_failures
        drop = "; dropping it" if dropped else ""
        log.warning("%s failed (%d/%d)%s: %s", entry.path, n, st.max_failures, drop, exc)
        if dropped:
            st._counters[_DROPPED] += 1
            self.paused.pop(index, None)
            self.closed.pop(index, None)
            old = self.states.pop(index, None)
            if old is not None:
                old.slide.close()
        return dropped
