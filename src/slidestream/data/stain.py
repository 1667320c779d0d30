"""Stain normalisation of H&E patches to a target: Macenko, Reinhard and Vahadane.

A :class:`StainTarget` holds what the target was reduced to (a 2x3 H&E stain matrix and the
99th-percentile stain concentrations for Macenko/Vahadane, Lab means and standard deviations for
Reinhard), fitted from an image or from tissue of a named slide, saved as JSON in the run.
:class:`StainNormalizer` maps one (H, W, 3) uint8 patch to it, uint8 out, deterministically;
background (CIE L* of 80 or more, or every channel's optical density below 0.15) is returned
unchanged, and a patch with fewer than 64 stained pixels is returned as it is.

- Macenko et al. 2009: stain vectors from the extreme angles (1st/99th percentile) of the optical
  densities projected on their two main eigenvectors; concentrations by least squares.
- Vahadane et al. 2016: stain vectors by sparse non-negative factorisation of the optical
  densities (alternating exact non-negative lasso codes, lambda 0.1, and projected
  least-squares stain vectors, from the Ruifrok-Johnston H&E vectors); concentrations by the
  exact non-negative lasso (lambda 0.01).
- Reinhard et al. 2001: per-channel mean and standard deviation of tissue pixels in CIE Lab.

Written here rather than taken from torchstain: torchstain has no Vahadane (its PR needs
SPAMS), and scikit-learn's DictionaryLearning took ~9 s for 2,000 pixels on this machine.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from skimage.color import lab2rgb, rgb2lab

from slidestream.errors import ConfigError

__all__ = ["METHODS", "StainNormalizer", "StainTarget", "load_stain_target", "optical_density"]

log = logging.getLogger(__name__)

METHODS = ("macenko", "reinhard", "vahadane")
BETA = 0.15  # optical density below which a channel counts as unstained
LUMINOSITY = 0.8  # L*/100 at or above which a pixel is background (glass)
MIN_TISSUE_PX = 64
_RUIFROK_HE = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])  # H, E rows (Ruifrok 2001)
_LOG256 = float(np.log(256.0))


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB → (..., 3) float64 optical density ``log(256) - log(I + 1)``."""
    return _LOG256 - np.log(rgb.astype(np.float64) + 1.0)


