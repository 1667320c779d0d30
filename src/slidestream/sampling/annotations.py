"""Patches inside annotated polygons (GeoJSON, e.g. a QuPath export), labelled by class.

GeoJSON coordinates are level-0 pixels (QuPath's convention). A feature's class is read from
``properties.classification.name`` (QuPath), else ``properties.class``, ``label`` or ``name``.
Polygons and MultiPolygons are supported, holes included.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidestream.errors import ConfigError
from slidestream.io.base import Slide
from slidestream.sampling.base import PatchLocation, PatchSampler, tissue_centres
from slidestream.tissue.mask import TissueMask

__all__ = ["Annotations", "AnnotationSampler", "load_annotations"]

log = logging.getLogger(__name__)

Polygon = list[np.ndarray]  # exterior ring then holes, each (N, 2) of level-0 x, y


@dataclass(frozen=True)
class Annotations:
    """Polygons per class name."""

    polygons: dict[str, list[Polygon]]
    source: str = ""

    @property
    def classes(self) -> list[str]:
        return sorted(self.polygons)

    def rasterize(self, name: str, like: TissueMask) -> TissueMask:
        """The polygons of class ``name`` drawn on a mask of the same geometry as ``like``."""
        from skimage.draw import polygon as draw_polygon

        h, w = like.shape
        dx, dy = like.downsample
        out = np.zeros((h, w), bool)
        for rings in self.polygons.get(name, []):
            for k, ring in enumerate(rings):
                rr, cc = draw_polygon(ring[:, 1] / dy - 0.5, ring[:, 0] / dx - 0.5, (h, w))
                out[rr, cc] = k == 0  # exterior fills, holes clear
        return TissueMask(out, like.slide_dimensions, like.mpp, f"annotation:{name}")


def load_annotations(path: str | os.PathLike[str]) -> Annotations:
    """Read polygons per class from a GeoJSON FeatureCollection, Feature list or Feature."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read annotations {path}: {exc}") from exc
    features = data.get("features", [data]) if isinstance(data, dict) else data
    polygons: dict[str, list[Polygon]] = {}
    for i, feature in enumerate(features):
        geometry = (feature or {}).get("geometry") or {}
        name = _class_name(feature.get("properties") or {})
        kind, coords = geometry.get("type"), geometry.get("coordinates")
        try:
            if kind == "Polygon":
                polys = [coords]
            elif kind == "MultiPolygon":
                polys = coords
            else:
                continue
            for poly in polys:
                polygons.setdefault(name, []).append([np.asarray(r, float)[:, :2] for r in poly])
        except (TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"{path}: feature {i} has malformed coordinates ({exc})") from exc
    if not polygons:
        log.warning("%s: no Polygon or MultiPolygon features", path)
    return Annotations(polygons, str(path))


def _class_name(props: dict[str, Any]) -> str:
    cls = props.get("classification")
    if isinstance(cls, dict) and cls.get("name"):
        return str(cls["name"])
    for key in ("class", "label", "name"):
        if props.get(key):
            return str(props[key])
    return "unclassified"


@dataclass(frozen=True)
class AnnotationSampler(PatchSampler):
    """Random patches centred inside annotated polygons, labelled with the polygon's class.

    Classes are drawn with equal probability (``balanced=True``) or in proportion to their area.
    A patch is kept when at least ``min_overlap`` of it lies inside its class and at least
    ``min_tissue`` of it is tissue. ``classes`` restricts sampling to the named classes.
    """

    min_overlap: float = 0.5
    balanced: bool = True
    classes: tuple[str, ...] | None = None
    batch: int = 32
    max_tries: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.min_overlap <= 1.0:
            raise ConfigError(f"min_overlap must be in [0, 1], got {self.min_overlap}")

    def iter_locations(
        self,
        slide: Slide,
        mask: TissueMask,
        rng: np.random.Generator,
        annotations: object | None = None,
    ) -> Iterator[PatchLocation]:
        if not isinstance(annotations, Annotations):
            raise ConfigError(
                f"AnnotationSampler needs annotations for {slide.path.name}: add an "
                f"'annotations' column (GeoJSON path) to the cohort CSV"
            )
        names = [c for c in annotations.classes if self.classes is None or c in self.classes]
        regions = {c: annotations.rasterize(c, mask) for c in names}
        regions = {c: r for c, r in regions.items() if not r.is_empty}
        if not regions:
            return
        names = sorted(regions)
        pixels = {c: np.flatnonzero(regions[c].mask) for c in names}
        area = np.array([len(pixels[c]) for c in names], float)
        prob = None if self.balanced else area / area.sum()
        geo = self.geometry(slide)
        (sx, sy), misses = geo.size0, 0
        while misses < self.max_tries:
            cls = names[rng.choice(len(names), p=prob)]
            cx, cy = tissue_centres(regions[cls], rng, self.batch, pixels[cls])
            x, y = geo.snap(cx - sx / 2, cy - sy / 2, slide.dimensions)
            inside = regions[cls].region_fraction(x, y, sx, sy)
            frac = mask.region_fraction(x, y, sx, sy)
            keep = np.flatnonzero((inside >= self.min_overlap) & (frac >= self.min_tissue))
            misses = 0 if len(keep) else misses + 1
            if len(keep):
                i = keep[0]  # one per draw keeps the classes balanced
                yield PatchLocation(int(x[i]), int(y[i]), float(frac[i]), cls)
