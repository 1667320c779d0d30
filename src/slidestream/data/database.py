"""Build HDF5 patch databases from a cohort (or from folders of tile images), one file per split."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from slidestream.data.hdf5 import PatchDatabaseWriter
from slidestream.data.nopatches import no_patches_error, warn_empty_slide
from slidestream.errors import ConfigError, SlideReadError, SlideStreamError
from slidestream.io import open_slide
from slidestream.parallel import exclusive_lock
from slidestream.sampling import (
    Cohort,
    PatchSampler,
    SlideEntry,
    load_annotations,
    split_by_patient,
)
from slidestream.sampling.cohort import failure_message
from slidestream.sampling.shards import shard_files, shard_path
from slidestream.tissue import TissueMask, detect_tissue

__all__ = [
    "DatabaseBuild",
    "build_patch_databases",
    "merge_shard_databases",
    "tile_folder_entries",
]

log = logging.getLogger(__name__)

_TILE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


@dataclass
class DatabaseBuild:
    """What a build wrote: file per split, patches per split, the slides that failed, and per
    slide the number of patch regions left out because their pixels could not be decoded."""

    files: dict[str, Path] = field(default_factory=dict)
    patches: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    skipped: int = 0
    damaged: dict[str, int] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)  # slides that gave no patch


def split_paths(out: str | os.PathLike[str], splits: list[str]) -> dict[str, Path]:
    """``DB.h5`` → ``DB.train.h5``, ``DB.val.h5``, ... (or ``DB.h5`` for a single split)."""
    out = Path(out)
    if len(splits) == 1:
        return {splits[0]: out}
    return {s: out.with_name(f"{out.stem}.{s}{out.suffix or '.h5'}") for s in splits}


def build_patch_databases(
    cohort: Cohort,
    out: str | os.PathLike[str],
    sampler: PatchSampler,
    *,
    split: dict[str, float] | None = None,
    seed: int = 0,
    labels: str = "slide",
    per_slide: int | None = None,
    compression: str = "gzip",
    level: int = 6,
    backend: str = "auto",
    tissue: str = "otsu",
    mask_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    stain: Any = None,
) -> DatabaseBuild:
    """Write patches of every slide into per-split HDF5 files (split by patient, resumable).

    ``labels`` is ``"slide"`` (the cohort's label column) or ``"annotations"`` (the class of the
    GeoJSON polygon containing each patch's centre; patches outside every polygon are left out).
    ``per_slide`` caps the patches per slide (required for endless random samplers).
    Slides are committed one by one, crash-safely (:mod:`slidestream.data.hdf5_writer`); a
    patch whose pixels cannot be decoded is left out and counted in ``DatabaseBuild.damaged``.
    With ``shard=(i, n)`` only the slides of shard ``i/n`` are done (splits, seeds and classes
    are those of the whole cohort) into ``DB.shard-i-of-n.h5`` (per split
    ``DB.shard-i-of-n.train.h5``, ...), for :func:`merge_shard_databases`.
    ``stain``: a :class:`~slidestream.data.stain.StainNormalizer` applied to every patch before
    it is stored (its target goes into the database's ``params`` as ``stain``).
    """
    from tqdm import tqdm

    if labels not in ("slide", "annotations"):
        raise ConfigError(f"labels must be 'slide' or 'annotations', got {labels!r}")
    classes = _classes(cohort, labels)
    groups = split_by_patient(cohort.slides, split, seed) if split else {"all": cohort.slides}
    params = {
        "sampler": type(sampler).__name__,
        **{k: getattr(sampler, k) for k in sampler.__dataclass_fields__},
        "labels": labels,
        "per_slide": per_slide,
        "split": split,
        "compression": compression,
        "tissue": tissue,
    }
    if stain is not None:
        params["stain"] = {**asdict(stain.target), "tag": stain.target.tag}
    out = shard_path(out, shard)
    build = DatabaseBuild(files=split_paths(out, list(groups)))
    for path in build.files.values():
        _same_stain(path, params.get("stain"))
    args = (sampler, classes, labels, per_slide, backend, tissue, mask_dir, stain)
    position = {s.path: k for k, s in enumerate(cohort.slides)}
    groups = {
        name: [e for e in entries if position[e.path] % shard[1] == shard[0]]
        for name, entries in groups.items()
    }
    total = sum(map(len, groups.values()))
    bar = tqdm(total=total, desc="patches", unit="slide", disable=not progress)
    with contextlib.ExitStack() as stack:
        if len(groups) > 1:  # one writer of the whole set of split files at a time
            stack.enter_context(exclusive_lock(out, "slidestream patches"))
        for name, entries in groups.items():
            writer = PatchDatabaseWriter(
                build.files[name], sampler.size, classes, name, compression, level, params, seed
            )
            build.patches[name] = 0
            try:
                _write_group(writer, entries, cohort, build, name, bar, seed, args)
            finally:
                writer.close()
    bar.close()
    if build.empty and not build.skipped and not sum(build.patches.values()):
        raise no_patches_error(build.empty, sampler, failed=len(build.failures))
    return build


def merge_shard_databases(
    cohort: Cohort,
    out: str | os.PathLike[str],
    *,
    split: dict[str, float] | None = None,
    seed: int = 0,
) -> DatabaseBuild:
    """Merge the shard databases of ``out`` (written by ``build_patch_databases(..., shard=)``
    with this ``cohort``, ``split`` and ``seed``) into ``out`` (one file per split), patches
    mapped, not copied (:mod:`slidestream.data.hdf5_merge`), rows in the order of an unsharded
    run. Raises ConfigError when a shard file is missing or the shards do not match."""
    from slidestream.data.hdf5_merge import merge_patch_databases

    out = Path(out)
    groups = split_by_patient(cohort.slides, split, seed) if split else {"all": cohort.slides}
    build = DatabaseBuild(files=split_paths(out, list(groups)))
    for name, entries in groups.items():
        target = build.files[name]
        suffix = target.name[len(out.stem) :] if len(groups) > 1 else out.suffix
        shards = shard_files(out, suffix)
        build.patches[name] = merge_patch_databases(shards, target, [str(e.path) for e in entries])
    return build


def _same_stain(path: Path, stain: dict[str, Any] | None) -> None:
    """Refuse to add patches to a database normalised to another stain target (or none)."""
    import h5py

    if not Path(path).is_file():
        return
    try:
        with h5py.File(path, "r") as h5:
            theirs = (json.loads(h5.attrs.get("params", "{}")).get("stain") or {}).get("tag")
    except (OSError, ValueError):
        return  # unreadable: the writer moves it aside and rebuilds
    mine = (stain or {}).get("tag")
    if theirs != mine:
        raise ConfigError(
            f"{path} holds patches with stain normalisation {theirs or 'none'}, not "
            f"{mine or 'none'}; use another --out"
        )


def _write_group(
    writer: PatchDatabaseWriter,
    entries: list[SlideEntry],
    cohort: Cohort,
    build: DatabaseBuild,
    name: str,
    bar: Any,
    seed: int,
    args: tuple[Any, ...],
) -> None:
    order = {s.path: i for i, s in enumerate(cohort.slides)}
    for entry in entries:
        key = str(entry.path)
        bar.update(1)
        if key in writer.completed:
            build.skipped += 1
            continue
        rng = np.random.default_rng([seed, order[entry.path]])
        damaged: Counter[str] = Counter()
        try:
            patches = _slide_patches(entry, *args, rng, damaged)
            added = writer.add_slide(key, entry.patient_id, patches, damaged)
            build.patches[name] += added
            if not added:
                build.empty.append(key)
        except SlideStreamError as exc:
            build.failures.append(failure_message(entry.path, exc))
            log.info("skipping %s: %s", entry.path, exc)
        if damaged[key]:
            build.damaged[key] = damaged[key]


def _classes(cohort: Cohort, labels: str) -> list[str]:
    if labels == "slide":
        return cohort.classes
    names: set[str] = set()
    for entry in cohort:
        if entry.annotations is None:
            raise ConfigError(
                f"--labels annotations needs an annotations column; {entry.path.name} has none"
            )
        names.update(load_annotations(entry.annotations).classes)
    return sorted(names)


def _slide_patches(
    entry: SlideEntry,
    sampler: PatchSampler,
    classes: list[str],
    labels: str,
    per_slide: int | None,
    backend: str,
    tissue: str,
    mask_dir: Any,
    stain: Any,
    rng: np.random.Generator,
    damaged: Counter[str],
) -> Iterator[tuple[np.ndarray, int, int, int, float]]:
    """Patches of one slide; a patch whose pixels cannot be decoded is left out and counted in
    ``damaged[str(entry.path)]``."""
    slide = open_slide(entry.path, backend=backend, mpp=entry.mpp)
    mask = detect_tissue(slide, tissue, cache_dir=mask_dir)
    mpp = float(sampler.mpp or (slide.mpp or (np.nan,))[0])
    regions: dict[str, TissueMask] = {}
    ann = load_annotations(entry.annotations) if entry.annotations else None
    if labels == "annotations" and ann is not None:
        regions = {c: ann.rasterize(c, mask) for c in ann.classes}
    geo = sampler.geometry(slide)
    count = 0
    for loc in sampler.iter_locations(slide, mask, rng, ann):
        if per_slide is not None and count >= per_slide:
            break
        name = loc.label if loc.label is not None else entry.label
        if labels == "annotations" and loc.label is None:
            cx, cy = loc.x + geo.size0[0] / 2, loc.y + geo.size0[1] / 2
            name = next(
                (
                    c
                    for c, m in regions.items()
                    if m.region_fraction(cx - 0.5, cy - 0.5, 1, 1) > 0.5
                ),
                None,
            )
            if name is None:
                continue
        try:
            pixels = sampler.read(slide, loc)
        except SlideReadError as exc:
            damaged[str(entry.path)] += 1
            log.info("%s: patch at (%d, %d) left out: %s", entry.path, loc.x, loc.y, exc)
            continue
        count += 1
        if stain is not None:
            pixels = stain(pixels)
        yield (
            pixels,
            classes.index(name) if name in classes else -1,
            loc.x,
            loc.y,
            mpp,
        )
    if not count:
        warn_empty_slide(entry.path, mask, sampler)


def tile_folder_entries(root: str | os.PathLike[str]) -> tuple[list[tuple[Path, str]], list[str]]:
    """``root/<class>/<image>`` files as (path, class) pairs, and the sorted class names."""
    root = Path(root)
    pairs = sorted(
        (p, d.name)
        for d in root.iterdir()
        if d.is_dir()
        for p in d.rglob("*")
        if p.suffix.lower() in _TILE_SUFFIXES
    )
    if not pairs:
        raise ConfigError(
            f"no tile images in class folders under {root} (expected {root}/<class>/<image>.png)"
        )
    return pairs, sorted({c for _, c in pairs})


def build_tile_database(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    size: int,
    *,
    split: dict[str, float] | None = None,
    seed: int = 0,
    compression: str = "gzip",
    level: int = 6,
    mpp: float | None = None,
) -> DatabaseBuild:
    """A database from folders of tile images, labelled by folder name; each image is one
    patch (resized to ``size`` if needed) and its own patient."""
    pairs, classes = tile_folder_entries(root)
    entries = [SlideEntry(p, label=c, patient=f"{c}/{p.stem}") for p, c in pairs]
    groups = split_by_patient(entries, split, seed) if split else {"all": entries}
    build = DatabaseBuild(files=split_paths(out, list(groups)))
    params = {"source": str(root), "size": size, "split": split, "compression": compression}
    for name, group in groups.items():
        writer = PatchDatabaseWriter(
            build.files[name], size, classes, name, compression, level, params, seed
        )
        build.patches[name] = 0
        try:
            for b, start in enumerate(range(0, len(group), 256)):
                key = f"tiles:{b}"  # images are committed in blocks of 256, in a fixed order
                if key in writer.completed:
                    build.skipped += 1
                    continue
                block = group[start : start + 256]
                build.patches[name] += writer.add_slide(
                    key, "", _tiles(block, classes, size, mpp, build.failures)
                )
        finally:
            writer.close()
    return build


def _tiles(
    entries: list[SlideEntry], classes: list[str], size: int, mpp: float | None, failures: list[str]
) -> Iterator[tuple[Any, ...]]:
    for entry in entries:
        try:
            with Image.open(entry.path) as img:
                rgb = img.convert("RGB")
                arr = np.asarray(rgb if rgb.size == (size, size) else rgb.resize((size, size)))
        except OSError as exc:
            failures.append(f"{entry.path}: {exc}")
            continue
        yield arr, classes.index(entry.label or ""), 0, 0, float(mpp or np.nan), entry.patient_id