def _from_od(od: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


def _tissue(rgb: np.ndarray, od: np.ndarray) -> np.ndarray:
    """Stained pixels: CIE L* below 80 (so a colour cast on the glass stays background) and some
    channel's optical density above ``BETA``."""
    import cv2

    lum = cv2.cvtColor(np.ascontiguousarray(rgb.reshape(-1, 1, 3)), cv2.COLOR_RGB2LAB)[:, 0, 0]
    return (lum.reshape(rgb.shape[:-1]) < LUMINOSITY * 255) & (od.max(axis=-1) > BETA)


def _order_he(m: np.ndarray) -> np.ndarray:
    """Unit rows, haematoxylin first (the larger red optical density)."""
    m = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    return m if m[0, 0] >= m[1, 0] else m[::-1].copy()


def _macenko_matrix(od: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """(2, 3) stain matrix of (N, 3) tissue optical densities (Macenko 2009)."""
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, 1:3]  # the two largest eigenvalues
    plane = plane * np.where(plane[0] < 0, -1.0, 1.0)  # a fixed sign for determinism
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    return _order_he(np.abs(np.stack([v1, v2])))


def _nonneg_lasso(od: np.ndarray, m: np.ndarray, lam: float) -> np.ndarray:
    """Exact argmin_{c >= 0} ||od - c m||^2 + lam * sum(c) for 2 stains, all pixels at once.

    The minimiser of this convex problem lies on one of the faces {both > 0}, {c2 = 0},
    {c1 = 0}; each face has a closed form and the feasible one with the least cost wins."""
    g, b = m @ m.T, od @ m.T - lam / 2  # (2, 2), (N, 2)
    both = np.linalg.solve(g + 1e-12 * np.eye(2), b.T).T
    only = np.maximum(b / np.diag(g), 0.0)
    cands = [both, np.c_[only[:, 0], 0 * only[:, 0]], np.c_[0 * only[:, 1], only[:, 1]]]
    costs = []
    for c in cands:
        cost = ((od - c @ m) ** 2).sum(1) + lam * c.sum(1)
        costs.append(np.where((c >= 0).all(1), cost, np.inf))
    pick = np.argmin(np.stack(costs), 0)
    return np.stack(cands)[pick, np.arange(len(od))]


def _vahadane_matrix(od: np.ndarray, lam: float = 0.1, iters: int = 30) -> np.ndarray:
    """(2, 3) stain matrix by sparse non-negative factorisation od ≈ C M (Vahadane 2016)."""
    m = _RUIFROK_HE / np.linalg.norm(_RUIFROK_HE, axis=1, keepdims=True)
    for _ in range(iters):
        c = _nonneg_lasso(od, m, lam)
        gram = c.T @ c
        if np.linalg.matrix_rank(gram) < 2:
            break
        m = np.maximum(np.linalg.solve(gram, c.T @ od), 1e-6)
        m = m / np.linalg.norm(m, axis=1, keepdims=True)
    return _order_he(m)


def _subsample(x: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` rows, evenly strided (deterministic)."""
    return x if len(x) <= n else x[np.linspace(0, len(x) - 1, n).astype(np.int64)]


def _stains(method: str, od: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stain matrix (2, 3), concentrations (N, 2)) of tissue optical densities ``od``."""
    if method == "macenko":
        m = _macenko_matrix(_subsample(od, 200_000))
        return m, np.linalg.lstsq(m.T, od.T, rcond=None)[0].T
    m = _vahadane_matrix(_subsample(od, 2048))
    return m, _nonneg_lasso(od, m, 0.01)


def _lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = rgb2lab(rgb.reshape(-1, 1, 3)).reshape(-1, 3)
    return lab.mean(0), np.maximum(lab.std(0), 1e-6)


@dataclass(frozen=True)
class StainTarget:
    """A fitted stain target. ``stain_matrix`` (2 rows: H, E unit optical-density vectors) and
    ``max_conc`` (99th-percentile concentrations) for macenko/vahadane; ``lab_mean``/``lab_std``
    (CIE Lab of tissue pixels) for reinhard; ``source`` and ``mpp`` (µm/px) say where from."""

    method: str
    stain_matrix: tuple[tuple[float, ...], ...] | None = None
    max_conc: tuple[float, ...] | None = None
    lab_mean: tuple[float, ...] | None = None
    lab_std: tuple[float, ...] | None = None
    source: str = ""
    mpp: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"--stain-norm must be one of {', '.join(METHODS)}, got {self.method!r}"
            )
        need = (
            ("lab_mean", "lab_std") if self.method == "reinhard" else ("stain_matrix", "max_conc")
        )
        if any(getattr(self, k) is None for k in need):
            raise ConfigError(f"a {self.method} stain target needs {' and '.join(need)}")

    @classmethod
    def fit(
        cls, method: str, rgb: np.ndarray, source: str = "", mpp: float | None = None
    ) -> StainTarget:
        """Fit ``method`` to the tissue pixels of ``rgb`` ((..., 3) uint8).

        Raises:
            ConfigError: unknown method, or fewer than 64 tissue pixels.
        """
        if method not in METHODS:
            raise ConfigError(f"--stain-norm must be one of {', '.join(METHODS)}, got {method!r}")
        px = np.asarray(rgb, np.uint8).reshape(-1, 3)
        od = optical_density(px)
        tissue = _tissue(px, od)
        if tissue.sum() < MIN_TISSUE_PX:
            raise ConfigError(
                f"stain target {source or 'image'} has {int(tissue.sum())} stained pixels; "
                "pass a --stain-target with tissue"
            )
        if method == "reinhard":
            mean, std = _lab_stats(_subsample(px[tissue], 1_000_000))
            return cls(method, lab_mean=_tup(mean), lab_std=_tup(std), source=source, mpp=mpp)
        m, conc = _stains(method, od[tissue])
        mx = np.percentile(conc, 99, axis=0)
        return cls(method, tuple(_tup(r) for r in m), _tup(mx), source=source, mpp=mpp)

    @property
    def tag(self) -> str:
        """``method:hash`` (12 hex of the fitted numbers): names this target in file attributes."""
        import hashlib

        nums = {k: v for k, v in asdict(self).items() if k not in ("source", "mpp")}
        digest = hashlib.sha1(json.dumps(nums, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.method}:{digest}"

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write this target to ``path`` (JSON) and return the path."""
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict) -> StainTarget:
        """The target of ``data`` (what :func:`dataclasses.asdict` or the JSON file hold)."""

        def tup(key: str, v: object) -> object:
            if not isinstance(v, list):
                return v
            return tuple(map(tuple, v)) if key == "stain_matrix" else tuple(v)

        return cls(**{k: tup(k, v) for k, v in data.items()})

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> StainTarget:
        """The target saved at ``path``. Raises ConfigError naming the file when it is not one."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"{path} is not a stain target JSON ({exc}); refit it with --stain-target IMAGE"
            ) from exc


def _tup(a: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in a)


class StainNormalizer:
    """Map (H, W, 3) uint8 patches to ``target``'s stain statistics; (H, W, 3) uint8 out.

    Background pixels and patches with fewer than 64 tissue pixels are returned unchanged.
    """

    def __init__(self, target: StainTarget) -> None:
        self.target = target
        if target.method != "reinhard":
            self._m = np.asarray(target.stain_matrix, np.float64)
            self._mx = np.asarray(target.max_conc, np.float64)

    def __call__(self, patch: np.ndarray) -> np.ndarray:
        if patch.dtype != np.uint8 or patch.ndim != 3 or patch.shape[-1] != 3:
            raise ConfigError(
                f"stain normalisation needs (H, W, 3) uint8, got {patch.dtype} {patch.shape}"
            )
        od = optical_density(patch)
        tissue = _tissue(patch, od)
        if tissue.sum() < MIN_TISSUE_PX:
            return patch.copy()
        out = patch.copy()
        if self.target.method == "reinhard":
            px = patch[tissue]
            mean, std = _lab_stats(px)
            lab = rgb2lab(px.reshape(-1, 1, 3)).reshape(-1, 3)
            lab = (lab - mean) / std * np.asarray(self.target.lab_std) + np.asarray(
                self.target.lab_mean
            )
            with warnings.catch_warnings():  # out-of-gamut values are clipped, as intended
                warnings.simplefilter("ignore", UserWarning)
                rgb = lab2rgb(lab.reshape(-1, 1, 3)).reshape(-1, 3)
            out[tissue] = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
            return out
        _, conc = _stains(self.target.method, od[tissue])
        scale = self._mx / np.maximum(np.percentile(conc, 99, axis=0), 1e-6)
        out[tissue] = _from_od((conc * scale) @ self._m)
        return out


_IMAGES = (".png", ".jpg", ".jpeg", ".bmp")


def _target_pixels(path: Path, mpp: float | None, backend: str) -> np.ndarray:
    """Pixels to fit on: a whole image file, or up to 8 of the most tissue-covered 512 px grid
    patches (smaller for a small slide) of a slide read at ``mpp`` µm/px (None: level 0)."""
    from slidestream.io import open_slide
    from slidestream.sampling import GridPatchSampler, PatchLocation
    from slidestream.tissue import detect_tissue

    if path.suffix.lower() in _IMAGES:
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    slide = open_slide(path, backend=backend)
    scale = slide.mpp[0] / mpp if mpp and slide.mpp else 1.0  # level-0 px → output px
    size = int(max(16, min(512, min(slide.dimensions) * scale)))  # small slides: smaller tiles
    sampler = GridPatchSampler(size, mpp, min_tissue=0.25, cover_edges=False)
    locs = sampler.locations(slide, detect_tissue(slide, cache_dir=None))
    if len(locs) == 0:
        raise ConfigError(f"no tissue found in stain target {path}; pass another --stain-target")
    best = locs[np.argsort(-locs[:, 2], kind="stable")[:8]]
    return np.stack([sampler.read(slide, PatchLocation(int(x), int(y), 1.0)) for x, y, _ in best])


def load_stain_target(
    method: str | None,
    target: str | os.PathLike[str] | None,
    *,
    mpp: float | None = None,
    backend: str = "auto",
    save_to: str | os.PathLike[str] | None = None,
) -> StainNormalizer | None:
    """What ``--stain-norm METHOD --stain-target PATH`` ask for: None when neither is given.

    ``target`` is a saved target ``.json`` (its method must agree with ``method`` when both are
    given), an image, or a slide (tissue at ``mpp`` µm/px). The target is written to
    ``save_to/stain.json`` when ``save_to`` is given.

    Raises:
        ConfigError: one option without the other, an unknown method, or a target that cannot
            be read or holds no tissue.
    """
    if method is None and target is None:
        return None
    path = Path(target) if target is not None else None
    if path is None or (method is None and path.suffix != ".json"):
        raise ConfigError(
            "--stain-norm and --stain-target go together (or --stain-target FILE.json)"
        )
    if not path.is_file():
        raise ConfigError(f"stain target {path} not found; pass an image, a slide or a stain.json")
    if path.suffix == ".json":
        fitted = StainTarget.from_json(path)
        if method is not None and fitted.method != method:
            raise ConfigError(f"{path} is a {fitted.method} target, not {method}; refit it")
    else:
        fitted = StainTarget.fit(str(method), _target_pixels(path, mpp, backend), str(path), mpp)
    if save_to is not None:
        Path(save_to).mkdir(parents=True, exist_ok=True)
        fitted.to_json(Path(save_to) / "stain.json")
    log.info("stain normalisation: %s to %s", fitted.method, fitted.source or path)
    return StainNormalizer(fitted)
