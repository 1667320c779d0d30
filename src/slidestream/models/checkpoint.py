"""Checkpoints: one format for patch classifiers and streamed slide classifiers.

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts only) so that it loads with
``torch.load(..., weights_only=True)``. It records everything inference needs — model name,
number of classes and class names, mpp, patch/tile size, normalisation — so ``predict`` needs no
extra flags. Files are written atomically (temporary file, fsync, rename): an interrupted run
never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from slidestream.errors import ConfigError

__all__ = ["FORMAT", "VERSION", "clean_stale_temps", "save_checkpoint", "load_checkpoint"]

FORMAT = "slidestream-checkpoint"
VERSION = 1
_REQUIRED = ("kind", "model", "state_dict", "classes")


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` (plus format and version) to ``path`` atomically: a temporary file
    named with this process's id, fsync, rename (see :func:`clean_stale_temps`)."""
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ConfigError(f"checkpoint state lacks {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle/zip errors on truncated or foreign files
        raise ConfigError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a slidestream checkpoint")
    if state.get("version", 0) > VERSION:
        raise ConfigError(f"{path} was written by a newer slidestream (format {state['version']})")
    return state


def clean_stale_temps(folder: str | os.PathLike[str]) -> int:
    """Delete temporary files (``.NAME.PID.<random>.tmp``) left in ``folder`` by writers that were
    killed: those whose process is gone. Returns how many were removed."""
    import psutil

    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        parts = tmp.name.split(".")
        pid = next((int(p) for p in parts[2:-1] if p.isdigit()), None)
        if pid is not None and pid != os.getpid() and psutil.pid_exists(pid):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed
