"""Synthetic whole-slide images for tests, benchmarks and the demo.

Slides are procedural: H&E-like tissue pieces (pink stroma with fibre texture and purple nuclei)
on a white, slightly noisy background, with optional "tumour" regions where nuclei are larger,
denser and darker. Everything is built as a lazy libvips pipeline (Perlin and Worley noise with
fixed seeds) and written tile by tile as a tiled, JPEG-compressed pyramidal TIFF, so memory stays
bounded (a 40000x30000 slide is written in well under 2 GB) and the same seed gives the same
pixels. Sizes of textures are physical (µm), so a slide looks the same at any mpp.

Next to ``OUT.tiff`` a ``OUT.truth.json`` records the parameters and a low-resolution
``OUT.tumour.png`` (when ``tumour=True``) holds the ground-truth tumour mask.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from slidestream.errors import ConfigError

__all__ = ["SyntheticSlide", "write_synthetic_slide"]

log = logging.getLogger(__name__)

_BACKGROUND = (242.0, 241.0, 243.0)
# texture: stroma RGB, fibre amplitude per channel, nucleus RGB, nucleus spacing and radius (µm)
TEXTURES: dict[
    str, tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...], float, float]
] = {
    "normal": ((236.0, 160.0, 196.0), (60.0, 50.0, 30.0), (92.0, 58.0, 150.0), 36.0, 3.2),
    "tumour": ((214.0, 136.0, 190.0), (40.0, 40.0, 20.0), (58.0, 30.0, 112.0), 30.0, 4.4),
    "inflamed": ((242.0, 196.0, 218.0), (30.0, 25.0, 15.0), (48.0, 28.0, 100.0), 15.0, 2.3),
}


@dataclass(frozen=True)
class SyntheticSlide:
    """Parameters of a generated slide (sizes in level-0 pixels, mpp in µm/px)."""

    width: int
    height: int
    mpp: float = 0.5
    seed: int = 0
    tumour: bool = False
    texture: str = "normal"  # base tissue texture: normal, tumour or inflamed
    tumour_fraction: float = 0.15  # of the tissue area, roughly
    tissue_fraction: float = 0.45  # of the slide area, roughly
    aperio: bool = False  # write an Aperio-style ImageDescription (vendor "aperio")
    write_mpp: bool = True  # False makes a slide with no usable mpp
    tile_size: int = 256
    quality: int = 85

    def __post_init__(self) -> None:
        if self.width < 16 or self.height < 16:
            raise ConfigError(f"size must be at least 16x16 pixels, got {self.width}x{self.height}")
        if not 0.05 <= self.mpp <= 50:
            raise ConfigError(f"mpp must be in [0.05, 50] µm/px, got {self.mpp}")
        if self.texture not in TEXTURES:
            raise ConfigError(f"texture must be one of {sorted(TEXTURES)}, got {self.texture!r}")
        if self.tile_size % 16:
            raise ConfigError(f"tile_size must be a multiple of 16, got {self.tile_size}")
        if not 0 < self.tissue_fraction < 1 or not 0 < self.tumour_fraction < 1:
            raise ConfigError("tissue_fraction and tumour_fraction must be in (0, 1)")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"quality must be in [1, 100], got {self.quality}")


def write_synthetic_slide(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    *,
    mpp: float = 0.5,
    seed: int = 0,
    tumour: bool = False,
    **options: Any,
) -> Path:
    """Write a synthetic pyramidal TIFF to ``path`` and return the path.

    ``options`` are the other fields of :class:`SyntheticSlide` (``texture``, ``aperio``,
    ``write_mpp``, ``tumour_fraction``, ``tissue_fraction``, ``tile_size``, ``quality``).
    """
    spec = SyntheticSlide(width, height, mpp=mpp, seed=seed, tumour=tumour, **options)
    import pyvips

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tissue_lr, tumour_lr, factor = _low_res_fields(spec)
    image = _render(spec, tissue_lr, tumour_lr, factor, pyvips)
    px_per_mm = 1000.0 / spec.mpp if spec.write_mpp else 1.0  # 1 px/mm is rejected as implausible
    tmp = path.with_name(f".{path.name}.partial")
    image.tiffsave(
        str(tmp),
        tile=True,
        tile_width=spec.tile_size,
        tile_height=spec.tile_size,
        pyramid=True,
        compression="jpeg",
        Q=spec.quality,
        xres=px_per_mm,
        yres=px_per_mm,
        resunit="cm",
        bigtiff=width * height * 3 > 3_500_000_000,
        strip=False,
    )
    if spec.aperio:
        _repack_aperio(tmp, spec, pyvips)
    os.replace(tmp, path)
    _write_truth(path, spec, tissue_lr, tumour_lr, factor)
    log.info("wrote synthetic slide %s (%dx%d at %.3g µm/px)", path, width, height, mpp)
    return path


def _low_res_fields(spec: SyntheticSlide) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Tissue and tumour alpha maps (float32 in [0, 1]) at 1/``factor`` of level 0."""
    factor = max(1, min(spec.width, spec.height) // 256)
    w, h = math.ceil(spec.width / factor), math.ceil(spec.height / factor)
    rng = np.random.default_rng(spec.seed)
    field = _perlin_octaves(w, h, max(w, h) / 2.2, rng, octaves=3)
    # keep tissue off the slide edges, like a section placed on glass
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    edge = np.minimum.reduce([xx, yy, w - 1 - xx, h - 1 - yy]) / (0.08 * min(w, h))
    field = field - 2.0 * np.clip(1 - edge, 0, 1)
    tissue = _soft_threshold(field, np.quantile(field, 1 - spec.tissue_fraction), 0.02)
    tumour = None
    if spec.tumour:
        tfield = _perlin_octaves(w, h, max(w, h) / 4.0, rng, octaves=2)
        inside = tissue > 0.5
        if inside.any():
            thr = np.quantile(tfield[inside], 1 - spec.tumour_fraction)
            tumour = _soft_threshold(tfield, thr, 0.02) * tissue
        else:
            tumour = np.zeros_like(tissue)
    return tissue, tumour, factor


def _perlin_octaves(
    w: int, h: int, cell: float, rng: np.random.Generator, octaves: int
) -> np.ndarray:
    """Smooth noise in about [-1, 1]: sum of bilinearly upsampled random grids."""
    out = np.zeros((h, w), np.float32)
    amp = 1.0
    for _ in range(octaves):
        gw, gh = max(2, math.ceil(w / cell) + 1), max(2, math.ceil(h / cell) + 1)
        grid = rng.uniform(-1, 1, (gh, gw)).astype(np.float32)
        up = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC)
        out += amp * np.asarray(up)
        amp *= 0.5
        cell /= 2.0
    return out


