"""Compare streaming with conventional backprop on random data: errors, time and memory.

Errors are relative to the scale of the reference: for a tensor, ``max|g_stream - g_ref| /
max|g_ref|``; a group's error is the largest over its tensors.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slidestream.errors import StreamingError
from slidestream.streaming.engine import (
    StreamingModule,
    trunk_geometry,
)
from slidestream.streaming.memory import trim_heap
from slidestream.streaming.staged import StagedStreamingModule
from slidestream.streaming.tiling import output_shape

__all__ = ["NO_WORSE", "TOLERANCES", "check_streaming", "randomize_norms"]

logger = logging.getLogger(__name__)

#: Below float64, streaming passes when its error against a float64 reference is at most this
#: many times ordinary backprop's in the same dtype (crops round differently, not worse).
NO_WORSE = 2.0

#: Largest acceptable relative error of float64 streaming vs float64 backprop (and, for the
#: other dtypes, an informational scale of their rounding).
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.bfloat16: 5e-2,
    torch.float16: 2e-2,
}


def randomize_norms(trunk: nn.Module, seed: int = 0) -> None:
    """Give BatchNorm layers random running statistics and affine parameters (a harder test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in trunk.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                shape = mod.running_mean.shape
                mod.running_mean.copy_(torch.randn(shape, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(shape, generator=g) + 0.5)
                if mod.affine:
                    mod.weight.copy_(torch.randn(shape, generator=g))
                    mod.bias.copy_(torch.randn(shape, generator=g))


class _PeakMemory:
    """Peak memory increase in bytes over the start of a ``with`` block.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: resident set size sampled every 2 ms from
    ``/proc/self/statm`` (Linux; elsewhere 0) after returning freed heap pages to the OS.
    Sampling can miss peaks shorter than 2 ms.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def _sample(self, base: int) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss() - base)

    @contextmanager
    def measure(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - base
            return
        trim_heap()  # hand back what an earlier run freed, so it is not reused
        base = self._rss()
        thread = threading.Thread(target=self._sample, args=(base,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.peak = max(self.peak, self._rss() - base)


def _step(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, w: torch.Tensor, dev: torch.device
) -> tuple[torch.Tensor, float, int]:
    """One forward + backward of ``sum(fn(x) * w)``: (output, seconds, peak bytes)."""
    meter = _PeakMemory(dev)
    with meter.measure():
        t0 = time.perf_counter()
        out = fn(x)
        (out * w).sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
    return out.detach(), seconds, meter.peak


def _rel(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|)."""
    err = (a.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    return err, (err / scale if scale > 0 else err)


def _grads(trunk: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in trunk.named_parameters():
        if p.requires_grad:
            if p.grad is None:
                raise StreamingError(f"parameter {name} got no gradient")
            out[name] = p.grad.detach().clone()
            p.grad = None
    return out


def check_streaming(
    trunk: nn.Module,
    size: tuple[int, int] = (1536, 1213),
    tile: int | tuple[int, int] = 512,
    dtype: torch.dtype = torch.float64,
    batch: int = 2,
    seed: int = 0,
    device: str | torch.device = "cpu",
    randomize: bool = True,
    split_after: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run one training step of ``trunk`` conventionally and streamed, and compare.

    Args:
        trunk: the spatially local network (converted in place to ``dtype`` and ``device``).
        size: image (width, height) in px. tile: streaming tile size in px.
        randomize: give BatchNorm random running stats and affine parameters first.
        split_after: stream in stages cut after these children of a Sequential trunk.

    Errors are relative to a float64 reference: ordinary float64 backprop of the same trunk,
    weights and input (for ``dtype`` float64 the conventional run itself). Returns a dict with
    per-group gradient errors, output and input-gradient errors of streaming (and, below
    float64, ``conventional_max_rel`` of ordinary backprop in ``dtype`` beside each), time (s)
    and peak memory (MB) of both runs, ``tolerance`` and ``ok``: float64 passes within
    ``TOLERANCES[float64]``; other dtypes pass when streaming's largest error is at most
    ``NO_WORSE`` times ordinary backprop's in the same dtype (or 4 machine epsilons).
    """
    if dtype not in TOLERANCES:
        raise StreamingError(f"dtype must be one of {sorted(map(str, TOLERANCES))}, got {dtype}")
    if batch < 1 or min(size) < 1:
        raise StreamingError(f"batch and size must be positive, got batch={batch}, size={size}")
    dev = torch.device(device)
    torch.manual_seed(seed)
    trunk = trunk.to(device=dev, dtype=dtype)
    if randomize:
        randomize_norms(trunk, seed)
    x = torch.randn(batch, 3, size[1], size[0], dtype=dtype, device=dev, requires_grad=True)
    t0 = time.perf_counter()
    if split_after:
        smod = StagedStreamingModule(trunk, tile, list(split_after))
        plans = smod.plan(3, (size[1], size[0]))
    else:
        smod = StreamingModule(trunk, tile)
        plans = [smod.plan(3, (size[1], size[0]))]
    probe_s = time.perf_counter() - t0
    out_shape = output_shape(trunk, 3, (size[1], size[0]))
    w = torch.randn(batch, *out_shape, dtype=dtype, device=dev)

    out_s, time_s, mem_s = _step(smod, x, w, dev)
    g_s, xg_s = _grads(trunk), x.grad.clone()
    x.grad = None
    out_c, time_c, mem_c = _step(trunk, x, w, dev)
    g_c, xg_c = _grads(trunk), x.grad.clone()
    ref = (out_c, g_c, xg_c) if dtype == torch.float64 else _reference(trunk, x, w, dev)
    return _report(trunk, plans, dtype, (out_s, g_s, xg_s), (out_c, g_c, xg_c), ref, {
        "probe_s": probe_s,
        "streaming": {"time_s": time_s, "peak_mem_mb": mem_s / 2**20},
        "conventional": {"time_s": time_c, "peak_mem_mb": mem_c / 2**20},
        "size": list(size), "tile": tile, "batch": batch, "device": str(dev),
    })  # fmt: skip


def _reference(trunk: nn.Module, x: torch.Tensor, w: torch.Tensor, dev: torch.device):
    """Ordinary float64 backprop of a float64 copy on the same (rounded) weights and input."""
    ref64 = copy.deepcopy(trunk).to(torch.float64)
    x64 = x.detach().to(torch.float64).requires_grad_(True)
    out, _, _ = _step(ref64, x64, w.to(torch.float64), dev)
    return out, _grads(ref64), x64.grad


def _errors(got, ref) -> dict[str, Any]:
    """Per-group, output and input-gradient (max abs, max rel) errors of ``got`` vs ``ref``."""
    (out, grads, xg), (out_r, grads_r, xg_r) = got, ref
    groups: dict[str, dict[str, Any]] = {}
    for name, r in grads_r.items():
        group = name.split(".")[0] + "." + name.rsplit(".", 1)[-1]
        abs_err, rel_err = _rel(grads[name], r)
        entry = groups.setdefault(group, {"params": 0, "max_abs": 0.0, "max_rel": 0.0})
        entry["params"] += 1
        entry["max_abs"] = max(entry["max_abs"], abs_err)
        entry["max_rel"] = max(entry["max_rel"], rel_err)
    out_abs, out_rel = _rel(out, out_r)
    x_abs, x_rel = _rel(xg, xg_r)
    worst = max([out_rel, x_rel, *(g["max_rel"] for g in groups.values())])
    return {
        "output": {"max_abs": out_abs, "max_rel": out_rel},
        "input_grad": {"max_abs": x_abs, "max_rel": x_rel},
        "groups": groups,
        "max_rel_err": worst,
    }


def _report(trunk, plans, dtype, streamed, conventional, reference, extra) -> dict[str, Any]:
    """float64: streaming vs ordinary float64 backprop within ``TOLERANCES``. Other dtypes:
    streaming and ordinary backprop in ``dtype``, both vs the float64 reference; streaming
    passes when no worse than ``NO_WORSE`` times ordinary backprop's error (or ``4 eps``)."""
    errs = _errors(streamed, reference)
    tol = TOLERANCES[dtype]
    result = {"dtype": str(dtype).removeprefix("torch."), **errs}
    if dtype == torch.float64:
        result.update(tolerance=tol, ok=errs["max_rel_err"] <= tol, reference="float64")
    else:
        conv = _errors(conventional, reference)
        bound = max(NO_WORSE * conv["max_rel_err"], 4 * torch.finfo(dtype).eps)
        for name, g in result["groups"].items():
            g["conventional_max_rel"] = conv["groups"][name]["max_rel"]
        for name in ("output", "input_grad"):
            result[name]["conventional_max_rel"] = conv[name]["max_rel"]
        result.update(
            tolerance=bound,
            ok=errs["max_rel_err"] <= bound,
            reference="float64",
            conventional_max_rel_err=conv["max_rel_err"],
        )
    geom = trunk_geometry(trunk, 3)
    return {
        **result,
        "tiles": [len(p) for p in plans],
        "recompute_factor": [p.recompute_factor for p in plans],
        "receptive_field": [geom.y.receptive_field, geom.x.receptive_field],
        "stride": [geom.y.stride, geom.x.stride],
        **extra,
    }
