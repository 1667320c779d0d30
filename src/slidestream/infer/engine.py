"""One inference engine: a predictor base class and loading a predictor by checkpoint kind.

:class:`Predictor` opens the slide once (closed after use), finds its tissue, lays the tile grid
and calls the adapter's :meth:`Predictor.score`; :func:`slidestream.infer.writer.write_outputs`
writes what the score holds (tile table CSV, heatmap NPY/PNG, GeoJSON, viewer page). The patch,
MIL and streamed predictors are small adapters (:mod:`~slidestream.infer.predict`,
:mod:`~slidestream.infer.mil`, :mod:`~slidestream.infer.saliency`); :func:`load_predictor` picks
one by the checkpoint's declared ``kind``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from slidestream.errors import ConfigError
from slidestream.io import Slide, open_slide
from slidestream.models.checkpoint import load_checkpoint
from slidestream.sampling import GridPatchSampler
from slidestream.tissue import TissueMask, detect_tissue

__all__ = [
    "KINDS",
    "Layout",
    "OutputNames",
    "Predictor",
    "Scores",
    "SlidePrediction",
    "TileTable",
    "cell_grid",
    "load_predictor",
]

log = logging.getLogger(__name__)

# checkpoint kind -> "module:class" of its predictor (imported when first used)
KINDS = {
    "patch": "slidestream.infer.predict:PatchPredictor",
    "mil": "slidestream.infer.mil:MILPredictor",
    "streaming": "slidestream.infer.saliency:StreamingPredictor",
}


@dataclass
class SlidePrediction:
    """Slide-level result: the call, class probabilities, how many tiles voted, how many tiles
    were left out because their pixels could not be decoded, and the outputs' file stem."""

    slide: str
    call: str
    probs: list[float]
    tiles: int
    damaged: int = 0
    stem: str = ""
    heatmap_class: str = ""  # the class whose probability the heatmap and GeoJSON show


@dataclass(frozen=True)
class OutputNames:
    """File suffixes after ``<stem>.``: tile table, heatmap (``.npy``/``.png``), GeoJSON."""

    table: str = "tiles.csv"
    heatmap: str = "heatmap"
    geojson: str = "geojson"


@dataclass
class Layout:
    """Where a slide is scored: tissue ``mask``; grid tiles ``xy`` (N, 2) int64 level-0 px of
    ``sampler`` with their tissue fractions (N,); ``data``: an adapter's own payload (MIL: the
    stored features)."""

    mask: TissueMask | None
    sampler: GridPatchSampler | None = None
    xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    tissue: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    data: Any = None


@dataclass
class TileTable:
    """Per-tile values: ``xy`` (N, 2) level-0 px, ``size0`` (w, h) level-0 px of a tile,
    ``columns`` name -> ((N,) values, format spec) for the CSV, and ``probs`` (N, K) with
    ``classes`` (K names) for the one-square-per-tile GeoJSON."""

    xy: np.ndarray
    size0: tuple[float, float]
    columns: dict[str, tuple[np.ndarray, str]]
    probs: np.ndarray
    classes: list[str]


@dataclass
class Scores:
    """What an adapter's :meth:`Predictor.score` returns for one slide.

    ``heat`` (rows, cols) float32 in [0, 1], NaN where nothing was predicted (None: nothing to
    write), cell (r, c)
    covering ``cell`` (w, h) level-0 px from the slide's origin; ``saved`` the array written as
    ``.npy`` (default ``heat``); ``label`` what ``heat`` shows (``p(tumour)``, ``attention``);
    ``name`` the GeoJSON classification; ``caption`` the viewer's title after ``<stem>: ``; ``positive``: the slide is called for what ``heat``
    shows (an empty GeoJSON is then worth a warning).
    """

    call: str
    probs: list[float]
    tiles: int
    heat: np.ndarray | None
    cell: tuple[float, float]
    label: str
    name: str
    caption: str
    heatmap_class: str
    positive: bool
    saved: np.ndarray | None = None
    table: TileTable | None = None
    damaged: int = 0
    color: str | None = None


def cell_grid(slide: Slide, sampler: GridPatchSampler, xy: np.ndarray, values: np.ndarray) -> Any:
    """Per-tile ``values`` (N,) or (N, C) placed on the sampler's full grid: (rows, cols) or
    (C, rows, cols) float32, NaN where no tile lies. ``xy``: (N, 2) level-0 px."""
    rows, cols = sampler.grid_shape(slide)
    step_x, step_y = (sampler.step * s / sampler.size for s in sampler.geometry(slide).size0)
    values = np.asarray(values, np.float32)
    grid = np.full((*values.shape[1:], rows, cols), np.nan, np.float32)
    r = np.minimum(np.rint(xy[:, 1] / step_y).astype(int), rows - 1)
    c = np.minimum(np.rint(xy[:, 0] / step_x).astype(int), cols - 1)
    grid[..., r, c] = values.T
    return grid


def sampler_cell(slide: Slide, sampler: GridPatchSampler) -> tuple[float, float]:
    """(w, h) level-0 px of one grid cell (the sampler's step)."""
    return tuple(sampler.step * s / sampler.size for s in sampler.geometry(slide).size0)


