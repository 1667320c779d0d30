"""Benchmark: one training step of a ResNet-18 trunk, conventional vs streamed.

Setup: torchvision ResNet-18 trunk (conv1..layer4, receptive field 435 px, stride 32), BatchNorm
in eval mode with random running statistics, all parameters trainable, random init; head =
global average pool + Linear(512, 2) + cross-entropy; one float32 4096x4096 image, batch 1,
input without gradient. CPU by default (``--device cuda`` when available).

Cases: conventional; streaming with tiles of 1024, 1536 and 2048 px in two stages (cut after
layer2: the stitched layer2 map is kept and layer3-4 are streamed over it with margins in
feature px -- measured faster and leaner than one grid, see the single-stage references
``single_t1024``/``single_t2048``); a background case (single stage, tile ``--bg-tile``: the
image is 30 % tissue -- the top band of rows -- and 70 % white, vs the same image fully
covered); lightstream (PyPI) at ``--peer-tiles`` when ``--peer-python`` can import it; and a
float64 exactness check of the whole trunk (every parameter and the input gradient) on a
613x547 image, batch 2.

Threads: 1 per case by default. On a 2-core machine shared with other work, two OpenMP
threads stall at every op barrier (we measured 256 px steps 9x slower with 2 threads than
with 1), which makes small-tile timings meaningless; pass ``--threads 2`` on an idle machine.

Tile size. Ours: the output-aligned block each tile owns (its crop adds the ~224 px margins
on each side, clipped at the image edge). lightstream's: its input tile including overlap.

Metrics, each case in a fresh process:
- time: wall seconds of one step (forward, head, loss, backward) after setup; one-off setup
  (our geometry probe, lightstream's tile-statistics pass) is reported separately as setup_s.
- memory (CPU): peak RSS increase over the baseline, where the baseline is the RSS after
  imports, model and input creation, the one-off setup and ``malloc_trim(0)``; the peak is the
  kernel's high-water mark (VmHWM), reset via /proc/self/clear_refs right after the baseline.
  On CUDA: ``max_memory_allocated`` over the same window.
- cpu: process CPU seconds of the same step (user + system, all threads), reported beside
  wall time because this machine is shared: wall time includes waiting for a core.
- recompute factor: input pixels processed by one pass over all crops / image pixels, per
  stage (a stage's pixels are its input's: image px for stage 1, layer2 px for stage 2).

Allocator: glibc keeps freed heap pages of earlier crops, so streaming's RSS would exceed its
live tensors. With ``release_memory=True`` (the default) the engine trims the heap after every tile
and fixes glibc's mmap threshold at 4 MiB for the process (``--keep-heap`` turns both off). Measured
here: tile-1024 peak 1064 MB with the dynamic threshold, 738 MB fixed; conventional 7044 MB either
way (it runs in its own process and is not touched).

Ratios are streamed/conventional; conventional runs first and last and the faster run is the
reference. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 4096
TILES = (1024, 1536, 2048)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _baseline(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _rss()


def _peak(device, base: int) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _hwm() - base


def _setup(args):
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT / "src"))
    from slidestream.models import split_model
    from slidestream.streaming.check import randomize_norms

    torch.manual_seed(0)
    device = torch.device(args.device)
    trunk, _ = split_model(args.model, stream_until="layer4")
    randomize_norms(trunk)
    trunk.to(device)
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(trunk_channels(args.model), 2)
    )
    head.to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, args.size, args.size, generator=g)
    if args.tissue < 1.0:  # white background outside a band of tissue rows
        x[:, :, int(args.tissue * args.size) :, :] = 1.0
    return torch, trunk, head, x.to(device), device


def trunk_channels(model: str) -> int:
    return {"resnet18": 512, "resnet34": 512, "resnet50": 2048}[model]


def run_case(args) -> dict:
    """Measure one case in this process; returns its record."""
    torch, trunk, head, x, device = _setup(args)
    torch.set_num_threads(args.threads)
    target = torch.tensor([1], device=device)
    record = {"case": args.case, "tile": args.tile, "tissue": args.tissue}
    t0 = time.perf_counter()
    if args.case == "conventional":
        step = lambda: trunk(x)  # noqa: E731
    elif args.case == "streaming":
        from slidestream.streaming import StagedStreamingModule, StreamingModule

        kw = {"background": 1.0 if args.tissue < 1.0 else None}
        kw["release_memory"] = not args.keep_heap
        if args.split:
            smod = StagedStreamingModule(trunk, args.tile, args.split, **kw)
            plans = smod.plan(3, (args.size, args.size))
        else:
            smod = StreamingModule(trunk, args.tile, **kw)
            plans = [smod.plan(3, (args.size, args.size))]
        record["split_after"] = args.split
        record["recompute_factor"] = [p.recompute_factor for p in plans]
        record["tiles"] = [len(p) for p in plans]
        step = lambda: smod(x)  # noqa: E731
    else:
        return run_lightstream(args, torch, trunk, head, x, device, record)
    record["setup_s"] = time.perf_counter() - t0
    base = _baseline(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = step()
    loss = nn_loss(torch, head(out), target)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    record["time_s"] = time.perf_counter() - t0
    record["cpu_s"] = time.process_time() - c0
    record["peak_mb"] = _peak(device, base) / 2**20
    if args.case == "streaming":
        stats = smod.last_stats if isinstance(smod.last_stats, list) else [smod.last_stats]
        record["crops_computed"] = [st["crops_computed"] for st in stats]
        record["background_tiles"] = [st["background_tiles"] for st in stats]
    return record


def nn_loss(torch, logits, target):
    return torch.nn.functional.cross_entropy(logits, target)


def run_lightstream(args, torch, trunk, head, x, device, record) -> dict:
    """The same step through lightstream (tiles include overlap), per its CPU workaround."""
    from lightstream.core.constructor import StreamingConstructor
    from torch import nn

    t0 = time.perf_counter()
    sc = StreamingConstructor(
        trunk,
        args.tile,
        verbose=False,
        statistics_on_cpu=True,
        normalize_on_gpu=False,
        copy_to_gpu=False,
        add_keep_modules=[nn.BatchNorm2d],
    )
    sc.statistics_on_cpu = False
    smodel = sc.prepare_streaming_model()
    record["setup_s"] = time.perf_counter() - t0
    target = torch.tensor([1], device=device)
    base = _baseline(device)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = smodel.forward(x)
    out.requires_grad = True
    nn_loss(torch, head(out), target).backward()
    smodel.backward(x, out.grad)
    record["time_s"] = time.perf_counter() - t0
    record["cpu_s"] = time.process_time() - c0
    record["peak_mb"] = _peak(device, base) / 2**20
    return record


def run_fp64(args) -> dict:
    """Float64 exactness of the whole ResNet-18 trunk (every parameter and the input grad)."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from slidestream.models import split_model
    from slidestream.streaming.check import check_streaming

    torch.set_num_threads(args.threads)
    trunk, _ = split_model(args.model, stream_until="layer4")
    res = check_streaming(trunk, size=(613, 547), tile=160, dtype=torch.float64, batch=2)
    return {
        "case": "fp64",
        "max_rel_err": res["max_rel_err"],
        "ok": res["ok"],
        "tiles": res["tiles"],
    }


