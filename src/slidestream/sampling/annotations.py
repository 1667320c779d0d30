"""Patches inside annotated areas (GeoJSON, e.g. a QuPath export), labelled by class.

GeoJSON coordinates are level-0 pixels (QuPath's convention). A feature's class is read from
``properties.classification.name`` (QuPath), else ``properties.class``, ``label`` or ``name``,
else ``"unclassified"``.

Geometry goes through shapely, so the result never depends on the order of features or of the
parts of a MultiPolygon:

- Polygon and MultiPolygon: each ring set is repaired with ``make_valid`` (a self-intersecting
  "bow-tie" becomes its two lobes), the parts are united, holes stay holes and an island inside
  a hole is kept. A class's area is the union of its features.
- GeometryCollection: its polygonal members are used as above; other members are reported.
- Point, MultiPoint, LineString, MultiLineString (and parts that repair to lines) have no area:
  they are left out and reported by name (file, feature number, type, class) in a warning and
  in :attr:`Annotations.ignored`. Buffer them into polygons (e.g. a patch-sized square in
  QuPath) to use them.
- Areas of different classes that overlap: the smaller feature wins the overlap (a tumour
  outline drawn inside a large "tissue" or "stroma" outline keeps its class); features of equal
  area are ordered by class name.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slidestream.errors import ConfigError
from slidestream.io.base import Slide
from slidestream.sampling.base import PatchLocation, PatchSampler, tissue_centres
from slidestream.tissue.mask import TissueMask

__all__ = ["Annotations", "AnnotationSampler", "load_annotations"]

log = logging.getLogger(__name__)

_AREAS = ("Polygon", "MultiPolygon")
_WARNED: set[tuple[str, str]] = set()  # (file, feature) already reported by this process


@dataclass(frozen=True)
class Annotations:
    """Valid, non-overlapping areas per class name: shapely (Multi)Polygons in level-0 px.

    ``ignored`` describes each feature (or part) left out, e.g. ``"feature 3 (Point, class
    'tumour'): no area"``; each is also logged as a warning, once per file and process.
    """

    regions: dict[str, Any]
    source: str = ""
    ignored: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted(self.regions)

    def label_at(self, x: float, y: float) -> str | None:
        """The class whose area contains the level-0 point (x, y), or None."""
        import shapely

        for name in self.classes:
            if shapely.contains_xy(self.regions[name], x, y):
                return name
        return None

    def rasterize(self, name: str, like: TissueMask) -> TissueMask:
        """The area of class ``name`` on a mask of the same geometry as ``like``: a mask pixel
        is set when its centre lies inside (exteriors filled, holes cleared, islands kept)."""
        import shapely

        h, w = like.shape
        dx, dy = like.downsample
        out = np.zeros((h, w), bool)
        geom = self.regions.get(name)
        for poly in shapely.get_parts(geom) if geom is not None else []:
            _fill_polygon(out, poly, dx, dy)
        return TissueMask(out, like.slide_dimensions, like.mpp, f"annotation:{name}")


def _fill_polygon(out: np.ndarray, poly: Any, dx: float, dy: float) -> None:
    """OR one valid polygon (exterior minus holes) into ``out``, drawn in its bounding box."""
    from skimage.draw import polygon as draw_polygon

    h, w = out.shape
    x0, y0, x1, y1 = poly.bounds
    c0, r0 = max(0, int(np.floor(x0 / dx))), max(0, int(np.floor(y0 / dy)))
    c1, r1 = min(w, int(np.ceil(x1 / dx)) + 1), min(h, int(np.ceil(y1 / dy)) + 1)
    if c0 >= c1 or r0 >= r1:
        return
    local = np.zeros((r1 - r0, c1 - c0), bool)
    for k, ring in enumerate([poly.exterior, *poly.interiors]):
        xy = np.asarray(ring.coords)
        rr, cc = draw_polygon(xy[:, 1] / dy - 0.5 - r0, xy[:, 0] / dx - 0.5 - c0, local.shape)
        local[rr, cc] = k == 0  # holes of a valid polygon lie inside its exterior
    out[r0:r1, c0:c1] |= local


def load_annotations(path: str | os.PathLike[str]) -> Annotations:
    """Read areas per class from a GeoJSON FeatureCollection, Feature list or Feature."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read annotations {path}: {exc}") from exc
    features = data.get("features", [data]) if isinstance(data, dict) else data
    if not isinstance(features, list):
        raise ConfigError(f"{path}: expected a GeoJSON FeatureCollection, got {type(data)}")
    areas: list[tuple[str, Any]] = []
    ignored: list[str] = []
    for i, feature in enumerate(features):
        feature = feature if isinstance(feature, dict) else {}
        name = _class_name(feature.get("properties") or {})
        geom = _area_of(feature.get("geometry"), f"{path}: feature {i}", name, ignored)
        if geom is not None:
            areas.append((name, geom))
    for what in ignored:
        if (str(path), what) in _WARNED:
            continue
        _WARNED.add((str(path), what))
        log.warning(
            "%s: %s; left out (only areas are sampled: draw polygons, or buffer points and "
            "lines into polygons)",
            path,
            what,
        )
    if not areas:
        log.warning("%s: no Polygon or MultiPolygon features with an area", path)
    return Annotations(_resolve_overlaps(areas), str(path), ignored)


