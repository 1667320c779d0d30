"""Slide prediction and attention heatmaps with a ``train-mil`` checkpoint.

:class:`MILPredictor` (an adapter of :class:`~slidestream.infer.engine.Predictor`) reads a
slide's feature file (``features_dir``, from ``slidestream features``) or computes the features
with the checkpoint's encoder settings (refusing when the encoder's weights differ from the ones
the training features came from), runs the MIL model and writes, per slide:
``<stem>.attention.csv`` (x, y, w, h in level-0 px, attention, relative attention),
``<stem>.attention.npy`` (rows, cols) and ``.attention.png`` (relative attention = attention /
its maximum, on the patch grid, NaN outside tissue), ``<stem>.attention.geojson`` (the union of
the cells whose relative attention >= threshold, or one square per patch with
``geojson="tiles"``) and ``<stem>.viewer.html``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidestream.data.feature_folder import FeatureFolder, check_settings, settings_of
from slidestream.data.features import read_features
from slidestream.data.functional import resolve_device
from slidestream.errors import ConfigError
from slidestream.infer.engine import (
    Layout,
    OutputNames,
    Predictor,
    Scores,
    TileTable,
    cell_grid,
    sampler_cell,
)
from slidestream.io import Slide
from slidestream.models.mil import MILModel, MILSpec
from slidestream.models.slide import predictions
from slidestream.sampling import GridPatchSampler

__all__ = ["MILPredictor"]

log = logging.getLogger(__name__)


class MILPredictor(Predictor):
    """A MIL checkpoint ready to predict slides and map its attention onto them."""

    kind = "mil"
    outputs = OutputNames(table="attention.csv", heatmap="attention", geojson="attention.geojson")

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        *,
        state: dict[str, Any] | None = None,
        features_dir: str | os.PathLike[str] | None = None,
        device: str = "auto",
        batch_size: int = 64,
        workers: int = 2,
    ) -> None:
        super().__init__(checkpoint, state=state)
        try:
            self.spec = MILSpec(**self.ckpt["model"])
        except TypeError as exc:
            raise ConfigError(f"{checkpoint}: unknown MIL model settings ({exc})") from exc
        model = MILModel(self.spec)
        what = f"the {self.spec.aggregator} MIL model it names"
        self.device = resolve_device(device)
        self.model = self.fit_weights(model, what).eval().to(self.device)
        self.feat: dict[str, Any] = dict(self.ckpt.get("features") or {})
        if "size" not in self.feat:
            raise ConfigError(f"{checkpoint} records no feature settings; retrain with train-mil")
        self.features_dir = Path(features_dir) if features_dir else None
        self.batch_size, self.workers = batch_size, workers
        self._extractor: Any = None
        self._folder: FeatureFolder | None = None

    def sampler(self) -> GridPatchSampler:
        f = self.feat
        return GridPatchSampler(
            int(f["size"]), f.get("mpp") or None, min_tissue=float(f.get("min_tissue", 0.5))
        )

    def layout(self, slide: Slide, out: Path) -> Layout:
        """The stored feature file's patches when ``features_dir`` holds one (no tissue
        detection needed), else the tissue grid whose features :meth:`score` computes."""
        stored = None
        if self.features_dir is not None:
            if self._folder is None:
                self._folder = FeatureFolder(self.features_dir)
            stored, _ = self._folder.find(slide.path)
        if stored is None:
            return super().layout(slide, out)
        feats, xy, attrs = read_features(stored)
        check_settings(
            [stored],
            [settings_of(attrs, feats.shape[1] if len(feats) else None)],
            settings_of(self.feat, self.spec.in_dim),
            against="features the model was trained on",
        )
        xy = np.asarray(xy, np.int64)
        return Layout(None, self.sampler(), xy, np.ones(len(xy), np.float32), feats)

    def _encoder(self, backend: str) -> Any:
        from slidestream.infer.features import FeatureExtractor

        f = self.feat
        if self._extractor is None:
            weights = None if f.get("weights") in (None, "none") else f["weights"]
            self._extractor = FeatureExtractor(
                f["encoder"],
                weights=weights,
                mpp=f.get("mpp") or None,
                size=int(f["size"]),
                min_tissue=float(f.get("min_tissue", 0.5)),
                batch_size=self.batch_size,
                workers=self.workers,
                device=str(self.device),
                backend=backend,
            )
            mine, theirs = self._extractor.attrs["weights_hash"], f.get("weights_hash")
            if theirs and mine != theirs:
                raise ConfigError(
                    f"the encoder {f['encoder']} here has weights {mine}, the training features "
                    f"{theirs}; pass --features DIR with the slides' feature files"
                )
        return self._extractor

    @torch.no_grad()
    def score(self, slide: Slide, layout: Layout, target: str | None, **_: Any) -> Scores:
        """Attention of every patch and the slide's prediction (``target`` is not used: the
        heatmap is the attention)."""
        feats = layout.data
        if feats is None:
            feats = self._encoder("auto").encode(slide, layout.xy)
        feats = np.asarray(feats, np.float32)
        if len(feats) == 0:
            nan = [float("nan")] * len(self.classes)
            empty = dict(heat=None, cell=(1.0, 1.0), label="", name="", caption="")
            return Scores("no tissue", nan, 0, heatmap_class="attention", positive=False, **empty)
        logits, att = self.model.forward_attention(torch.from_numpy(feats).to(self.device))
        probs = predictions(self.spec.task, logits).cpu().numpy()[0]
        att = att.cpu().numpy()
        rel = att / max(float(att.max()), 1e-12)
        sampler = layout.sampler
        columns = {"attention": (att, ".6g"), "relative_attention": (rel, ".5f")}
        table = TileTable(
            layout.xy, sampler.geometry(slide).size0, columns, rel[:, None], ["attention"]
        )
        call = self._call(probs)
        return Scores(
            call=call,
            probs=[float(p) for p in probs],
            tiles=len(feats),
            heat=cell_grid(slide, sampler, layout.xy, rel),
            cell=sampler_cell(slide, sampler),
            label="attention / max",
            name="attention",
            caption="MIL attention",
            heatmap_class="attention",
            positive=call not in ("", self.classes[0]),
            table=table,
        )

    def _call(self, probs: np.ndarray) -> str:
        if self.spec.task == "regression":
            return f"{probs[0]:.4g}"
        if self.spec.task == "multilabel":
            return ";".join(c for c, p in zip(self.classes, probs, strict=True) if p >= 0.5)
        return self.classes[int(np.argmax(probs))]
