"""Loader throughput monitoring: patches/s, time the training loop waits for data, slides opened."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["LoaderMonitor"]


class LoaderMonitor:
    """Wrap a DataLoader (or any iterable of batches) and measure it while it is consumed.

    ``stats()`` returns a flat dict ready for TensorBoard or W&B: ``patches_per_s``,
    ``data_wait_fraction`` (share of wall time spent waiting in ``next()``), ``batches``,
    ``patches``, ``time_to_first_batch_s`` and, when ``stream`` (a PatchStream) is given, its
    ``slides_opened``/``slide_failures``/``slides_dropped``. With ``progress=True`` a tqdm bar
    shows the running figures.
    """

    def __init__(
        self,
        loader: Iterable[Any],
        stream: Any = None,
        *,
        progress: bool = False,
        total: int | None = None,
        desc: str = "patches",
    ) -> None:
        self.loader, self.stream = loader, stream
        self.progress, self.total, self.desc = progress, total, desc
        self.reset()

    def reset(self) -> None:
        self.batches = self.patches = 0
        self.wait_s = 0.0
        self.start: float | None = None
        self.first_batch_s: float | None = None

    def __iter__(self) -> Iterator[Any]:
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total, desc=self.desc, unit="batch")
        self.start = self.start or time.perf_counter()
        it = iter(self.loader)
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                t1 = time.perf_counter()
                self.wait_s += t1 - t0
                if self.first_batch_s is None:
                    self.first_batch_s = t1 - self.start
                self.batches += 1
                self.patches += _batch_size(batch)
                if bar is not None:
                    bar.update(1)
                    if self.batches % 10 == 0:
                        s = self.stats()
                        bar.set_postfix(
                            pps=f"{s['patches_per_s']:.0f}",
                            wait=f"{100 * s['data_wait_fraction']:.0f}%",
                        )
                yield batch
        finally:
            if bar is not None:
                bar.close()

    def stats(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start if self.start else 0.0
        out = {
            "patches_per_s": self.patches / elapsed if elapsed else 0.0,
            "data_wait_fraction": self.wait_s / elapsed if elapsed else 0.0,
            "batches": float(self.batches),
            "patches": float(self.patches),
            "time_to_first_batch_s": self.first_batch_s or 0.0,
        }
        if self.stream is not None and hasattr(self.stream, "stats"):
            out.update({k: float(v) for k, v in self.stream.stats().items() if k != "patches"})
        return out


def _batch_size(batch: Any) -> int:
    image = batch.get("image") if isinstance(batch, dict) else batch
    if isinstance(image, (list, tuple)):
        image = image[0]
    shape = getattr(image, "shape", None)
    return int(shape[0]) if shape else 1
