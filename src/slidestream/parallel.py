"""Process pools that are safe with the C libraries we load.

libvips, OpenSlide and torch start threads; a ``fork`` of a process holding them can deadlock in
the child. Pools here therefore use the ``spawn`` start method (workers import what they need).
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

__all__ = ["process_pool"]


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A ``spawn``-based pool of ``max(1, workers)`` processes."""
    return ProcessPoolExecutor(max(1, workers), mp_context=mp.get_context("spawn"))
