"""Array and tensor helpers of the loader: layout in the workers, normalisation on the device."""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np
import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalize", "resolve_device", "to_chw"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_chw(pixels: np.ndarray) -> np.ndarray:
    """(H, W, C) → contiguous (C, H, W); OpenCV's split is ~8x faster than a transposed copy."""
    h, w, c = pixels.shape
    if c > 4 or not pixels.flags.c_contiguous:
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))
    out = np.empty((c, h, w), pixels.dtype)
    cv2.split(pixels, list(out))
    return out


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 (N, 3, H, W) batch → normalised float on ``device`` (moved as uint8, 4x fewer bytes)."""
    x = images.to(device, non_blocking=True) if device is not None else images
    x = x.to(dtype).div_(255.0)
    m = torch.as_tensor(mean, dtype=dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=dtype, device=x.device).view(-1, 1, 1)
    x = x.sub_(m).div_(s)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as ``torch.device(name)``.

    Under torchrun (``LOCAL_RANK`` set) a CUDA device without an index is this process's own GPU,
    ``cuda:LOCAL_RANK``, made the current device, so that ranks do not all land on GPU 0.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    local_rank = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", int(local_rank))
    if device.type == "cuda" and device.index is not None and torch.cuda.is_available():
        torch.cuda.set_device(device)
    return device
