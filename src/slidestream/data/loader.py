"""``PatchLoader``: the DataLoader for a PatchStream, with cheaper batches between processes.

A ``torch.utils.data.DataLoader`` worker hands every batch to the main process in a new
shared-memory segment: torch allocates and zero-fills it, the worker page-faults it in while
stacking the patches, and the segment is thrown away once the batch is used. For 64 patches of
256² that is ~9 ms of kernel time per batch, about as much as augmenting them. Each numeric field
(label, x, y, mpp, tissue fraction) also travels as a shared-memory segment of its own.

``PatchLoader`` keeps the DataLoader machinery and its guarantees and changes two things:

- the numeric fields of a batch are views of one small tensor (one transfer instead of five);
- each worker stacks images into a few shared-memory buffers of its own, and reuses a buffer only
  after the main process has let go of every tensor and view of the batch that used it (checked
  with a weak reference to the storage at each ``next()``). A batch the caller keeps is never
  written again: when no buffer is free the worker takes a new segment, as DataLoader does.

Batches have the keys, shapes and dtypes of ``default_collate``. Workers run one torch thread each.
"""

from __future__ import annotations

import multiprocessing as mp
import secrets
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, default_collate, default_convert, get_worker_info

from slidestream.errors import ConfigError

__all__ = ["OneThread", "PatchCollate", "PatchLoader"]

_FREE, _BUSY = 0, 1
_SLOT = "_slidestream_slot"  # batch key from worker to main process, removed before the caller
_INTS, _FLOATS = ("label", "x", "y"), ("mpp", "tissue_fraction")
_HELD: weakref.WeakValueDictionary[str, _Held] = weakref.WeakValueDictionary()


class _Ticket:
    """A batch's buffer slot. Unpickled in the main process, it registers the batch image with
    that iterator's :class:`_Held` at once, so that batches the DataLoader receives and discards
    itself (drained at a reset, parked out of order) free their slot too."""

    def __init__(self, token: str, slot: int, image: torch.Tensor) -> None:
        self.token, self.slot, self.image = token, slot, image

    def __reduce__(self) -> tuple[Any, ...]:
        return _claim, (self.token, self.slot, self.image)


def _claim(token: str, slot: int, image: torch.Tensor) -> int:
    held = _HELD.get(token)
    if held is not None:
        held.add(slot, image)
    return slot


class PatchCollate:
    """``default_collate`` for PatchStream items, with the numeric fields packed into one tensor
    and, under a :class:`PatchLoader`, images written into reused shared-memory buffers."""

    def __init__(self) -> None:
        self.flags: Any = None  # one byte per buffer slot, shared with the main process
        self.slots = 0  # buffer slots per worker
        self.token = ""  # names the main process's _Held of these flags
        self._buffers: dict[int, torch.Tensor] = {}  # this worker's buffers by slot

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_buffers": {}}

    def __call__(self, items: list[Any]) -> Any:
        if not isinstance(items, list):  # batch_size=None: one item, as DataLoader converts it
            return default_convert(items)
        if not items or not isinstance(items[0], Mapping):
            return default_collate(items)
        first, n = items[0], len(items)
        # the fields default_collate would make int64 and float64 tensors of
        columns = {k: [it.get(k) for it in items] for k in (*_INTS, *_FLOATS)}
        ints = [k for k in _INTS if all(type(v) is int for v in columns[k])]
        floats = [k for k in _FLOATS if all(type(v) is float for v in columns[k])]
        out: dict[str, Any] = {}
        if ints or floats:
            packed = torch.empty((len(ints) + len(floats), n), dtype=torch.int64)
            as_float = packed[len(ints) :].view(torch.float64)
            if ints:
                packed[: len(ints)] = torch.tensor([columns[k] for k in ints], dtype=torch.int64)
            if floats:
                as_float[:] = torch.tensor([columns[k] for k in floats], dtype=torch.float64)
            out.update(zip(ints, packed[: len(ints)], strict=True))
            out.update(zip(floats, as_float, strict=True))
        image = first.get("image")
        if type(image) is torch.Tensor:  # tv_tensors and others: default_collate
            images = [it["image"] for it in items]
            slot = self._slot((n, *image.shape), image.dtype, images)
            if slot is not None:
                out["image"] = torch.stack(images, 0, out=self._buffers[slot])
                out[_SLOT] = _Ticket(self.token, slot, out["image"])
                self.flags[slot] = _BUSY
        batch = {k: out[k] if k in out else default_collate([it[k] for it in items]) for k in first}
        if _SLOT in out:
            batch[_SLOT] = out[_SLOT]
        return batch

    def _slot(self, shape: tuple[int, ...], dtype: torch.dtype, images: list) -> int | None:
        """A free buffer slot of this worker, its buffer made to fit; or None."""
        info = get_worker_info()
        if self.flags is None or info is None:
            return None
        if any(im.shape != images[0].shape or im.dtype != dtype for im in images):
            return None  # default_collate raises its own clear error
        for slot in range(info.id * self.slots, (info.id + 1) * self.slots):
            if self.flags[slot] == _FREE:
                buf = self._buffers.get(slot)
                if buf is None or buf.shape != shape or buf.dtype != dtype:
                    self._buffers[slot] = torch.empty(shape, dtype=dtype).share_memory_()
                return slot
        return None


