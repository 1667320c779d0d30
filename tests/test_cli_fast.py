"""The command line starts fast: ``--help``, usage errors and parser building import no torch,
numpy or slide reader (issue #22 item 2). Each check runs in a fresh interpreter, since this
test process has long imported them all."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = (
    "torch",
    "torchvision",
    "numpy",
    "h5py",
    "matplotlib",
    "bokeh",
    "pyvips",
    "openslide",
    "tiffslide",
    "skimage",
    "cv2",
    "PIL",
    "scipy",
    "shapely",
    "timm",
    "yaml",
)

_PROBE = """
import contextlib, io, json, sys, time
t0 = time.perf_counter()
import slidestream.cli as cli
parser = cli.build_parser()
names = list(parser._subparsers._group_actions[0].choices)
build_s = time.perf_counter() - t0
codes = {}
for argv in [["--help"], ["no-such-command"]] + [[n, "--help"] for n in names] + [[n, "--bogus"] for n in names]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.main(argv)
        except SystemExit as exc:
            codes[" ".join(argv)] = exc.code
print(json.dumps({"build_s": build_s, "names": names, "codes": codes, "modules": sorted(sys.modules)}))
"""


def _probe(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _heavy_in(modules: list[str]) -> list[str]:
    return sorted({m.split(".")[0] for m in modules} & set(HEAVY))


def test_help_and_usage_errors_of_every_command_import_nothing_heavy():
    got = _probe(_PROBE)
    assert len(got["names"]) >= 14, got["names"]
    assert got["codes"]["--help"] == 0
    assert all(got["codes"][f"{n} --help"] == 0 for n in got["names"])
    assert all(got["codes"][f"{n} --bogus"] == 2 for n in got["names"])
    assert _heavy_in(got["modules"]) == [], "the parser must not import these"
    # the import + parser build takes ~0.03 s without torch (5-6 s with it); 0.5 s is the budget
    assert got["build_s"] < 0.5, got["build_s"]


def test_import_slidestream_is_light_and_public_names_still_resolve():
    got = _probe(
        "import json, sys, slidestream as ss\n"
        "light = sorted(sys.modules)\n"
        "names = [ss.open_slide.__name__, ss.detect_tissue.__name__, ss.TissueMask.__name__, "
        "ss.SlideOpenError.__name__, ss.SlideInfo.__name__]\n"
        "from slidestream import open_slide\n"
        "print(json.dumps({'modules': light, 'names': names, 'same': open_slide is ss.open_slide, "
        "'dir': 'open_slide' in dir(ss)}))"
    )
    assert _heavy_in(got["modules"]) == []
    assert got["names"] == [
        "open_slide",
        "detect_tissue",
        "TissueMask",
        "SlideOpenError",
        "SlideInfo",
    ]
    assert got["same"] and got["dir"]


def test_unknown_public_name_is_an_attribute_error():
    import slidestream
    import slidestream.train

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        slidestream.nope  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        slidestream.train.nope  # noqa: B018
    assert slidestream.train.load_checkpoint.__module__ == "slidestream.models.checkpoint"
    assert slidestream.SlideStreamError.__module__ == "slidestream.errors"
