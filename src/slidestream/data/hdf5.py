"""HDF5 patch databases: build them from a cohort, read them as a torch Dataset.

Layout of each file (one per split):

- ``images``: uint8 (N, H, W, 3), chunked one patch per chunk, gzip (level 6) or lzf;
- ``label`` (int64 class index, -1 = none), ``slide`` and ``patient`` (UTF-8 strings), ``x``,
  ``y`` (int64 level-0 px) and ``mpp`` (float32 µm/px), one row per patch;
- attributes: ``classes`` and ``class_counts`` (JSON; counts are of patches), ``params`` (JSON:
  creation parameters), ``seed``, ``split``, ``patch_size``, ``completed_slides`` (JSON list).

  ``damaged_regions`` (JSON: slide -> regions left out because their pixels could not be read).

Building is resumable and crash-safe: slides are committed one by one as shards and consolidated
into the file by renaming (see :mod:`slidestream.data.hdf5_writer`); a re-run skips the completed
slides, and a database killed at any moment reopens or is rebuilt, never needs deleting by hand.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from slidestream.data.hdf5_merge import missing_sources
from slidestream.data.hdf5_writer import FORMAT_VERSION as FORMAT_VERSION
from slidestream.data.hdf5_writer import PatchDatabaseWriter as PatchDatabaseWriter
from slidestream.errors import SlideStreamError

__all__ = ["PatchDatabase", "PatchDatabaseWriter", "FORMAT_VERSION"]

log = logging.getLogger(__name__)


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
            parts = self.path.with_name(self.path.name + ".parts")
            hint = (
                "its build was interrupted; re-run the same slidestream patches to finish it"
                if parts.is_dir()
                else "build it with slidestream patches"
            )
            raise SlideStreamError(f"patch database not found: {self.path} ({hint})")
        try:
            with h5py.File(self.path, "r") as h5:
                self.classes = json.loads(h5.attrs["classes"])
                self.class_counts = json.loads(h5.attrs["class_counts"])
                self.patch_size = int(h5.attrs["patch_size"])
                self.params = json.loads(h5.attrs["params"])
                # slide -> patch regions left out because their pixels could not be decoded
                self.damaged_regions = json.loads(h5.attrs.get("damaged_regions", "{}"))
                self.labels = h5["label"][: int(h5.attrs["n_committed"])]
                gone = missing_sources(h5)
        except (OSError, KeyError) as exc:
            raise SlideStreamError(
                f"{self.path} is not a slidestream patch database: {exc}"
            ) from exc
        if gone:  # a merged database reads its patches from the shard files
            raise SlideStreamError(
                f"{self.path} is a merge of shard databases, and {', '.join(gone)} is gone "
                f"from its folder; put the shard files back or re-run the shards and the merge"
            )
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
