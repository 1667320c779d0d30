"""The package's layers import only to their left (see ../shared/STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "slidestream"

# rank of each top-level part; a module may import parts of lower or equal rank only
RANK = {
    "_version": 0,
    "_lazy": 0,
    "parallel": 0,
    "errors": 0,
    "types": 0,
    "charts": 0,
    "colors": 0,
    "io": 1,
    "synthetic": 1,
    "tissue": 2,
    "sampling": 3,
    "data": 4,
    "streaming": 5,
    "models": 6,
    "train": 7,
    "infer": 7,
    "cli": 8,
    "demo": 8,
}
# pairs that must not import each other: the streaming engine reads no slides, and inference
# needs nothing from training (the model, its rebuild and the checkpoint format are in models)
FORBIDDEN = {("streaming", "io"), ("infer", "train"), ("train", "infer")}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "slidestream" else None


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    pkg = "slidestream." + ".".join(path.relative_to(SRC).with_suffix("").parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level)[0]
                found.append(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                found.append(node.module)
    return found


def _modules() -> list[Path]:
    return [
        p for p in SRC.rglob("*.py") if p.parent != SRC or p.stem not in ("__init__", "__main__")
    ]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_follow_layer_order(path):
    rel = path.relative_to(SRC)
    me = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    assert me in RANK, f"{rel}: add its top-level part to RANK in tests/test_layers.py"
    for target in _imports(path):
        other = _part(target)
        if other is None or other == me:
            continue
        assert other in RANK, f"{rel} imports unknown part {target}"
        assert RANK[other] <= RANK[me], f"{rel} imports {target}: {other} is right of {me}"
        assert (me, other) not in FORBIDDEN, f"{rel} imports {target}: {me} must not use {other}"


def test_checker_bites(tmp_path, monkeypatch):
    """The checker must flag a wrong-way import (io importing cli)."""
    fake = tmp_path / "slidestream" / "io"
    fake.mkdir(parents=True)
    bad = fake / "bad.py"
    bad.write_text("from slidestream.cli import main\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path / "slidestream")
    with pytest.raises(AssertionError, match="right of"):
        test_imports_follow_layer_order(bad)
