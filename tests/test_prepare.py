from __future__ import annotations

import csv

import numpy as np
from PIL import Image

from slidestream.cli import main
from slidestream.data.prepare import prepare_cohort, tissue_runs
from slidestream.io import open_slide
from slidestream.sampling import load_cohort


def test_tissue_runs():
    present = np.array([0, 1, 1, 0, 0, 0, 0, 1, 0, 0], bool)
    assert tissue_runs(present, 0, True) == [(1, 3), (7, 8)]
    assert tissue_runs(present, 1, True) == [(0, 4), (6, 9)]
    assert tissue_runs(present, 1, False) == [(0, 9)]
    assert tissue_runs(np.zeros(5, bool), 1, True) == []


def _two_pieces(path, slides):
    """Two tissue pieces far apart on a white 3000x1200 image (1 µm/px)."""
    canvas = np.full((1200, 3000, 3), 244, np.uint8)
    piece = open_slide(slides["pyramid"]).read(600, 500, 500, 500, mpp=1.0)
    canvas[300:800, 100:600] = piece
    canvas[400:900, 2300:2800] = piece
    Image.fromarray(canvas).save(path)
    return path


def test_prepare_packs_tissue_and_resumes(slides, tmp_path):
    png = _two_pieces(tmp_path / "two.png", slides)
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"x")
    cohort_csv = tmp_path / "c.csv"
    cohort_csv.write_text(
        f"slide,label,mpp\n{png},tumour,1.0\n{slides['pyramid']},normal,\n{bad},normal,\n"
    )
    cohort = load_cohort(cohort_csv)
    res = prepare_cohort(cohort, tmp_path / "packed", 2.0, workers=2, progress=False)
    assert len(res.rows) == 2 and len(res.failures) == 1 and "bad.svs" in res.failures[0]
    packed = open_slide(tmp_path / "packed" / "two.tiff")
    assert packed.mpp == (2.0, 2.0)
    w, h = packed.dimensions
    assert w < 800 and h < 450  # the 1700 px gap (and the white border) are gone
    loose = prepare_cohort(
        load_cohort(cohort_csv).without([bad, slides["pyramid"]]),
        tmp_path / "loose",
        2.0,
        workers=1,
        remove_empty=False,
        progress=False,
    )
    assert loose.rows[0]["width"] > 1300 // 1  # bounding box keeps the gap
    for name in ("two.tissue.png", "two.thumb.png", "prepared.csv"):
        assert (tmp_path / "packed" / name).exists()
    rows = list(csv.DictReader((tmp_path / "packed" / "prepared.csv").read_text().splitlines()))
    assert {r["label"] for r in rows} == {"tumour", "normal"}
    again = prepare_cohort(cohort, tmp_path / "packed", 2.0, workers=1, progress=False)
    assert again.skipped == 2


def test_prepare_cli(slides, tmp_path, capsys):
    code = main(["prepare", str(slides["small"]), "--mpp", "2.0", "--out", str(tmp_path)])
    assert code == 0 and "1 slide prepared" in capsys.readouterr().out


def test_prepared_csv_works_from_a_relative_folder(slides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = prepare_cohort(load_cohort([slides["small"]]), "rel", 2.0, workers=1, progress=False)
    assert not res.failures
    cohort = load_cohort("rel/prepared.csv")
    assert len(cohort) == 1 and cohort.slides[0].path.is_file() and not cohort.problems
