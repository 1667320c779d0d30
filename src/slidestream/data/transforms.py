"""Augmentations for pathology patches, as torchvision v2 transforms on (C, H, W) uint8 tensors.

They compose with any torchvision v2 transform (``v2.Compose``, ``v2.RandomApply``,
``v2.ElasticTransform``, ...). Patches stay uint8 through augmentation so workers hand the main
process 4x fewer bytes than float32; convert and normalise on the device (see
:func:`slidestream.data.functional.normalize`).

A single (3, H, W) uint8 patch on the CPU, what a DataLoader worker holds, takes an OpenCV path
(SIMD kernels, one call per step); batches, other dtypes and GPU tensors take the torch path. Both
give the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from skimage.color import hed_from_rgb, rgb_from_hed  # Ruifrok & Johnston stain vectors
from torchvision import tv_tensors
from torchvision.transforms import v2

from slidestream.errors import ConfigError

__all__ = [
    "RandomFlipRot90",
    "HEDJitter",
    "CoarseElastic",
    "StainNormalize",
    "MultiView",
    "default_augmentation",
]

_LOG256 = float(np.log(256.0))
_LOG_LUT = np.log(np.arange(256, dtype=np.float32) + 1).reshape(1, 256)
# torch.rot90(x, k, dims=(-2, -1)), then .flip(-1) if flip, as one OpenCV call writing into dst
_SYMMETRY = {
    (0, True): lambda a, d: cv2.flip(a, 1, dst=d),
    (1, False): lambda a, d: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE, dst=d),
    (1, True): lambda a, d: cv2.flip(cv2.transpose(a), -1, dst=d),
    (2, False): lambda a, d: cv2.rotate(a, cv2.ROTATE_180, dst=d),
    (2, True): lambda a, d: cv2.flip(a, 0, dst=d),
    (3, False): lambda a, d: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE, dst=d),
    (3, True): lambda a, d: cv2.transpose(a, dst=d),
}


def _cv_patch(inpt: Any) -> np.ndarray | None:
    """The (3, H, W) uint8 numpy view of a single contiguous CPU patch, or None (use torch)."""
    if type(inpt) is not torch.Tensor and not isinstance(inpt, tv_tensors.Image):
        return None
    if inpt.dtype != torch.uint8 or inpt.ndim != 3 or inpt.shape[0] != 3:
        return None
    if inpt.device.type != "cpu" or not inpt.is_contiguous():
        return None
    return inpt.as_subclass(torch.Tensor).numpy()


def _wrap(out: np.ndarray | torch.Tensor, like: Any) -> Any:
    out = torch.from_numpy(out) if isinstance(out, np.ndarray) else out
    return tv_tensors.wrap(out, like=like) if isinstance(like, tv_tensors.TVTensor) else out


def _planes(chw: np.ndarray) -> list[np.ndarray]:
    return [chw[0], chw[1], chw[2]]


class _PatchTransform(v2.Transform):
    """A v2 transform that skips v2's input flattening for the common call, one plain tensor
    (~20 µs a call, a tenth of a patch's augmentation); anything else goes through v2.

    ``hwc(pixels)`` applies it to an (H, W, 3) uint8 array, as a reader returns it, with the same
    random draw and the same pixels as ``to_chw(hwc(pixels)) == self(to_chw(pixels))``: a
    worker then converts to CHW once, after augmentation, instead of around every step.
    """

    def forward(self, *inputs: Any) -> Any:
        if len(inputs) == 1 and type(inputs[0]) is torch.Tensor:
            return self.transform(inputs[0], self.make_params(list(inputs)))
        return super().forward(*inputs)

    def hwc(self, pixels: np.ndarray) -> np.ndarray:
        return self._transform_hwc(pixels, self.make_params([]))  # defined by each subclass


def split_hwc(transform: Any) -> tuple[list[_PatchTransform], Any]:
    """``transform`` as (leading steps that run on HWC arrays, the rest or None): a transform of
    ours, or the first steps of a ``v2.Compose`` of them. Subclasses take the tensor path, since
    they may override ``transform``."""
    steps = list(transform.transforms) if type(transform) is v2.Compose else [transform]
    n = 0
    while n < len(steps) and type(steps[n]) in (HEDJitter, RandomFlipRot90):
        n += 1
    if n == 0:
        return [], transform
    rest = steps[n:]
    return steps[:n], (None if not rest else rest[0] if len(rest) == 1 else v2.Compose(rest))


class RandomFlipRot90(_PatchTransform):
    """One of the 8 symmetries of the square (flips and 90° rotations), exact on pixels."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        draw = int(torch.randint(8, ()))
        return {"k": draw % 4, "flip": draw >= 4}

    def _transform_hwc(self, pixels: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        k, flip = params["k"], params["flip"]
        return _SYMMETRY[k, flip](pixels, None) if k or flip else pixels

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor):
            return inpt
        k, flip = params["k"], params["flip"]
        if (chw := _cv_patch(inpt)) is not None:  # per plane in OpenCV: ~8x faster than torch
            if k == 0 and not flip:
                return inpt
            c, h, w = chw.shape
            out = np.empty((c, w, h) if k % 2 else (c, h, w), np.uint8)
            for plane, dst in zip(_planes(chw), _planes(out), strict=True):
                _SYMMETRY[k, flip](plane, dst)
            return _wrap(out, inpt)
        out = torch.rot90(inpt, k, dims=(-2, -1))
        return out.flip(-1) if flip else out


class HEDJitter(_PatchTransform):
    """Stain augmentation in haematoxylin-eosin-DAB space (Tellez et al. 2018).

    Each stain's optical density is scaled by ``U(1 - sigma, 1 + sigma)`` and shifted by
    ``U(-bias, bias)``; the whole transform is one 3x3 matrix and offset in optical-density space,
    applied in float32 (0.12 ms per 256² patch here with OpenCV, ~25x cheaper than skimage's
    float64 round trip).
    """

    def __init__(self, sigma: float = 0.05, bias: float = 0.05) -> None:
        super().__init__()
        if sigma < 0 or bias < 0:
            raise ConfigError(f"sigma and bias must be >= 0, got {sigma}, {bias}")
        self.sigma, self.bias = sigma, bias
        self._basis: tuple[tuple[float, float], np.ndarray, np.ndarray] | None = None

    def affine(self, draw: np.ndarray) -> np.ndarray:
        """The (3, 4) float64 map [M | c] with log(256 exp(-od')) = M log(I + 1) + c, for a draw
        of 6 numbers in [-1, 1): stain scales 1 + sigma * draw[:3], shifts bias * draw[3:]."""
        alpha, beta = 1.0 + draw[:3] * self.sigma, draw[3:] * self.bias
        matrix = (hed_from_rgb * alpha) @ rgb_from_hed  # od' = od @ matrix + beta @ rgb_from_hed
        # column form with od = log(256) - log(I + 1): od' = offset - matrix.T @ log(I + 1)
        offset = matrix.sum(0) * _LOG256 + beta @ rgb_from_hed
        # OpenCV form: log(256 * exp(-od')) = [matrix.T | log(256) - offset] @ [log(I + 1); 1]
        return np.concatenate([matrix.T, (_LOG256 - offset)[:, None]], 1)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        draw = torch.rand(6, dtype=torch.float64).numpy() * 2 - 1  # torch RNG, as v2 does
        # the map is linear in the draw: base + draw @ basis, one small product per patch
        key = (self.sigma, self.bias)
        if getattr(self, "_basis", None) is None or self._basis[0] != key:  # type: ignore[index]
            base = self.affine(np.zeros(6))
            basis = np.stack([(self.affine(e) - base).ravel() for e in np.eye(6)])
            self._basis = key, base.ravel(), basis
        _, base, basis = self._basis
        return {"affine": (base + draw @ basis).reshape(3, 4).astype(np.float32)}

    def _transform_hwc(self, pixels: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        # log(256 exp(-od')) from log(I + 1), then in place: kept >= 0 so that the rounded
        # |256 exp(-od') - 1| of convertScaleAbs is the value
        rgb = cv2.transform(cv2.LUT(pixels, _LOG_LUT), params["affine"])
        cv2.threshold(rgb, 0, 0, cv2.THRESH_TOZERO, dst=rgb)
        return cv2.convertScaleAbs(cv2.exp(rgb, dst=rgb), alpha=1.0, beta=-1.0)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or isinstance(inpt, tv_tensors.Mask):
            return inpt
        if inpt.dtype != torch.uint8 or inpt.shape[-3] != 3:
            raise ConfigError(
                f"HEDJitter expects (..., 3, H, W) uint8 RGB, got {tuple(inpt.shape)} "
                f"{inpt.dtype}; put it before ToDtype/Normalize"
            )
        if (chw := _cv_patch(inpt)) is not None:
            # 0.12 ms per 256² patch here, against 0.45 ms for the torch path below
            rgb = self._transform_hwc(cv2.merge(_planes(chw)), params)
            out = np.empty_like(chw)
            cv2.split(rgb, _planes(out))
            return _wrap(out, inpt)
        shape, affine = inpt.shape, torch.from_numpy(params["affine"]).to(inpt.device)
        # log(I + 1) rather than log1p: torch's log is vectorised, its log1p ~15x slower on CPU
        log_i = inpt.reshape(-1, 3, shape[-2] * shape[-1]).float().add_(1.0).log_()
        log_rgb = torch.matmul(affine[:, :3], log_i).add_(affine[:, 3:])  # log(256 exp(-od'))
        # 256 * exp(-od') - 1, rounded: +0.5 then truncation
        rgb = log_rgb.exp_().sub_(0.5).clamp_(0, 255)
        return _wrap(rgb.to(torch.uint8).reshape(shape), inpt)


class CoarseElastic(v2.Transform):
    """Elastic deformation for images of any size (whole slides), in bounded memory.

    Random displacements (normal, ``sigma`` px) are drawn on a coarse grid of control points
    ``spacing`` px apart and interpolated bicubically to every pixel, the method of the
    ``elasticdeform`` package (van Tulder); the image is then resampled bilinearly in bands of
    ``band`` rows with :func:`torch.nn.functional.grid_sample`, so the extra memory is that of one
    band, not of full-size displacement fields. Pixels pulled from outside the image are ``fill``
    (white for uint8: background for the streaming engine; pass ``fill=1.0`` for float images in
    [0, 1]). torchvision's ``ElasticTransform`` blurs a
    full-size random field instead, which costs seconds and gigabytes on a 16k² image.
    """

    def __init__(
        self, sigma: float = 8.0, spacing: int = 256, fill: int = 255, band: int = 512
    ) -> None:
        super().__init__()
        if sigma < 0 or spacing < 2 or band < 1:
            raise ConfigError(
                f"need sigma >= 0, spacing >= 2 and band >= 1, got {sigma}, {spacing}, {band}"
            )
        self.sigma, self.spacing, self.fill, self.band = sigma, spacing, fill, band

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.functional.get_size(flat_inputs[0])
        gh, gw = h // self.spacing + 2, w // self.spacing + 2
        return {"grid": torch.randn(1, 2, gh, gw) * self.sigma}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or self.sigma == 0:
            return inpt
        if isinstance(inpt, (tv_tensors.Mask, tv_tensors.BoundingBoxes)):
            return inpt  # an image-only deformation
        import torch.nn.functional as F

        *lead, c, h, w = inpt.shape
        img = inpt.reshape(1, -1, h, w)
        out = torch.empty_like(img)
        dev = img.device
        px = torch.arange(w, dtype=torch.float32, device=dev)
        grid = params["grid"].to(dev)
        for y0 in range(0, h, self.band):
            y1 = min(h, y0 + self.band)
            rows = torch.arange(y0, y1, dtype=torch.float32, device=dev)
            disp = _bicubic_rows(grid, rows / max(h - 1, 1) * 2 - 1, w)  # (2, n, w) px
            sx, sy = px[None, :] + disp[0], rows[:, None] + disp[1]  # source pixel coordinates
            # only the source rows this band reads are converted to float; one zero (= fill)
            # pixel of padding on every side makes the strip behave like the whole image at
            # its edges, also when it is a single row or column
            r0 = int(sy.min().floor().clamp(0, h - 1))
            r1 = int(sy.max().ceil().clamp(0, h - 1)) + 1
            src = F.pad(img[:, :, r0:r1].float().sub_(self.fill), (1, 1, 1, 1))
            gx = (sx + 1) * (2 / (w + 1)) - 1
            gy = (sy - r0 + 1) * (2 / (r1 - r0 + 1)) - 1
            band = F.grid_sample(
                src,
                torch.stack((gx, gy), -1)[None],
                mode="bilinear",
                padding_mode="zeros",  # outside the image: fill
                align_corners=True,
            ).add_(self.fill)
            if not img.dtype.is_floating_point:
                band = band.round_().clamp_(0, 255 if img.dtype == torch.uint8 else None)
            out[:, :, y0:y1] = band.to(img.dtype)
        out = out.reshape(*lead, c, h, w)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def _bicubic_rows(grid: torch.Tensor, rows: torch.Tensor, w: int) -> torch.Tensor:
    """Bicubic interpolation of a (1, 2, gh, gw) control grid at normalised ``rows`` and ``w``
    evenly spaced columns: (2, len(rows), w)."""
    import torch.nn.functional as F

    xs = torch.linspace(-1, 1, w, device=rows.device) if w > 1 else rows.new_zeros(1)
    sample = torch.stack(torch.broadcast_tensors(xs[None, :], rows[:, None]), -1)[None]
    return F.grid_sample(grid, sample, mode="bicubic", padding_mode="border", align_corners=True)[0]


class StainNormalize(v2.Transform):
    """Stain normalisation of (3, H, W) or (N, 3, H, W) uint8 tensors to a target, uint8 out.

    ``target``: a fitted :class:`~slidestream.data.stain.StainTarget`, or an (H, W, 3) uint8
    RGB array to fit ``method`` (``"macenko"``, ``"reinhard"`` or ``"vahadane"``) on. See
    :mod:`slidestream.data.stain` (background pixels stay as they are).
    """

    def __init__(self, target: Any, method: str = "macenko") -> None:
        super().__init__()
        from slidestream.data.stain import StainNormalizer, StainTarget

        if not isinstance(target, StainTarget):
            target = StainTarget.fit(method, np.asarray(target))
        self.method = target.method
        self.normalizer = StainNormalizer(target)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or inpt.dtype != torch.uint8:
            return inpt
        x = inpt.as_subclass(torch.Tensor).cpu()
        flat = x.reshape(-1, *x.shape[-3:]).permute(0, 2, 3, 1).numpy()
        out = np.stack([self.normalizer(np.ascontiguousarray(p)) for p in flat])
        res = torch.from_numpy(out).permute(0, 3, 1, 2).reshape(x.shape).to(inpt.device)
        return tv_tensors.wrap(res, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else res


class MultiView:
    """Several augmented views of one patch, e.g. 2 global + 6 local crops for DINO-style
    self-supervised training. ``global_transform``/``local_transform`` run after the crops."""

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_global: int = 2,
        n_local: int = 6,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_scale: Sequence[float] = (0.05, 0.4),
        global_transform: Any = None,
        local_transform: Any = None,
    ) -> None:
        if n_global < 0 or n_local < 0 or n_global + n_local == 0:
            raise ConfigError("MultiView needs at least one view")
        aug = default_augmentation()
        self.global_crop = v2.Compose(
            [
                v2.RandomResizedCrop(global_size, tuple(global_scale), antialias=True),
                global_transform or aug,
            ]
        )
        self.local_crop = v2.Compose(
            [
                v2.RandomResizedCrop(local_size, tuple(local_scale), antialias=True),
                local_transform or aug,
            ]
        )
        self.n_global, self.n_local = n_global, n_local

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [self.global_crop(image) for _ in range(self.n_global)] + [
            self.local_crop(image) for _ in range(self.n_local)
        ]


def default_augmentation(strength: str = "light") -> v2.Transform:
    """Augmentations that keep the physical scale: ``"light"`` (symmetries + HED jitter) or
    ``"strong"`` (also brightness/contrast/saturation/hue jitter, blur and elastic deformation)."""
    # HED first: it then reads a contiguous patch, and the symmetries stay cheap views
    ops: list[v2.Transform] = [HEDJitter(0.05, 0.05), RandomFlipRot90()]
    if strength == "strong":
        ops += [
            v2.ColorJitter(0.15, 0.15, 0.1, 0.02),
            v2.RandomApply([v2.GaussianBlur(5, (0.1, 1.5))], p=0.2),
            v2.RandomApply([v2.ElasticTransform(alpha=30.0, sigma=6.0)], p=0.2),
        ]
    elif strength != "light":
        raise ConfigError(f"strength must be 'light' or 'strong', got {strength!r}")
    return v2.Compose(ops)