def _area_of(geometry: Any, where: str, name: str, ignored: list[str]) -> Any | None:
    """The repaired polygonal area of a GeoJSON geometry, or None (reported in ``ignored``)."""
    import shapely
    from shapely.geometry import shape

    label = where.rsplit(": ", 1)[-1]
    if not geometry:
        ignored.append(f"{label} (class {name!r}): no geometry")
        return None
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    try:
        geom = shapely.force_2d(shape(geometry))
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ConfigError(f"{where} ({kind}) has malformed coordinates ({exc})") from exc
    polys, lacking = [], set()
    for part in _flatten(geom):
        if part.geom_type in _AREAS:
            polys.extend(_polygons(shapely.make_valid(part), label, kind, name, ignored))
        elif not part.is_empty:
            lacking.add(part.geom_type)
    if lacking:
        ignored.append(f"{label} ({', '.join(sorted(lacking))}, class {name!r}): no area")
    if not polys:
        return None
    return shapely.union_all(polys)


def _flatten(geom: Any) -> Iterator[Any]:
    """Single-part geometries and MultiPolygons of ``geom``, collections opened recursively."""
    import shapely

    if geom.geom_type in ("GeometryCollection", "MultiPoint", "MultiLineString"):
        for part in shapely.get_parts(geom):
            yield from _flatten(part)
    else:
        yield geom


def _polygons(valid: Any, label: str, kind: Any, name: str, ignored: list[str]) -> list[Any]:
    """The polygons with an area among the parts of a repaired geometry (parts that repaired
    to lines or points are reported once)."""
    import shapely

    out = [p for p in _flatten(valid) if p.geom_type in _AREAS and p.area > 0]
    if len(out) < len([p for p in _flatten(valid) if not p.is_empty]):
        ignored.append(f"{label} ({kind}, class {name!r}): a part with no area")
    return [q for p in out for q in shapely.get_parts(p)]


def _resolve_overlaps(areas: list[tuple[str, Any]]) -> dict[str, Any]:
    """Per class, the union of its features minus the smaller features of other classes."""
    import shapely

    if not areas:
        return {}
    geoms = [g for _, g in areas]
    rank = [(g.area, n) for n, g in areas]
    tree = shapely.STRtree(geoms)
    pieces: dict[str, list[Any]] = {}
    overlaps = 0
    for i, (name, geom) in enumerate(areas):
        smaller = [
            geoms[j]
            for j in tree.query(geom, predicate="intersects")
            if areas[j][0] != name and rank[j] < rank[i]
        ]
        if smaller:
            cut = shapely.difference(geom, shapely.union_all(smaller))
            overlaps += cut.area < geom.area
            geom = cut
        pieces.setdefault(name, []).append(geom)
    if overlaps:
        log.info("%d annotation(s) overlap a smaller one of another class, which wins", overlaps)
    regions = {n: shapely.union_all(p) for n, p in pieces.items()}
    return {n: g for n, g in regions.items() if not g.is_empty}


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
    """Random patches centred inside annotated areas, labelled with the area's class.

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
