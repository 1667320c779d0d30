"""HDF5 patch databases: build them from a cohort, read them as a torch Dataset.

Layout of each file (one per split):

- ``images``: uint8 (N, H, W, 3), chunked one patch per chunk, gzip (level 6) or lzf;
- ``label`` (int64 class index, -1 = none), ``slide`` and ``patient`` (UTF-8 strings), ``x``,
  ``y`` (int64 level-0 px) and ``mpp`` (float32 µm/px), one row per patch;
- attributes: ``classes`` and ``class_counts`` (JSON; counts are of patches), ``params`` (JSON:
  creation parameters), ``seed``, ``split``, ``patch_size``, ``completed_slides`` (JSON list).

Building is resumable: rows are committed slide by slide, and a re-run truncates a half-written
slide and skips the completed ones.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from slidestream.errors import ConfigError, SlideStreamError

__all__ = ["PatchDatabase", "PatchDatabaseWriter", "FORMAT_VERSION"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_COLUMNS = {"label": np.int64, "x": np.int64, "y": np.int64, "mpp": np.float32}


@dataclass
class PatchDatabaseWriter:
    """Append patches of whole slides to one HDF5 file, resumably."""

    path: Path
    patch_size: int
    classes: list[str]
    split: str = ""
    compression: str = "gzip"
    level: int = 6
    params: dict[str, Any] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        import h5py

        if self.compression not in ("gzip", "lzf", "none"):
            raise ConfigError(f"compression must be gzip, lzf or none, got {self.compression!r}")
        self.path = Path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._h5 = h5py.File(self.path, "a")
        if "images" not in self._h5:
            self._create()
        elif (
            json.loads(self._h5.attrs["classes"]) != self.classes
            or int(self._h5.attrs["patch_size"]) != self.patch_size
        ):
            raise ConfigError(
                f"{self.path} was built with other classes or patch size; remove it "
                f"or choose another --out"
            )
        self._truncate(int(self._h5.attrs["n_committed"]))

    def _create(self) -> None:
        import h5py

        s = self.patch_size
        comp: dict[str, Any] = {}
        if self.compression == "gzip":
            comp = {"compression": "gzip", "compression_opts": self.level}
        elif self.compression == "lzf":
            comp = {"compression": "lzf"}
        self._h5.create_dataset(
            "images", (0, s, s, 3), np.uint8, maxshape=(None, s, s, 3), chunks=(1, s, s, 3), **comp
        )
        for name, dtype in _COLUMNS.items():
            self._h5.create_dataset(name, (0,), dtype, maxshape=(None,), chunks=(4096,))
        for name in ("slide", "patient"):
            self._h5.create_dataset(
                name, (0,), h5py.string_dtype(), maxshape=(None,), chunks=(4096,)
            )
        a = self._h5.attrs
        a["format_version"], a["patch_size"], a["split"] = (
            FORMAT_VERSION,
            self.patch_size,
            self.split,
        )
        a["classes"], a["seed"] = json.dumps(self.classes), self.seed
        a["params"] = json.dumps(self.params or {})
        a["n_committed"], a["completed_slides"] = 0, "[]"
        a["class_counts"] = json.dumps({c: 0 for c in self.classes})

    def _truncate(self, n: int) -> None:
        for name in ("images", "slide", "patient", *_COLUMNS):
            if self._h5[name].shape[0] != n:
                self._h5[name].resize(n, axis=0)

    @property
    def completed(self) -> set[str]:
        return set(json.loads(self._h5.attrs["completed_slides"]))

    def add_slide(
        self,
        slide_key: str,
        patient: str,
        patches: Iterator[tuple[np.ndarray, int, int, int, float]],
    ) -> int:
        """Append ``(pixels, label, x, y, mpp[, patient])`` patches of one slide (or block) and
        commit them; returns their count."""
        n0 = int(self._h5.attrs["n_committed"])
        n, labels, block = n0, Counter(), []
        for patch in patches:
            block.append(patch)
            labels[patch[1]] += 1
            if len(block) == 128:
                n = self._write(n, block, slide_key, patient)
        n = self._write(n, block, slide_key, patient)
        counts = json.loads(self._h5.attrs["class_counts"])
        for label, k in labels.items():
            if label >= 0:
                counts[self.classes[label]] += k
        a = self._h5.attrs
        a["class_counts"] = json.dumps(counts)
        a["completed_slides"] = json.dumps(sorted(self.completed | {slide_key}))
        a["n_committed"] = n  # the commit point: rows past it are dropped on resume
        self._h5.flush()
        return n - n0

    def _write(self, n: int, block: list[tuple[Any, ...]], slide_key: str, patient: str) -> int:
        if not block:
            return n
        m = n + len(block)
        for name in ("images", "slide", "patient", *_COLUMNS):
            self._h5[name].resize(m, axis=0)
        self._h5["images"][n:m] = np.stack([b[0] for b in block])
        self._h5["slide"][n:m] = [slide_key] * len(block)
        self._h5["patient"][n:m] = [b[5] if len(b) > 5 else patient for b in block]
        for j, name in enumerate(("label", "x", "y", "mpp"), start=1):
            self._h5[name][n:m] = [b[j] for b in block]
        block.clear()
        return m

    def close(self) -> None:
        self._h5.close()


class PatchDatabase(Dataset):
    """A patch database file as a map-style Dataset of dicts (``image`` is (3, H, W) uint8).

    The HDF5 handle is opened lazily in each process, so the dataset works in DataLoader workers.
    """

    def __init__(
        self, path: str | os.PathLike[str], transform: Callable[[torch.Tensor], Any] | None = None
    ) -> None:
        import h5py

        self.path, self.transform = Path(path), transform
        if not self.path.is_file():
            raise SlideStreamError(
                f"patch database not found: {self.path} (build it with slidestream patches)"
            )
        try:
            with h5py.File(self.path, "r") as h5:
                self.classes = json.loads(h5.attrs["classes"])
                self.class_counts = json.loads(h5.attrs["class_counts"])
                self.patch_size = int(h5.attrs["patch_size"])
                self.params = json.loads(h5.attrs["params"])
                self.labels = h5["label"][: int(h5.attrs["n_committed"])]
        except (OSError, KeyError) as exc:
            raise SlideStreamError(
                f"{self.path} is not a slidestream patch database: {exc}"
            ) from exc
        self._h5: Any = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def _file(self) -> Any:
        import h5py

        if self._h5 is None or self._pid != os.getpid():
            self._h5, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._h5

    def __getitem__(self, i: int) -> dict[str, Any]:
        h5 = self._file()
        image = torch.from_numpy(h5["images"][i]).permute(2, 0, 1).contiguous()
        if self.transform is not None:
            image = self.transform(image)
        return {
            "image": image,
            "label": int(self.labels[i]),
            "slide": h5["slide"][i].decode(),
            "x": int(h5["x"][i]),
            "y": int(h5["y"][i]),
            "mpp": float(h5["mpp"][i]),
        }

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_h5": None, "_pid": None}
