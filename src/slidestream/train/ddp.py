"""DDP under torchrun, the standard way: one process group (NCCL on GPUs, Gloo on CPU), one
flattened all-reduce of the gradients per optimizer step, a collective timeout in minutes and a
Gloo side group whose monitored barrier names the rank that stopped answering."""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
from torch import nn

from slidestream.errors import SlideStreamError

__all__ = ["all_gather", "all_reduce_grads", "barrier", "distributed", "sum_values"]

log = logging.getLogger(__name__)
_MONITOR: dict[str, Any] = {}


def distributed(device: torch.device | None = None, timeout_min: float = 10.0) -> tuple[int, int]:
    """(rank, world size) under torchrun, initialising the process group once: NCCL when the
    ranks train on CUDA ``device``s, Gloo otherwise (``--device cpu`` on a GPU machine too).
    Collectives give up after ``timeout_min`` minutes instead of hanging for half an hour."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        timeout = datetime.timedelta(minutes=timeout_min)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        _MONITOR["timeout"] = timeout
        if cuda:  # NCCL has no monitored barrier: a small Gloo group reports silent ranks
            _MONITOR["group"] = dist.new_group(backend="gloo", timeout=timeout)
    return dist.get_rank(), world


def barrier(world: int, what: str = "") -> None:
    """Wait for every rank; on a silent rank, raise naming it (rank 0 learns which one)."""
    if world == 1:
        return
    import torch.distributed as dist

    try:
        dist.monitored_barrier(
            group=_MONITOR.get("group"),
            timeout=_MONITOR.get("timeout", datetime.timedelta(minutes=10)),
        )
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())
        raise SlideStreamError(
            f"DDP: a rank stopped answering{' ' + what if what else ''}: {msg[:300]}"
        ) from exc


def all_reduce_grads(model: nn.Module, world: int) -> None:
    """Sum the gradients of every trainable parameter over the ranks in one flattened
    all-reduce (missing gradients count as zero)."""
    if world == 1:
        return
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for dtype in {g.dtype for g in grads}:
        same = [(p, g) for p, g in zip(params, grads, strict=True) if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for _, g in same])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in same:
            summed = flat[offset : offset + g.numel()].view_as(g)
            if p.grad is None:
                p.grad = summed.clone()
            else:
                p.grad.copy_(summed)
            offset += g.numel()


def sum_values(values: list[float], device: torch.device, world: int) -> list[float]:
    """Element-wise sum of a few numbers over the ranks."""
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather(obj: Any, world: int) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out
