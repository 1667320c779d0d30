"""``prepare`` killed with -9 leaves no workers and no half-written slide (issue #18.5)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from slidestream.data.prepare import prepare_cohort
from slidestream.io import open_slide
from slidestream.sampling import load_cohort
from slidestream.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory):
    d = tmp_path_factory.mktemp("orphans")
    rows = [
        f"{write_synthetic_slide(d / f'o{i}.tiff', 1200, 1000, mpp=0.5, seed=40 + i)},x"
        for i in range(4)
    ]
    path = d / "cohort.csv"
    path.write_text("slide,label\n" + "\n".join(rows) + "\n")
    return path


def _gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still alive (zombies count as gone) after up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _spawned_workers(parent: psutil.Process) -> list[psutil.Process]:
    """``parent``'s live multiprocessing-spawn children; ones that exit (or turn zombie) while
    being read are skipped."""
    workers = []
    for c in parent.children(recursive=True):
        try:
            if "spawn_main" in " ".join(c.cmdline()):
                workers.append(c)
        except psutil.Error:  # NoSuchProcess, ZombieProcess, AccessDenied: not a live worker
            pass
    return workers


def test_workers_die_with_prepare_and_the_rerun_completes(cohort_csv, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slidestream",
            "prepare",
            str(cohort_csv),
            "--mpp",
            "1",
            "--out",
            str(out),
            "--workers",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    workers: list[psutil.Process] = []
    while time.monotonic() < deadline and proc.poll() is None:
        workers = _spawned_workers(parent)
        busy = out.is_dir() and any(p.name != "prepared.csv.lock" for p in out.rglob("*"))
        if len(workers) >= 2 and busy:
            break
        time.sleep(0.05)
    assert proc.poll() is None and len(workers) >= 2, "prepare finished before it was killed"
    family = parent.children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not _gone(family, 10), "workers outlived their parent"
    # only whole outputs under their final names; partial ones are hidden temporaries
    for tiff in out.glob("*.tiff"):
        assert open_slide(tiff).dimensions[0] > 0
    for meta in out.glob("*.json"):
        if not meta.name.endswith(".tissue.json"):  # a slide's marker: its TIFF is whole
            assert (out / json.loads(meta.read_text())["row"]["slide"]).is_file()
    res = prepare_cohort(load_cohort(cohort_csv), out, 1.0, workers=1, progress=False)
    assert len(res.rows) == 4 and not res.failures
    leftovers = [p.name for p in out.rglob(".*")]
    assert not leftovers and not (out / "prepared.csv.lock").exists()
    rows = list(csv.DictReader((out / "prepared.csv").read_text().splitlines()))
    assert len(rows) == 4
    for r in rows:
        assert open_slide(out / r["slide"]).dimensions == (int(r["width"]), int(r["height"]))


def test_worker_exits_when_its_parent_is_already_gone():
    """The initializer's own check (the parent died before prctl took effect)."""
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from slidestream.parallel import die_with_parent; "
            "die_with_parent(1); sys.exit(0)",
        ],
        timeout=60,
    )
    assert child.returncode == 1