def _soft_threshold(field: np.ndarray, thr: float, width: float) -> np.ndarray:
    return np.clip((field - thr) / width + 0.5, 0.0, 1.0).astype(np.float32)


def _render(
    spec: SyntheticSlide,
    tissue_lr: np.ndarray,
    tumour_lr: np.ndarray | None,
    factor: int,
    pyvips: Any,
) -> Any:
    """The full-resolution RGB image as a lazy libvips pipeline."""
    w, h, um = spec.width, spec.height, 1.0 / spec.mpp  # um: pixels per micron

    def upsample(arr: np.ndarray) -> Any:
        img = pyvips.Image.new_from_array(arr.astype(np.float32))
        if factor > 1:
            img = img.resize(factor, kernel="linear")
        return img.crop(0, 0, min(w, img.width), min(h, img.height)).embed(
            0, 0, w, h, extend="copy"
        )

    def nuclei(spacing_um: float, radius_um: float, seed: int) -> Any:
        cell = max(2, round(spacing_um * um))
        dist = pyvips.Image.worley(w, h, cell_size=cell, seed=seed)
        edge = max(0.6, 0.8 * um)
        return _clip01((dist * -1 + radius_um * um) / edge + 0.5)

    tissue = upsample(tissue_lr)
    fibre = pyvips.Image.perlin(w, h, cell_size=max(2, round(12 * um)), seed=spec.seed + 11)
    grain = pyvips.Image.gaussnoise(w, h, sigma=3.0, mean=0.0, seed=spec.seed + 13)

    def texture(name: str, seed: int) -> Any:
        stroma_rgb, amp, nucleus_rgb, spacing, radius = TEXTURES[name]
        stroma = (fibre * amp[0]).bandjoin([fibre * amp[1], fibre * amp[2]]) + list(stroma_rgb)
        return _mix(stroma, list(nucleus_rgb), nuclei(spacing, radius, seed))

    cell_rgb = texture(spec.texture, spec.seed + 17)
    if tumour_lr is not None:
        tum = upsample(tumour_lr)
        cell_rgb = _mix(cell_rgb, texture("tumour", spec.seed + 19), tum)
    out = _mix(list(_BACKGROUND), cell_rgb, tissue) + grain
    return out.cast("uchar").copy(interpretation="srgb")