class PatchLoader(DataLoader):
    """``DataLoader(stream, batch_size, num_workers=...)`` for a PatchStream (or any dataset of
    dict items), with :class:`PatchCollate` and one torch thread per worker.

    ``recycle=False`` turns the buffer reuse off (each batch gets a new segment, as with a plain
    DataLoader). Reuse keeps ``prefetch_factor + 3`` batch buffers per worker in shared memory
    (``/dev/shm``): 63 MB per worker for batches of 64 patches of 256². It tracks references in
    the main process only: to hand batch images on to other processes, use ``recycle=False``.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 64,
        *,
        num_workers: int = 2,
        recycle: bool = True,
        worker_init_fn: Callable[[int], None] | None = None,
        **kwargs: Any,
    ) -> None:
        if "collate_fn" in kwargs:
            raise ConfigError(
                "PatchLoader brings its own collate_fn; for another one use "
                "torch.utils.data.DataLoader(stream, ..., collate_fn=...)"
            )
        super().__init__(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=PatchCollate() if batch_size is not None else default_convert,
            worker_init_fn=OneThread(worker_init_fn),
            **kwargs,
        )
        self.recycle = recycle and num_workers > 0 and batch_size is not None
        self._held: _Held | None = None

    def __iter__(self) -> Iterator[Any]:
        collate: PatchCollate = self.collate_fn  # type: ignore[assignment]
        if self.recycle and (self._held is None or not self.persistent_workers):
            # new workers, new flags: the workers of another iterator keep theirs
            ctx = self.multiprocessing_context or mp.get_context()
            collate.slots = (self.prefetch_factor or 2) + 3
            collate.flags = ctx.RawArray("b", self.num_workers * collate.slots)
            collate.token = secrets.token_hex(8)
            self._held = _HELD[collate.token] = _Held(collate.flags)
        return _RecyclingIterator(super().__iter__(), self._held if self.recycle else None)


class _Held:
    """Main-process side of the buffer slots: which batches the caller may still hold."""

    def __init__(self, flags: Any) -> None:
        self.flags, self.batches, self.released = flags, [], 0
        self.lock = threading.Lock()  # batches arrive in the pin-memory thread with pin_memory

    def add(self, slot: int, image: torch.Tensor) -> None:
        with self.lock:
            self.batches.append((slot, StorageWeakRef(image.untyped_storage())))

    def release(self) -> None:
        """Free the slots of batches whose image storage is gone (no tensor or view left)."""
        with self.lock:
            kept = []
            for slot, ref in self.batches:
                if ref.expired():
                    self.flags[slot] = _FREE
                    self.released += 1
                else:
                    kept.append((slot, ref))
            self.batches = kept


class _RecyclingIterator:
    """The DataLoader iterator, minus the slot key of each batch, whose slot it tracks."""

    def __init__(self, it: Iterator[Any], held: _Held | None) -> None:
        self._it, self._held = it, held

    def __iter__(self) -> _RecyclingIterator:
        return self

    def __next__(self) -> Any:
        if self._held is not None:
            self._held.release()
        batch = next(self._it)
        if isinstance(batch, dict):
            batch.pop(_SLOT, None)  # registered with _Held when it was unpickled
        return batch

    def __len__(self) -> int:
        return len(self._it)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "_it":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self._it, name)


class OneThread:
    """Worker init: one torch thread per worker (two threads on two busy cores made a step ~15x
    slower here), then the caller's ``worker_init_fn``."""

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        torch.set_num_threads(1)
        if self.then is not None:
            self.then(worker_id)
