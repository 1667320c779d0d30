"""Whole-slide prediction with a patch classifier: grid tiles over tissue, read by DataLoader
workers while the model runs, written as tiles CSV, heatmap (NPY + PNG), GeoJSON and a call
(an adapter of :class:`~slidestream.infer.engine.Predictor`)."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from slidestream.colors import hex_color
from slidestream.data.functional import normalize, resolve_device
from slidestream.errors import ConfigError, SlideReadError
from slidestream.infer.engine import (
    Layout,
    Predictor,
    Scores,
    SlidePrediction,
    TileTable,
    cell_grid,
    sampler_cell,
)
from slidestream.io import Slide
from slidestream.models.classifiers import create_classifier
from slidestream.sampling import GridPatchSampler, PatchLocation

__all__ = ["PatchPredictor", "SlidePrediction", "aggregate"]

log = logging.getLogger(__name__)


class _Tiles(Dataset):
    """Grid tiles of one slide; each worker opens its own handle (Slide pickles lazily)."""

    def __init__(self, slide: Slide, sampler: GridPatchSampler, xy: np.ndarray) -> None:
        self.slide, self.sampler, self.xy = slide, sampler, xy

    def __len__(self) -> int:
        return len(self.xy)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        """The tile as (3, H, W) uint8, and False (with a white tile) if it cannot be decoded."""
        x, y = (int(v) for v in self.xy[i])
        try:
            pixels = self.sampler.read(self.slide, PatchLocation(x, y, 1.0))
        except SlideReadError as exc:
            log.info("%s: tile at (%d, %d) left out: %s", self.slide.path, x, y, exc)
            size = self.sampler.size
            return torch.full((3, size, size), 255, dtype=torch.uint8), False
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), True


def aggregate(probs: np.ndarray, method: str = "mean", topk: int = 10) -> np.ndarray:
    """Slide-level class probabilities (C,) from tile probabilities (N, C); NaN when N = 0.
    Raises ConfigError for a method other than mean, majority or topk."""
    if len(probs) == 0:
        return np.full(probs.shape[1], np.nan)
    if method == "mean":
        return probs.mean(0)
    if method == "majority":
        votes = np.bincount(probs.argmax(1), minlength=probs.shape[1])
        return votes / votes.sum()
    if method == "topk":  # "is there enough of class c anywhere": top-k tile mean per class
        k = max(1, min(topk, len(probs)))
        top = np.sort(probs, axis=0)[-k:].mean(0)
        if probs.shape[1] == 2:  # binary: the positive class decides, the negative is 1 - p
            return np.array([1.0 - top[1], top[1]])
        return top / top.sum()
    raise ConfigError(f"aggregate must be mean, majority or topk, got {method!r}")


def _stain_of(ckpt: dict[str, Any], stain: Any) -> Any:
    """The StainNormalize transform of ``stain`` (see :class:`PatchPredictor`), or None."""
    from slidestream.data.stain import StainTarget
    from slidestream.data.transforms import StainNormalize

    if isinstance(stain, str) and stain == "checkpoint":
        saved = ckpt.get("stain")
        return StainNormalize(StainTarget.from_dict(saved)) if saved else None
    return StainNormalize(stain.target) if stain is not None else None


class PatchPredictor(Predictor):
    """A patch-classifier checkpoint ready to predict slides (settings come from the checkpoint:
    classes, mpp, patch size, normalisation). Outputs per slide: ``<stem>.tiles.csv`` (x, y,
    w, h level-0 px, tissue_fraction, p_<class>), ``.heatmap.npy`` (C, rows, cols) float32,
    ``.heatmap.png``, ``.geojson``, ``.viewer.html``. Tiles whose pixels cannot be decoded are
    left out (NaN in the heatmap) and counted in ``damaged``.

    ``stain``: ``"checkpoint"`` (tiles stain-normalised to the training run's target when it
    had one), None (never), or a :class:`~slidestream.data.stain.StainNormalizer`.
    """

    kind = "patch"

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        *,
        state: dict[str, Any] | None = None,
        device: str = "auto",
        batch_size: int = 64,
        workers: int = 2,
        min_tissue: float = 0.25,
        stain: Any = "checkpoint",
    ) -> None:
        super().__init__(checkpoint, state=state)
        ckpt = self.ckpt
        self.mpp, self.size = ckpt.get("mpp"), int(ckpt["patch_size"])
        norm = ckpt.get("normalization") or {}
        self.mean, self.std = norm.get("mean"), norm.get("std")
        self.device = resolve_device(device)
        name = ckpt["model"]["name"]
        model = create_classifier(name, len(self.classes))
        what = f"{name} with {len(self.classes)} classes"
        self.model = self.fit_weights(model, what).to(self.device).eval()
        self.batch_size, self.workers, self.min_tissue = batch_size, workers, min_tissue
        self.stain = _stain_of(ckpt, stain)

    def sampler(self) -> GridPatchSampler:
        return GridPatchSampler(self.size, self.mpp, min_tissue=self.min_tissue, cover_edges=True)

    @torch.no_grad()
    def tile_probs(self, slide: Slide, sampler: GridPatchSampler, xy: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C) float32 of the tiles at ``xy`` (level-0 px); NaN rows for
        tiles whose pixels cannot be decoded."""
        loader = DataLoader(
            _Tiles(slide, sampler, xy),
            batch_size=self.batch_size,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )
        out = []
        kw = {k: v for k, v in (("mean", self.mean), ("std", self.std)) if v}
        for batch, ok in loader:
            probs = np.full((len(ok), len(self.classes)), np.nan, np.float32)
            if ok.any():
                tiles = self.stain(batch[ok]) if self.stain is not None else batch[ok]
                logits = self.model(normalize(tiles, device=self.device, **kw))
                probs[ok.numpy()] = torch.softmax(logits.float(), 1).cpu().numpy()
            out.append(probs)
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def score(
        self,
        slide: Slide,
        layout: Layout,
        target: str | None,
        aggregate_by: str = "mean",
        topk: int = 10,
        **_: Any,
    ) -> Scores:
        """Tile probabilities on the grid; the call from ``aggregate_by`` (see :func:`aggregate`)."""
        sampler = layout.sampler
        probs = self.tile_probs(slide, sampler, layout.xy)
        read = np.isfinite(probs).all(1)
        xy, tissue, probs = layout.xy[read], layout.tissue[read], probs[read]
        k = self.target_index(target)
        drawn = self.classes[k]
        grid = cell_grid(slide, sampler, xy, probs)
        slide_probs = aggregate(probs, aggregate_by, topk)
        call = self.classes[int(np.nanargmax(slide_probs))] if len(probs) else "no tissue"
        columns = {"tissue_fraction": (tissue, ".4f")}
        columns.update({f"p_{c}": (probs[:, i], ".5f") for i, c in enumerate(self.classes)})
        size0 = sampler.geometry(slide).size0
        return Scores(
            call=call,
            probs=[float(p) for p in slide_probs],
            tiles=len(probs),
            heat=grid[k],
            cell=sampler_cell(slide, sampler),
            label=f"p({drawn})",
            name=drawn,
            caption=f"p({drawn})",
            heatmap_class=drawn,
            positive=call == drawn,
            saved=grid,
            table=TileTable(xy, size0, columns, probs, self.classes),
            damaged=int((~read).sum()),
            color=hex_color(drawn),
        )

    def heatmap_class(self, target: str | None) -> str:
        """The class whose probability heatmaps and GeoJSON show for ``--class target``."""
        return self.classes[self.target_index(target)]

    def describe(self) -> dict[str, Any]:
        return {"classes": self.classes, "mpp": self.mpp, "patch_size": self.size}
