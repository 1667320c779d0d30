"""Process pools that are safe with the C libraries we load, and that die with their parent.

libvips, OpenSlide and torch start threads; a ``fork`` of a process holding them can deadlock in
the child. Pools here therefore use the ``spawn`` start method (workers import what they need).

A worker must not outlive the command that started it: killed with ``kill -9``, the parent gets
no chance to stop its pool, and orphaned workers (hundreds of MB each) would go on writing into
the output folder. Each worker therefore asks Linux to SIGKILL it when its parent dies
(``prctl(PR_SET_PDEATHSIG)``) and, on every platform, runs a watchdog thread that exits the
worker within a second of the parent's disappearance. (Linux sends the death signal when the
*thread* that started the worker ends, so use a pool from the thread that created it, as a
``with process_pool(n) as pool:`` block does.)

:func:`exclusive_lock` keeps two commands from writing the same output at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from slidestream.errors import SlideStreamError

__all__ = ["OutputBusyError", "exclusive_lock", "process_pool"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A ``spawn``-based pool of ``max(1, workers)`` processes that exit when this one dies."""
    return ProcessPoolExecutor(
        max(1, workers),
        mp_context=mp.get_context("spawn"),
        initializer=die_with_parent,
        initargs=(os.getpid(),),
    )


def die_with_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Make this process exit when ``parent_pid`` is gone (pool initializer); on Ctrl-C
    (SIGINT, sent to the whole process group) it exits at once and quietly, leaving the
    parent to report the interrupt."""
    signal.signal(signal.SIGINT, _exit_quietly)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)
    thread = threading.Thread(
        target=_watch_parent, args=(parent_pid, interval), name="parent-watchdog", daemon=True
    )
    thread.start()


def _exit_quietly(signum: int, frame: object) -> None:
    os._exit(128 + signum)


def _watch_parent(parent_pid: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent_pid:
            os._exit(1)  # no cleanup: the parent's next run cleans up partial outputs


class OutputBusyError(SlideStreamError):
    """Another process is writing the same output."""


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike[str], command: str = "slidestream") -> Iterator[None]:
    """Hold ``<target>.lock`` (with this pid in it) for the duration of the block.

    Raises :class:`OutputBusyError` naming ``target`` and the other process's pid when another
    process holds it. The lock is an OS file lock (``flock``): a process killed with ``-9``
    releases it, so a stale lock file never blocks the next run.
    """
    target = Path(target)
    lock = target.with_name(target.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process check
        yield
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputBusyError(
                f"{target} is being written by another {command} (pid {other}); wait for it "
                f"to finish or choose another output"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not unlinked meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still locked: a waiting process re-checks the inode
        os.close(fd)