def _spawn(python: str, argv: list[str], timeout: float) -> dict | None:
    """Run one case in a fresh process; its last stdout line is its JSON record."""
    cmd = [python, str(Path(__file__).resolve()), *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"case {argv} timed out after {timeout:.0f} s", file=sys.stderr)
        return None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        print(f"case {argv} failed (rc {proc.returncode}): {proc.stderr[-2000:]}", file=sys.stderr)
        return None
    record = json.loads(lines[-1])
    print(json.dumps(record), file=sys.stderr, flush=True)
    return record


def _peer_reason(python: str) -> str | None:
    probe = subprocess.run(
        [python, "-c", "import lightstream.core.constructor"], capture_output=True, text=True
    )
    if probe.returncode:
        return (
            f"lightstream cannot be imported by {python}: {probe.stderr.strip().splitlines()[-1:]}"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tile", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--tissue", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--model", default="resnet18")
    p.add_argument(
        "--split",
        nargs="*",
        default=["layer2"],
        help="stage cuts for the tile cases (default layer2)",
    )
    p.add_argument(
        "--single-tiles", type=int, nargs="*", default=[1024, 2048], help="single-stage references"
    )
    p.add_argument("--keep-heap", action="store_true", help="release_memory=False")
    p.add_argument("--size", type=int, default=SIZE, help="image side in px (default 4096)")
    p.add_argument("--tiles", type=int, nargs="+", default=list(TILES))
    p.add_argument("--bg-tile", type=int, default=512, help="tile for the background case")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per case (default 1)")
    p.add_argument("--peer-python", default=sys.executable, help="interpreter with lightstream")
    p.add_argument("--peer-tiles", type=int, nargs="*", default=[2048])
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.case == "fp64":
        print(json.dumps(run_fp64(args)))
        return 0
    if args.case:
        print(json.dumps(run_case(args)))
        return 0
    return orchestrate(args)


def orchestrate(args) -> int:
    common = ["--model", args.model, "--size", str(args.size), "--device", args.device]
    common += ["--threads", str(args.threads)]
    t_start = time.perf_counter()
    run = lambda *a, python=sys.executable: _spawn(python, [*a, *common], args.timeout)  # noqa: E731
    results = {"conventional": run("--case", "conventional")}
    for t in args.tiles:
        results[f"t{t}"] = run("--case", "streaming", "--tile", str(t), "--split", *args.split)
    for t in args.single_tiles:
        results[f"single_t{t}"] = run("--case", "streaming", "--tile", str(t), "--split")
    bg = str(args.bg_tile)
    results["bg_full"] = run("--case", "streaming", "--tile", bg, "--split")
    results["bg30"] = run("--case", "streaming", "--tile", bg, "--tissue", "0.3", "--split")
    results["fp64"] = run("--case", "fp64")
    reason = _peer_reason(args.peer_python)
    for t in args.peer_tiles:
        if reason is None:
            results[f"lightstream_t{t}"] = run(
                "--case", "lightstream", "--tile", str(t), python=args.peer_python
            )
        else:
            results[f"lightstream_t{t}"] = None
    if reason:
        print(f"lightstream: null ({reason})", file=sys.stderr)
    # Conventional again at the end: the faster of the two runs is the reference, which can
    # only make our ratios worse, never better, when the machine was busier during one of them.
    again = run("--case", "conventional")
    first = results["conventional"]
    if again and (not first or again["time_s"] < first["time_s"]):
        results["conventional"], results["conventional_first"] = again, first
    else:
        results["conventional_last"] = again
    summary = _summary(results)
    summary["total_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps({"cases": results}, indent=1))
    print(json.dumps(summary))
    return 0


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or not b.get(key):
        return None
    return round(a[key] / b[key], 4)


def _summary(r: dict) -> dict:
    conv = r["conventional"]
    out = {
        "time_ratio_t2048": _ratio(r.get("t2048"), conv, "time_s"),
        "mem_ratio_t1024": _ratio(r.get("t1024"), conv, "peak_mb"),
        "bg30_time_ratio": _ratio(r.get("bg30"), r.get("bg_full"), "time_s"),
        "max_rel_grad_err_fp64": r["fp64"]["max_rel_err"] if r.get("fp64") else None,
        "lightstream_time_ratio_t2048": _ratio(
            r.get("t2048"), r.get("lightstream_t2048"), "time_s"
        ),
    }
    out["bg30_cpu_ratio"] = _ratio(r.get("bg30"), r.get("bg_full"), "cpu_s")
    out["lightstream_cpu_ratio_t2048"] = _ratio(r.get("t2048"), r.get("lightstream_t2048"), "cpu_s")
    for k in ("t1024", "t1536", "t2048", "single_t1024", "single_t2048"):
        out[f"time_ratio_{k}"] = _ratio(r.get(k), conv, "time_s")
        out[f"cpu_ratio_{k}"] = _ratio(r.get(k), conv, "cpu_s")
        out[f"mem_ratio_{k}"] = _ratio(r.get(k), conv, "peak_mb")
    return out


if __name__ == "__main__":
    sys.exit(main())
