"""Whole prepared slides as tensors, for streamed slide-level training.

Each item is one whole image (from ``slidestream prepare``) as a (3, H, W) uint8 tensor, with
pixels outside the tissue mask set to pure white so the streaming engine can skip background
tiles. Training items are randomly cropped or padded (white) to ``image_size``; validation items
are centred. Augmentation draws once and applies the same draw to the whole image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from slidestream.data.functional import to_chw
from slidestream.errors import ConfigError, SlideStreamError
from slidestream.io import open_slide
from slidestream.sampling import Cohort

__all__ = ["SlideImageDataset", "SlideSampler", "crop_or_pad", "finish_image"]

log = logging.getLogger(__name__)


def crop_or_pad(
    image: torch.Tensor, size: tuple[int, int], rng: np.random.Generator | None, fill: int = 255
) -> torch.Tensor:
    """Crop or pad (with ``fill``) a (C, H, W) image to ``size`` = (h, w); random offsets with
    ``rng``, centred without."""
    c, h, w = image.shape
    th, tw = size
    out = torch.full((c, th, tw), fill, dtype=image.dtype)

    def offsets(n: int, t: int) -> tuple[int, int]:
        slack = abs(n - t)
        o = int(rng.integers(slack + 1)) if rng is not None else slack // 2
        return (o, 0) if n > t else (0, o)  # (source offset, target offset)

    (sy, ty), (sx, tx) = offsets(h, th), offsets(w, tw)
    ch, cw = min(h, th), min(w, tw)
    out[:, ty : ty + ch, tx : tx + cw] = image[:, sy : sy + ch, sx : sx + cw]
    return out


class SlideImageDataset(Dataset):
    """Prepared slides of a cohort as whole-image tensors with their labels.

    ``labels`` maps a slide's label to the training target: class index (binary/multiclass),
    multi-hot vector (multilabel, ``;``-separated) or float (regression). ``image_size`` (h, w)
    crops/pads every image; None keeps each slide's own shape (the streaming engine takes any
    size exactly). Slides that fail to load raise :class:`SlideStreamError` naming the file.
    """

    def __init__(
        self,
        cohort: Cohort,
        task: str,
        classes: list[str],
        *,
        image_size: tuple[int, int] | None = None,
        train: bool = False,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        seed: int = 0,
        clean_background: bool = True,
        labelled: bool = True,
    ) -> None:
        if task not in ("binary", "multiclass", "multilabel", "regression"):
            raise ConfigError(
                f"task must be binary, multiclass, multilabel or regression, got {task!r}"
            )
        self.cohort, self.task, self.classes = cohort, task, classes
        self.image_size, self.train, self.transform = image_size, train, transform
        self.seed, self.epoch, self.clean_background = seed, 0, clean_background
        self.labelled = labelled
        self.finish_in_worker = True
        for entry in cohort:
            try:  # reject bad labels up front, naming the row
                self.target(entry.label)
            except ConfigError as exc:
                where = f"line {entry.line}" if entry.line else entry.path.name
                raise ConfigError(f"{cohort.source} {where}: {exc}") from None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cohort)

    def target(self, label: str | None) -> torch.Tensor:
        """The training target of a label string."""
        if label is None or label == "":
            if not self.labelled:
                return torch.tensor(float("nan"))
            raise ConfigError("no label; every training slide needs one")
        if self.task == "regression":
            try:
                return torch.tensor(float(label), dtype=torch.float32)
            except ValueError:
                raise ConfigError(f"regression needs numeric labels, got {label!r}") from None
        if self.task == "multilabel":
            names = [p.strip() for p in label.split(";") if p.strip()]
            bad = [n for n in names if n not in self.classes]
            if bad:
                raise ConfigError(f"labels {bad} are not among the classes {self.classes}")
            vec = torch.zeros(len(self.classes))
            vec[[self.classes.index(n) for n in names]] = 1
            return vec
        if label not in self.classes:
            raise ConfigError(f"label {label!r} is not one of the classes {self.classes}")
        return torch.tensor(self.classes.index(label))

    def window(
        self, dims: tuple[int, int], rng: np.random.Generator | None
    ) -> tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int]]:
        """The read window of a slide of ``dims`` (w, h): ((x, y, w, h) in slide px, where it
        lands in the output (x, y), and the output size (h, w)); random offsets with ``rng``."""
        w, h = dims
        th, tw = self.image_size if self.image_size is not None else (h, w)

        def offsets(n: int, t: int) -> tuple[int, int]:
            slack = abs(n - t)
            o = int(rng.integers(slack + 1)) if rng is not None else slack // 2
            return (o, 0) if n > t else (0, o)  # (source offset, target offset)

        (sy, ty), (sx, tx) = offsets(h, th), offsets(w, tw)
        return (sx, sy, min(w, tw), min(h, th)), (tx, ty), (th, tw)

    def read(self, path: Path, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        """Read only the window this item uses: ``image`` (3, h, w) uint8, white outside the
        slide, and with a tissue mask beside the slide ``tissue`` (mh, mw) bool with index maps
        ``tissue_rows`` (h,) / ``tissue_cols`` (w,) int64 giving each output pixel's mask cell
        (nearest neighbour; see :func:`finish_image`)."""
        with open_slide(path) as slide:
            dims = slide.dimensions
            (sx, sy, cw, ch), (tx, ty), (th, tw) = self.window(dims, rng)
            pixels = slide.read(sx, sy, cw, ch)
        image = torch.full((3, th, tw), 255, dtype=torch.uint8)
        image[:, ty : ty + ch, tx : tx + cw] = torch.from_numpy(to_chw(pixels))
        out = {"image": image}
        mask_path = path.with_name(f"{path.stem}.tissue.png")
        if self.clean_background and mask_path.exists():
            with Image.open(mask_path) as m:
                mask = np.asarray(m.convert("L")) > 0
            out["tissue"] = torch.from_numpy(mask)
            out["tissue_rows"] = _cells(sy, ch, ty, th, dims[1], mask.shape[0])
            out["tissue_cols"] = _cells(sx, cw, tx, tw, dims[0], mask.shape[1])
        return out

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``key`` = index, or (index, epoch) as :class:`~slidestream.data.slides.SlideSampler`
        yields (persistent workers never see ``set_epoch``). Keys: ``image``, ``target``,
        ``slide``, ``index``, ``seed`` (the augmentation draw, -1 for none), the tissue fields of
        :meth:`read` unless ``finish_in_worker``; ``error`` (str) instead of ``image`` when the
        slide cannot be read."""
        i, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        entry = self.cohort.slides[i]
        rng = np.random.default_rng([self.seed, epoch, i]) if self.train else None
        meta = {"target": self.target(entry.label), "slide": str(entry.path), "index": i}
        try:
            item = self.read(entry.path, rng)
        except SlideStreamError as exc:
            return {**meta, "error": f"{entry.path}: {' '.join(str(exc).split())}"}
        augment = self.train and self.transform is not None
        item.update(meta, seed=int(rng.integers(2**62)) if augment else -1)
        if self.finish_in_worker:
            item["image"] = finish_image(item, self.transform)
            for k in ("tissue", "tissue_rows", "tissue_cols"):
                item.pop(k, None)
            item["seed"] = -1
        return item