def _mix(a: Any, b: Any, alpha: Any) -> Any:
    """``a * (1 - alpha) + b * alpha`` for images or constant RGB lists (not both lists)."""
    diff = (a * -1) + b if isinstance(b, list) else b - a
    return alpha * diff + a


def _clip01(img: Any) -> Any:
    return (img < 0).ifthenelse(0, (img > 1).ifthenelse(1, img))


def _aperio_description(spec: SyntheticSlide) -> str:
    w, h, t = spec.width, spec.height, spec.tile_size
    mag = 20 if spec.mpp >= 0.35 else 40
    fields = [
        f"Aperio Image Library v12.0.16 \r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t}) JPEG/RGB "
        f"Q={spec.quality}",
        f"AppMag = {mag}",
        "ScanScope ID = SYNTH",
        f"Filename = synthetic-{spec.seed}",
    ]
    if spec.write_mpp:
        fields.append(f"MPP = {spec.mpp:.4f}")
    return "|".join(fields)


def _repack_aperio(path: Path, spec: SyntheticSlide, pyvips: Any) -> None:
    """Rewrite a pyvips pyramid in Aperio SVS page order (level 0, thumbnail, levels 1..)."""
    import tifffile

    packed = path.with_name(path.name + ".svs")
    res = (1e4 / spec.mpp, 1e4 / spec.mpp) if spec.write_mpp else (10.0, 10.0)
    n_levels = len(tifffile.TiffFile(path).pages)
    with tifffile.TiffWriter(packed, bigtiff=spec.width * spec.height * 3 > 3_500_000_000) as tw:
        for level in range(n_levels):
            img = pyvips.Image.tiffload(str(path), page=level)
            tw.write(
                _tiles(img, spec.tile_size, pyvips),
                shape=(img.height, img.width, 3),
                dtype=np.uint8,
                tile=(spec.tile_size, spec.tile_size),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": spec.quality},
                description=_aperio_description(spec) if level == 0 else None,
                resolution=res,
                resolutionunit="CENTIMETER",
                metadata=None,
            )
            if level == 0:
                thumb = pyvips.Image.thumbnail(str(path), 768)
                tw.write(
                    np.ndarray((thumb.height, thumb.width, 3), np.uint8, thumb.write_to_memory()),
                    photometric="rgb",
                    description="Aperio thumbnail",
                    metadata=None,
                )
    os.replace(packed, path)


def _tiles(img: Any, t: int, pyvips: Any) -> Any:
    region = pyvips.Region.new(img)
    for y in range(0, img.height, t):
        for x in range(0, img.width, t):
            w, h = min(t, img.width - x), min(t, img.height - y)
            tile = np.full((t, t, 3), 255, np.uint8)
            tile[:h, :w] = np.ndarray((h, w, 3), np.uint8, region.fetch(x, y, w, h))
            yield tile


def _write_truth(
    path: Path,
    spec: SyntheticSlide,
    tissue_lr: np.ndarray,
    tumour_lr: np.ndarray | None,
    factor: int,
) -> None:
    truth = {
        "spec": asdict(spec),
        "mask_downsample": factor,
        "tissue_fraction": float((tissue_lr > 0.5).mean()),
        "tumour_fraction": float((tumour_lr > 0.5).mean()) if tumour_lr is not None else 0.0,
    }
    if tumour_lr is not None:
        png = path.with_suffix(".tumour.png")
        Image.fromarray(tumour_lr > 0.5).save(png)
        truth["tumour_mask"] = png.name
    path.with_suffix(".truth.json").write_text(json.dumps(truth, indent=2))
