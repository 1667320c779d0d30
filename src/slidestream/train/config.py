"""Configuration: dataclasses <-> YAML <-> command-line flags.

Every field of a config dataclass is also a ``--flag``; values come from the defaults, then the
YAML file, then the flags. The resolved config is written into every run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from slidestream.errors import ConfigError

__all__ = ["add_config_flags", "load_config", "save_config", "config_dict", "write_run_config"]

# first line of the config.yaml a run folder holds: its relative paths start at its own folder
RUN_CONFIG_HEADER = "# slidestream run config: relative paths are relative to this file's folder\n"
PATH_KEYS = ("data", "val_data", "features", "resume_from", "out")

T = TypeVar("T")


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_type(cls: type, f: dataclasses.Field) -> tuple[Any, bool]:
    """(base type, optional) of a field, resolving postponed annotations."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return hint, False


def field_help(cls: type) -> dict[str, str]:
    """Each field's meaning: the comment after it in the dataclass's source (one line)."""
    import inspect
    import re

    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#]*=[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--field`` for every field of the dataclass ``cls`` (default: not given), with the
    field's comment and default as help."""
    group = parser.add_argument_group("config (each overrides the YAML)")
    meaning = field_help(cls)
    for f in dataclasses.fields(cls):
        base, optional = _field_type(cls, f)
        conv = _parse_bool if base is bool else base if base in (int, float) else str
        if optional:
            conv = (lambda c: lambda s: None if s.lower() in ("none", "null", "") else c(s))(conv)
        default = f.default if f.default is not dataclasses.MISSING else "(required)"
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"cfg_{f.name}",
            type=conv,
            metavar=f.name.upper(),
            default=argparse.SUPPRESS,
            help=f"{meaning.get(f.name, '')} (default: {default})".strip().replace("%", "%%"),
        )


def load_config(
    cls: type[T],
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> T:
    """Defaults ← YAML file ← overrides, checked against the dataclass fields."""
    import yaml  # here, not at the top: the CLI builds its parser from this module

    values: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
            loaded = yaml.safe_load(text) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of settings")
        if text.startswith(RUN_CONFIG_HEADER):  # a run folder's own config.yaml
            loaded = _resolved_paths(loaded, Path(path).parent)
        values.update(loaded)
    values.update(overrides or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(names)}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"bad config: {exc}") from exc


def _resolved_paths(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    out = dict(values)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            out[key] = os.path.normpath(folder / value)
    return out


def write_run_config(run: str | os.PathLike[str], config: dict[str, Any]) -> Path:
    """Write ``run/config.yaml``: ``config`` with its paths (``data``, ``val_data``,
    ``features``, ``resume_from``, ``out``) relative to ``run`` where they lie inside the folder
    that holds the runs folder (see :func:`slidestream.train.runlog.portable_path`), so a moved
    project folder still finds its data; :func:`load_config` resolves them against ``run``."""
    import yaml

    from slidestream.train.runlog import portable_path

    run = Path(run)
    values = dict(config)
    for key in PATH_KEYS:
        if isinstance(values.get(key), str) and values[key]:
            values[key] = portable_path(values[key], run)
    path = run / "config.yaml"
    path.write_text(RUN_CONFIG_HEADER + yaml.safe_dump(values, sort_keys=False))
    return path


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")}


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain YAML/JSON/checkpoint-safe values."""
    out = dataclasses.asdict(cfg)
    return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


def save_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
    return path
