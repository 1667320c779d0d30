"""Patch databases survive kill -9 at any moment, and refuse a second writer (#18.4, #15.6).

The killed runs are real ``python -m slidestream patches`` processes that SIGKILL themselves at a
chosen point (a wrapper counts calls of a function and kills the process after the k-th), so each
moment is hit exactly; one more run is killed from outside by polling the file system.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from slidestream.cli import main
from slidestream.data.hdf5 import PatchDatabase, PatchDatabaseWriter
from slidestream.synthetic import write_synthetic_slide

_ARGS = ["--mpp", "2", "--size", "32", "--grid", "32", "--min-tissue", "0.3"]

_KILLER = r"""
import os, shutil, signal, sys
import slidestream.data.hdf5_writer as w
from slidestream.cli import main

point, k = sys.argv[1], int(sys.argv[2])
calls = [0]

def hit():
    calls[0] += 1
    if calls[0] == k:
        os.kill(os.getpid(), signal.SIGKILL)

def after(fn):
    def wrapped(*a, **kw):
        out = fn(*a, **kw)
        hit()
        return out
    return wrapped

if point == "write":  # a block of patches written into a shard not yet committed
    w._write = after(w._write)
elif point == "append":  # some shards copied into the unfinished consolidated file
    w._append = after(w._append)
elif point in ("commit", "final"):
    replace = os.replace
    def os_replace(src, dst, **kw):
        replace(src, dst, **kw)
        if (point == "commit" and ".parts" in str(dst)) or (
            point == "final" and str(dst).endswith("db.h5")
        ):
            hit()
    w.os.replace = os_replace
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash")
    rows = []
    for i in range(3):
        p = write_synthetic_slide(d / f"k{i}.tiff", 640, 480, mpp=1.0, seed=90 + i, tumour=i % 2)
        rows.append(f"{p},{('normal', 'tumour')[i % 2]},p{i}")
    path = d / "cohort.csv"
    path.write_text("slide,label,patient\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(cohort_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "db.h5"
    assert main(["patches", str(cohort_csv), "--out", str(out), *_ARGS]) == 0
    return _content(out)


def _content(path):
    with h5py.File(path, "r") as h5:
        data = {k: h5[k][:] for k in h5}
        attrs = {
            k: json.loads(h5.attrs[k])
            for k in ("classes", "class_counts", "completed_slides", "damaged_regions")
        }
        attrs["n"] = int(h5.attrs["n_committed"])
    return data, attrs


def _same(path, reference):
    data, attrs = _content(path)
    ref_data, ref_attrs = reference
    assert attrs == ref_attrs
    assert set(data) == set(ref_data)
    for k, v in ref_data.items():
        np.testing.assert_array_equal(data[k], v, err_msg=k)
    assert len(PatchDatabase(path)) == ref_attrs["n"] > 20


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "masks")


@pytest.mark.parametrize(
    ("point", "k"),
    [
        ("write", 1),  # before the first commit
        ("write", 3),  # mid-slide, two slides committed
        ("commit", 2),  # between slides
        ("append", 2),  # during the consolidation
        ("final", 1),  # consolidated, shards not yet removed
    ],
)
def test_killed_at_any_moment_then_resumed(cohort_csv, reference, tmp_path, point, k):
    out = tmp_path / "db.h5"
    argv = ["patches", str(cohort_csv), "--out", str(out), *_ARGS]
    killed = subprocess.run(
        [sys.executable, "-c", _KILLER, point, str(k), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert main(argv) == 0
    _same(out, reference)
    assert _leftovers(tmp_path) == ["db.h5"]  # no shards, temporaries or lock left


def test_killed_from_outside_while_writing(cohort_csv, reference, tmp_path):
    out = tmp_path / "db.h5"
    argv = ["patches", str(cohort_csv), "--out", str(out), *_ARGS]
    proc = subprocess.Popen(
        [sys.executable, "-m", "slidestream", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parts = tmp_path / "db.h5.parts"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if parts.is_dir() and any(parts.glob("0*.h5")):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(60)
    assert main(argv) == 0
    _same(out, reference)


def test_unreadable_database_is_moved_aside_and_rebuilt(cohort_csv, reference, tmp_path, caplog):
    out = tmp_path / "db.h5"
    good = tmp_path / "good.h5"
    assert main(["patches", str(cohort_csv), "--out", str(good), *_ARGS]) == 0
    out.write_bytes(good.read_bytes()[:3000])  # an HDF5 file cut short, as a killed write
    assert main(["patches", str(cohort_csv), "--out", str(out), *_ARGS]) == 0
    _same(out, reference)
    assert (tmp_path / "db.h5.damaged").is_file() and "moved it to db.h5.damaged" in caplog.text


def test_uncommitted_rows_of_an_old_file_are_dropped(cohort_csv, reference, tmp_path):
    """A database of the in-place format with rows past its commit point (a crash mid-slide)."""
    out = tmp_path / "db.h5"
    assert main(["patches", str(cohort_csv), "--out", str(out), *_ARGS]) == 0
    with h5py.File(out, "a") as h5:
        n = h5["images"].shape[0]
        for key in h5:
            h5[key].resize(n + 7, axis=0)
    assert main(["patches", str(cohort_csv), "--out", str(out), *_ARGS]) == 0
    _same(out, reference)


def test_second_writer_gets_one_line_and_the_file_stays_intact(
    cohort_csv, reference, tmp_path, capsys
):
    out = tmp_path / "db.h5"
    argv = ["patches", str(cohort_csv), "--out", str(out), *_ARGS]
    assert main(argv) == 0
    before = out.read_bytes()
    held = PatchDatabaseWriter(out, 32, ["normal", "tumour"], "all")  # as another process would
    capsys.readouterr()
    try:
        assert main(argv) == 1
    finally:
        held.close()
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "error" in ln]
    assert str(out) in line and f"pid {os.getpid()}" in line and "Traceback" not in err
    assert out.read_bytes() == before
    _same(out, reference)
    # with splits, the whole set of split files is one output
    split = ["--split", "train=0.5,val=0.5"]
    held = PatchDatabaseWriter(tmp_path / "s.val.h5", 32, ["normal", "tumour"], "val")
    try:
        assert (
            main(["patches", str(cohort_csv), "--out", str(tmp_path / "s.h5"), *_ARGS, *split]) == 1
        )
    finally:
        held.close()
    assert "s.val.h5 is being written by another" in capsys.readouterr().err


def test_shards_of_a_run_with_other_classes_are_redone(tmp_path, caplog):
    out = tmp_path / "db.h5"
    patch = (np.zeros((8, 8, 3), np.uint8), 1, 0, 0, 1.0)
    first = PatchDatabaseWriter(out, 8, ["a", "b"], "all")
    first.add_slide("s1", "p1", iter([patch]))
    first._stack.close()  # "killed": unlocked, never consolidated
    second = PatchDatabaseWriter(out, 8, ["a", "b", "c"], "all")
    assert second.completed == set()  # label 1 meant "b" there; the slide is redone
    second.add_slide("s1", "p1", iter([patch, patch]))
    second.close()
    assert "other classes" in caplog.text
    db = PatchDatabase(out)
    assert len(db) == 2 and db.class_counts == {"a": 0, "b": 2, "c": 0}
