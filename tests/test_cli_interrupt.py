"""Ctrl-C: one line naming what is left, exit 130, no worker tracebacks, nothing half-written
(issue #22 item 3)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from slidestream.data.features import read_features
from slidestream.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def four_slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("ctrlc")
    for i in range(4):
        write_synthetic_slide(d / f"s{i}.tiff", 1024, 1024, mpp=0.5, seed=i)
    return d


def _ctrl_c(args: list[str], after_workers_s: float) -> tuple[int, str]:
    """Run ``slidestream ARGS`` in its own process group and send SIGINT to the whole group (as
    a terminal's Ctrl-C does) once it has started worker processes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "slidestream", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not psutil.Process(proc.pid).children() and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(after_workers_s)
    assert proc.poll() is None, "the command ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_ctrl_c_during_features_is_one_line_and_leaves_whole_files(four_slides, tmp_path):
    out = tmp_path / "feats"
    args = ["features", str(four_slides), "--encoder", "resnet18", "--mpp", "0.5"]
    args += ["--size", "64", "--batch-size", "8", "--workers", "2", "--device", "cpu"]
    code, err = _ctrl_c([*args, "--out", str(out)], after_workers_s=1.5)
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert lines == [
        "slidestream features: interrupted; finished feature files are kept, none "
        "half-written; re-run the same command to continue"
    ], err
    for path in out.glob("*.h5"):  # whatever was finished reads back whole
        read_features(path)
    assert not [p.name for p in out.glob(".*")], "temporary files left behind"


def test_workers_of_a_command_ignore_ctrl_c():
    """Forked workers (DataLoader) ignore SIGINT once a command runs; spawned pool workers exit
    quietly on it."""
    code = (
        "import os, signal, slidestream.cli as cli\n"
        "cli._workers_ignore_ctrl_c()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else 1)\n"
        "assert os.waitpid(pid, 0)[1] == 0, 'forked worker would raise KeyboardInterrupt'\n"
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
        "from slidestream.parallel import process_pool\n"
        "with process_pool(1) as pool:\n"
        "    name = pool.submit(signal.getsignal, signal.SIGINT).result().__name__\n"
        "assert name == '_exit_quietly', name\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
