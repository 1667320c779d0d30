"""Slides and cohorts that yield nothing: named, counted, and a clear error when nothing at all."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import slidestream as ss
from slidestream.cli import main
from slidestream.data import PatchStream
from slidestream.data.database import build_patch_databases
from slidestream.sampling import GridPatchSampler, RandomPatchSampler, load_cohort


@pytest.fixture(scope="module")
def blanks(tmp_path_factory):
    """Two blank slides (glass with noise; near-black canvas) as PNGs, and a cohort CSV."""
    d = tmp_path_factory.mktemp("blank")
    rng = np.random.default_rng(0)
    glass = (243 + rng.normal(0, 2, (600, 800, 3))).clip(0, 255).astype(np.uint8)
    black = rng.integers(0, 12, (600, 800, 3), np.uint8)
    paths = [d / "glass.png", d / "black.png"]
    for p, img in zip(paths, [glass, black], strict=True):
        Image.fromarray(img).save(p)
    csv = d / "blank.csv"
    csv.write_text("slide,label,mpp\n" + "".join(f"{p.name},x,0.5\n" for p in paths))
    return paths, csv


def _mixed_csv(tmp_path, blanks, slides):
    csv = tmp_path / "mixed.csv"
    rows = [f"{p},x,0.5" for p in blanks[0]] + [f"{slides['pyramid']},y,"]
    csv.write_text("slide,label,mpp\n" + "\n".join(rows) + "\n")
    return csv


SAMPLER = RandomPatchSampler(64, mpp=1.0, min_tissue=0.5)


def test_stream_names_and_counts_blank_slides(blanks, slides, tmp_path, caplog, monkeypatch):
    import slidestream.tissue

    monkeypatch.setattr(slidestream.tissue, "_WARNED", set())  # once per process: forget
    stream = PatchStream(
        _mixed_csv(tmp_path, blanks, slides), SAMPLER, patches_per_slide=5, mask_dir=tmp_path
    )
    with caplog.at_level(logging.WARNING):
        items = list(stream)
    assert len(items) == 5 and {i["slide"] for i in items} == {str(slides["pyramid"])}
    assert stream.stats()["slides_empty"] == 2
    for p in blanks[0]:
        assert f"{p} gives no patches" in caplog.text
        assert f"{p}: no tissue found by tissue method 'otsu'" in caplog.text
    assert "tissue mask is empty" in caplog.text


def test_cli_tissue_flags_blank_slides(blanks, slides, tmp_path, capsys, caplog, monkeypatch):
    import slidestream.tissue

    monkeypatch.setattr(slidestream.tissue, "_WARNED", set())
    paths = [str(p) for p in blanks[0]]
    with caplog.at_level(logging.WARNING):
        code = main(["tissue", *paths, "--slide-mpp", "0.5", "--out", str(tmp_path / "t")])
    out = capsys.readouterr().out
    assert code == 0 and "no tissue" in out
    assert "2 slide(s) with an empty or near-empty tissue mask: glass.png, black.png" in out
    assert f"{paths[0]}: no tissue found" in caplog.text


@pytest.mark.parametrize("finite", [False, True])
def test_stream_of_blank_slides_raises(blanks, tmp_path, finite):
    stream = PatchStream(
        blanks[1], SAMPLER, patches_per_slide=5 if finite else None, mask_dir=tmp_path
    )
    with pytest.raises(ss.NoPatchesError, match="glass.png") as info:
        next(iter(stream))
    assert "black.png" in str(info.value) and "min_tissue" in str(info.value)
    assert "\n" not in str(info.value)


def test_stream_of_blank_slides_raises_through_workers(blanks, tmp_path):
    stream = PatchStream(blanks[1], SAMPLER, mask_dir=tmp_path)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2)
    with pytest.raises(ss.NoPatchesError, match="no patches from any of 2 slides") as info:
        next(iter(loader))
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def test_too_high_min_tissue_is_the_named_cause(slides, tmp_path, caplog):
    huge = GridPatchSampler(512, mpp=4.0, min_tissue=1.0)  # 4 mm patches on a 1 mm slide
    stream = PatchStream([slides["pyramid"]], huge, patches_per_slide=3, mask_dir=tmp_path)
    with caplog.at_level(logging.WARNING), pytest.raises(ss.NoPatchesError):
        list(stream)
    assert "min_tissue=1" in caplog.text and "tissue mask is empty" not in caplog.text


def test_database_names_blank_slides_and_fails_when_empty(blanks, slides, tmp_path, caplog):
    cohort = load_cohort(_mixed_csv(tmp_path, blanks, slides))
    sampler = GridPatchSampler(64, mpp=2.0, min_tissue=0.5)
    with caplog.at_level(logging.WARNING):
        build = build_patch_databases(
            cohort, tmp_path / "db.h5", sampler, mask_dir=tmp_path, progress=False
        )
    assert sorted(build.empty) == sorted(str(p) for p in blanks[0])
    assert build.patches["all"] > 0
    with pytest.raises(ss.NoPatchesError, match="glass.png"):
        build_patch_databases(load_cohort(blanks[1]), tmp_path / "none.h5", sampler, progress=False)


def test_cli_patches_names_blank_slides_and_errors_on_nothing(
    blanks, slides, tmp_path, capsys, caplog, monkeypatch
):
    from slidestream.data import nopatches

    monkeypatch.setattr(nopatches, "_WARNED", set())  # named once per process: forget earlier
    csv = _mixed_csv(tmp_path, blanks, slides)
    args = ["--mpp", "2.0", "--size", "64", "--grid", "64"]
    with caplog.at_level(logging.WARNING):
        assert main(["patches", str(csv), "--out", str(tmp_path / "a.h5"), *args]) == 0
    out, err = capsys.readouterr()
    assert "2 slides gave no patches" in out and "glass.png" in out
    assert f"{blanks[0][0]} gives no patches" in caplog.text  # the warning
    code = main(["patches", str(blanks[1]), "--out", str(tmp_path / "b.h5"), *args])
    err = capsys.readouterr().err
    assert code == 1 and "no patches from any of 2 slides" in err and "Traceback" not in err