class Predictor(ABC):
    """A checkpoint ready to predict slides: the adapters implement :meth:`score`.

    ``checkpoint``: a file from ``train``, ``train-patches`` or ``train-mil``; ``state`` the
    dict already read from it (:func:`load_predictor` reads it once). Raises ConfigError when
    the checkpoint is of another kind than :attr:`kind`.
    """

    kind: ClassVar[str] = ""
    outputs: ClassVar[OutputNames] = OutputNames()

    def __init__(
        self, checkpoint: str | os.PathLike[str], *, state: dict[str, Any] | None = None
    ) -> None:
        self.checkpoint = Path(checkpoint)
        ckpt = state if state is not None else load_checkpoint(checkpoint)
        if ckpt.get("kind") != self.kind:
            raise ConfigError(
                f"{checkpoint} is a {ckpt.get('kind')!r} checkpoint, not a {self.kind} model; "
                f"load it with slidestream.infer.load_predictor (or slidestream predict)"
            )
        self.ckpt = ckpt
        self.classes: list[str] = list(ckpt["classes"]) or ["value"]

    def fit_weights(self, model: torch.nn.Module, what: str) -> torch.nn.Module:
        """Load the checkpoint's weights into ``model`` (``what`` names it in the error);
        ConfigError in one line when they do not fit."""
        try:
            model.load_state_dict(self.ckpt["state_dict"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:160]
            raise ConfigError(
                f"{self.checkpoint}: its weights do not fit {what} ({first}); was the file "
                f"edited or mixed up?"
            ) from exc
        return model

    def layout(self, slide: Slide, out: Path) -> Layout:
        """Tissue (cached in ``out/masks``) and the grid tiles over it of :meth:`sampler`."""
        mask = detect_tissue(slide, cache_dir=out / "masks")
        sampler = self.sampler()
        if sampler is None:
            return Layout(mask)
        locs = sampler.locations(slide, mask)
        return Layout(mask, sampler, locs[:, :2].astype(np.int64), locs[:, 2])

    def sampler(self) -> GridPatchSampler | None:
        """The tile grid this model reads (None: the slide is scored whole)."""
        return None

    @abstractmethod
    def score(self, slide: Slide, layout: Layout, target: str | None, **options: Any) -> Scores:
        """Score one open slide over ``layout``; ``target`` the class to map (None: default)."""

    def predict(
        self,
        path: str | os.PathLike[str],
        out_dir: str | os.PathLike[str],
        *,
        backend: str = "auto",
        slide_mpp: float | None = None,
        threshold: float = 0.5,
        geojson: str = "contours",
        target: str | None = None,
        stem: str | None = None,
        viewer_mpp: float | None = 0.5,
        viewer: bool = True,
        **options: Any,
    ) -> SlidePrediction:
        """Predict one slide and write ``<stem>.*`` outputs into ``out_dir`` (``stem``: the
        slide's file stem unless given): see :func:`~slidestream.infer.writer.write_outputs`
        (``viewer_mpp``: finest µm/px of the viewer's tile pyramid, None: the slide's level 0;
        ``viewer=False``: no viewer page). ``options`` go to :meth:`score` (patch model:
        ``aggregate_by``, ``topk``)."""
        from slidestream.infer.writer import write_outputs

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = stem or Path(path).stem
        with open_slide(path, backend=backend, mpp=slide_mpp) as slide:
            scores = self.score(slide, self.layout(slide, out), target, **options)
            if scores.heat is not None:
                write_outputs(
                    out,
                    stem,
                    slide,
                    scores,
                    self.outputs,
                    threshold,
                    geojson,
                    viewer_mpp=viewer_mpp if viewer else False,
                )
        return SlidePrediction(
            str(path),
            scores.call,
            scores.probs,
            scores.tiles,
            scores.damaged,
            stem,
            scores.heatmap_class,
        )

    def target_index(self, target: str | None) -> int:
        """Index of ``--class target``; None: the positive (second) class of two, else the
        last. Raises ConfigError for a class the model does not have."""
        if target is None:
            return 1 if len(self.classes) == 2 else len(self.classes) - 1
        if target not in self.classes:
            raise ConfigError(f"--class must be one of {self.classes}, got {target!r}")
        return self.classes.index(target)


def load_predictor(checkpoint: str | os.PathLike[str], **options: Any) -> Predictor:
    """The predictor of a checkpoint's declared kind (``patch``, ``mil``, ``streaming``),
    given the ``options`` its class accepts (others are ignored: ``device``, ``batch_size``,
    ``workers``, ``min_tissue``, ``features_dir``, ...). Raises ConfigError for an unreadable
    file, an unknown kind, or weights that do not fit the model the checkpoint names."""
    state = load_checkpoint(checkpoint)
    kind = state.get("kind")
    if kind not in KINDS:
        raise ConfigError(
            f"{checkpoint} is a {kind!r} checkpoint; predict reads {', '.join(KINDS)} ones"
        )
    module, name = KINDS[kind].split(":")
    cls = getattr(importlib.import_module(module), name)
    accepted = inspect.signature(cls).parameters
    kept = {k: v for k, v in options.items() if k in accepted}
    return cls(checkpoint, state=state, **kept)