def _cells(src: int, n: int, dst: int, total: int, size: int, cells: int) -> torch.Tensor:
    """Mask cell of each of ``total`` output px whose ``[dst, dst + n)`` show slide px
    ``[src, src + n)`` of a slide ``size`` px long covered by ``cells`` mask cells (padding
    maps to cell 0: it is white already)."""
    out = torch.zeros(total, dtype=torch.int64)
    centres = (np.arange(src, src + n) + 0.5) * (cells / size)
    out[dst : dst + n] = torch.from_numpy(np.minimum(centres.astype(np.int64), cells - 1))
    return out


def finish_image(
    item: dict[str, Any],
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """An item's image on ``device``, pixels outside the tissue painted white (the mask is
    expanded there, on the device), then ``transform`` with the item's seeded draw.

    The draw comes from the CPU generator seeded with ``item["seed"]`` (a fork of it: the
    global stream is untouched), so the same item gets the same augmentation on any device.
    Returns (3, h, w) uint8.
    """
    image = item["image"].to(device, non_blocking=True) if device is not None else item["image"]
    if "tissue" in item:
        dev = image.device
        tissue = item["tissue"].to(dev, non_blocking=True)
        rows = item["tissue_rows"].to(dev, non_blocking=True)
        cols = item["tissue_cols"].to(dev, non_blocking=True)
        inside = tissue[rows][:, cols]
        image = torch.where(inside, image, torch.tensor(255, dtype=image.dtype, device=dev))
    seed = int(item.get("seed", -1))
    if transform is not None and seed >= 0:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            image = transform(image)
    return image


class SlideSampler(Sampler):
    """The image order of streamed slide training, for one DDP rank, with epoch-seeded keys.

    Each epoch is ``passes`` shuffled passes over the ``n`` images (or, with ``labels``, draws
    inversely proportional to class frequency), seeded by ``(seed, epoch)`` and identical on
    every rank. It is cut into optimizer steps of ``accumulate`` images; rank ``r`` of
    ``world`` takes images ``r, r + world, …`` of each step, so the ranks together see exactly
    the images one process would. Yields ``(index, epoch)`` keys for
    :class:`SlideImageDataset` (persistent DataLoader workers get the epoch with the key).
    """

    def __init__(
        self,
        n: int,
        *,
        accumulate: int = 1,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        passes: int = 1,
        labels: list[int] | None = None,
    ) -> None:
        if accumulate % world:
            raise ConfigError(
                f"accumulate ({accumulate}) must be a multiple of the number of processes "
                f"({world}) to keep the effective batch"
            )
        self.n, self.accumulate, self.rank, self.world = n, accumulate, rank, world
        self.seed, self.passes, self.labels, self.epoch = seed, passes, labels, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> np.ndarray:
        """Every rank's images of ``epoch``, in step order (seeded)."""
        rng = np.random.default_rng([self.seed, epoch])
        total = self.n * self.passes
        if self.labels is not None:
            labels = np.asarray(self.labels)
            w = 1.0 / np.bincount(labels)[labels]
            return rng.choice(self.n, total, p=w / w.sum())
        return np.concatenate([rng.permutation(self.n) for _ in range(self.passes)])

    def steps(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's image indices of each optimizer step of ``epoch`` (default: current)."""
        order = self.order(self.epoch if epoch is None else epoch)
        acc, count = self.accumulate, len(order) // self.accumulate or 1
        per_rank = acc // self.world
        return [
            [int(i) for i in order[s * acc : (s + 1) * acc][self.rank :: self.world][:per_rank]]
            for s in range(count)
        ]

    def __iter__(self):  # noqa: ANN204
        epoch = self.epoch
        for step in self.steps(epoch):
            for i in step:
                yield (i, epoch)

    def __len__(self) -> int:
        return sum(len(s) for s in self.steps())
