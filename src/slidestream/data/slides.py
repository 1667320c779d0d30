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
from torch.utils.data import Dataset

from slidestream.errors import ConfigError, SlideStreamError
from slidestream.io import open_slide
from slidestream.sampling import Cohort

__all__ = ["SlideImageDataset", "crop_or_pad"]

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

    def load(self, path: Path) -> torch.Tensor:
        """The whole slide at level 0 as (3, H, W) uint8, background outside tissue white."""
        with open_slide(path) as slide:
            w, h = slide.dimensions
            pixels = slide.read(0, 0, w, h)
        if self.clean_background:
            mask_path = path.with_name(f"{path.stem}.tissue.png")
            if mask_path.exists():
                with Image.open(mask_path) as m:
                    mask = np.asarray(m.convert("L").resize((w, h), Image.Resampling.NEAREST)) > 0
                pixels = np.where(mask[..., None], pixels, np.uint8(255))
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self.cohort.slides[i]
        try:
            image = self.load(entry.path)
        except SlideStreamError as exc:
            raise SlideStreamError(f"{entry.path}: {exc}") from exc
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        if self.image_size is not None:
            image = crop_or_pad(image, self.image_size, rng)
        if self.train and self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(rng.integers(2**63)))
                image = self.transform(image)
        return {
            "image": image,
            "target": self.target(entry.label),
            "slide": str(entry.path),
            "index": i,
        }
