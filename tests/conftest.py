"""Shared fixtures: synthetic slides generated once per test session, and the real test files."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from slidestream.io import open_slide  # noqa: E402
from slidestream.synthetic import write_synthetic_slide  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _shared_data() -> Path | None:
    env = os.environ.get("SLIDESTREAM_TEST_DATA")
    for candidate in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data"]:
        if candidate.is_dir():
            return candidate
    return None


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """Two threads on a busy 2-core machine made steps ~15x slower: tests use one."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep tissue-mask caches out of the user's home."""
    os.environ["SLIDESTREAM_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$SLIDESTREAM_TEST_DATA``); tests using it skip when absent."""
    path = _shared_data()
    if path is None:
        pytest.skip("real test files not found (../shared/data or $SLIDESTREAM_TEST_DATA)")
    return path


@pytest.fixture(scope="session")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic slides, written once per session.

    - ``pyramid``: 2048x1536, 0.5 µm/px, tumour regions, sizes divisible by the downsamples
    - ``odd``: 3001x2003 generic TIFF, 0.25 µm/px (levels of floor-rounded sizes)
    - ``aperio``: 1501x1203 Aperio-style SVS, 0.499 µm/px
    - ``nompp``: 1200x900 TIFF without a usable resolution
    - ``png`` / ``rgba``: plain images (the RGBA one has a transparent hole)
    """
    d = tmp_path_factory.mktemp("slides")
    out = {
        "pyramid": write_synthetic_slide(
            d / "pyramid.tiff", 2048, 1536, mpp=0.5, seed=1, tumour=True
        ),
        "odd": write_synthetic_slide(d / "odd.tiff", 3001, 2003, mpp=0.25, seed=2),
        "aperio": write_synthetic_slide(
            d / "aperio.svs", 1501, 1203, mpp=0.499, seed=3, aperio=True
        ),
        "nompp": write_synthetic_slide(
            d / "nompp.tiff", 1200, 900, mpp=0.5, seed=4, write_mpp=False
        ),
    }
    rgb = open_slide(out["pyramid"]).read(0, 0, 800, 600)
    Image.fromarray(rgb).save(d / "plain.png")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[100:200, 100:300, 3] = 0
    rgba[100:200, 100:300, :3] = 0  # transparent black must come out white
    Image.fromarray(rgba).save(d / "rgba.png")
    out["png"], out["rgba"] = d / "plain.png", d / "rgba.png"
    out["small"] = write_synthetic_slide(d / "small.tiff", 1024, 768, mpp=0.5, seed=5)
    out["tumour2"] = write_synthetic_slide(
        d / "tumour2.tiff", 1024, 1024, mpp=0.5, seed=6, tumour=True
    )
    return out


@pytest.fixture(scope="session")
def three_class_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cohort CSV of 9 small slides, 3 per texture (normal, tumour, inflamed), 1 µm/px."""
    d = tmp_path_factory.mktemp("three")
    rows = []
    for i in range(9):
        texture = ("normal", "tumour", "inflamed")[i % 3]
        path = write_synthetic_slide(
            d / f"s{i}.tiff", 900, 700, mpp=1.0, seed=50 + i, texture=texture, tissue_fraction=0.6
        )
        rows.append(f"{path},{texture},patient{i},{('train', 'train', 'val')[i // 3]}")
    csv = d / "cohort.csv"
    csv.write_text("slide,label,patient,split\n" + "\n".join(rows) + "\n")
    return csv


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six prepared slides at 4 µm/px (odd index = tumour; s4, s5 validation): prepared.csv."""
    from slidestream.data.prepare import prepare_cohort
    from slidestream.sampling import load_cohort

    d = tmp_path_factory.mktemp("slides")
    rows = []
    for i in range(6):
        tumour = i % 2 == 1
        p = write_synthetic_slide(
            d / f"s{i}.tiff", 1024, 1024, mpp=1.0, seed=400 + i, tumour=tumour, tumour_fraction=0.3
        )
        split = "val" if i >= 4 else "train"
        rows.append(f"{p},{'tumour' if tumour else 'normal'},p{i},{split}")
    (d / "c.csv").write_text("slide,label,patient,split\n" + "\n".join(rows) + "\n")
    res = prepare_cohort(load_cohort(d / "c.csv"), d / "prep", 4.0, workers=1, progress=False)
    assert not res.failures
    return d / "prep" / "prepared.csv"
