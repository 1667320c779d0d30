"""Streaming vs MIL: the two slide-label methods on the same generated cohort, splits and seed.

Generates ``--slides`` synthetic slides (``--size``² px at 0.5 µm/px; every other slide holds a
tumour region of about ``--tumour-fraction`` of the tissue; the last ``--val`` slides are the
held-out validation split, one patient per slide). Then, each step in its own process (so its
peak memory is its own):

- **streaming**: ``slidestream prepare --mpp M`` and ``slidestream train`` (ResNet-18 from
  random init, whole trunk streamed, ``--image``² images);
- **mil**: ``slidestream features`` (``--encoder``, ``--patch`` px at ``--patch-mpp`` µm/px)
  and ``slidestream train-mil`` (gated attention, ``--mil-epochs``).

Reported per method: validation AUC (last epoch and best), wall seconds (preparation/features
and training), images/s (streaming) or patches/s (features) and bags/s (MIL training), peak RSS
(GB, the process and its DataLoader workers) and peak CUDA memory. The last line is JSON.

    python benchmarks/slide_methods.py [--slides 20] [--size 2048] [--device cpu]
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def child(report: str, argv: list[str]) -> None:
    """Run one slidestream command in this process, then write its peak memory to ``report``."""
    from slidestream.cli import main as cli_main

    rc = cli_main(argv)
    peak = {
        "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "workers_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
        "cuda_gb": 0.0,
    }
    try:
        import torch

        if torch.cuda.is_available():
            peak["cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    except ImportError:  # pragma: no cover
        pass
    Path(report).write_text(json.dumps({"rc": rc, **peak}))
    sys.exit(rc)


def step(out: Path, name: str, argv: list[str]) -> dict:
    """Run ``slidestream argv`` in a child process: wall seconds and peak memory."""
    out.mkdir(parents=True, exist_ok=True)
    report = out / f"{name}.peak.json"
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", str(report), "--", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        log(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{name} failed ({proc.returncode})")
    log(f"{name}: {wall:.0f} s; {proc.stdout.strip().splitlines()[-1]}")
    peak = json.loads(report.read_text())
    return {"wall_s": wall, "stdout": proc.stdout, **peak}


def make_cohort(folder: Path, n: int, size: int, val: int, fraction: float) -> Path:
    from slidestream.synthetic import write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    rows = ["slide,label,patient,split"]
    for i in range(n):
        tumour = i % 2 == 1
        path = folder / f"slide_{i:02d}.tiff"
        if not path.exists():
            write_synthetic_slide(
                path, size, size, mpp=0.5, seed=9000 + i, tumour=tumour, tumour_fraction=fraction
            )
        split = "val" if i >= n - val else "train"
        rows.append(f"{path},{'tumour' if tumour else 'normal'},p{i:02d},{split}")
    cohort = folder / "cohort.csv"
    cohort.write_text("\n".join(rows) + "\n")
    return cohort


def summary(run: Path, speed_key: str) -> dict:
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    aucs = [float(r["val_auc"]) for r in rows if r.get("val_auc")]
    return {
        "val_auc": aucs[-1] if aucs else None,
        "best_val_auc": max(aucs) if aucs else None,
        "epochs": len(rows),
        speed_key: sum(float(r[speed_key]) for r in rows) / max(len(rows), 1),
        "train_loop_s": sum(float(r["time_s"]) for r in rows),
    }


def peak_gb(*steps: dict) -> dict:
    return {
        "peak_rss_gb": round(max(max(s["rss_gb"], s["workers_rss_gb"]) for s in steps), 3),
        "peak_cuda_gb": round(max(s["cuda_gb"] for s in steps), 3),
    }


def streaming(args: argparse.Namespace, cohort: Path, out: Path) -> dict:
    prep = out / "prepared"
    common = ["--device", args.device, "--seed", str(args.seed)]
    p = step(
        out, "prepare", ["prepare", str(cohort), "--mpp", str(args.prep_mpp), "--out", str(prep)]
    )
    train = [
        "train", "--data", str(prep / "prepared.csv"), "--model", "resnet18",
        "--image-size", str(args.image), "--tile-size", str(args.image),
        "--epochs", str(args.epochs), "--optimizer", "adamw", "--lr", "1e-3",
        "--accumulate", "2", "--workers", str(args.workers), "--augmentation", "false",
        "--out", str(out / "runs"), "--name", "streaming", *common,
    ]  # fmt: skip
    t = step(out, "train", train)
    return {
        "method": "streaming (prepare + train, resnet18)",
        **summary(out / "runs" / "streaming", "images_per_s"),
        "prepare_s": round(p["wall_s"], 1),
        "train_s": round(t["wall_s"], 1),
        "wall_s": round(p["wall_s"] + t["wall_s"], 1),
        **peak_gb(p, t),
    }


def mil(args: argparse.Namespace, cohort: Path, out: Path) -> dict:
    feats = out / "features"
    f = step(
        out,
        "features",
        [
            "features", str(cohort), "--encoder", args.encoder, "--mpp", str(args.patch_mpp),
            "--size", str(args.patch), "--out", str(feats), "--workers", str(args.workers),
            "--batch-size", "64", "--device", args.device,
        ],
    )  # fmt: skip
    patches = sum(len(_coords(p)) for p in feats.glob("*.h5"))
    train = [
        "train-mil", "--data", str(cohort), "--features", str(feats), "--model", "abmil",
        "--epochs", str(args.mil_epochs), "--lr", str(args.mil_lr), "--out", str(out / "runs"),
        "--name", "mil", "--device", args.device, "--seed", str(args.seed),
    ]  # fmt: skip
    t = step(out, "train-mil", train)
    return {
        "method": f"mil (features {args.encoder} + train-mil abmil)",
        **summary(out / "runs" / "mil", "bags_per_s"),
        "features_s": round(f["wall_s"], 1),
        "patches": patches,
        "patches_per_s": round(patches / f["wall_s"], 1),  # process wall, start-up included
        "features_patches_per_s": _rate(f["stdout"]),  # as slidestream features reports it
        "train_s": round(t["wall_s"], 1),
        "wall_s": round(f["wall_s"] + t["wall_s"], 1),
        **peak_gb(f, t),
    }


def _rate(stdout: str) -> float | None:
    import re

    found = re.search(r"at ([0-9.]+) patches/s", stdout)
    return float(found.group(1)) if found else None


def _coords(path: Path):
    from slidestream.data.features import read_features

    return read_features(path)[1]


def table(results: list[dict]) -> str:
    head = "| method | val AUC (last / best) | wall s | throughput | peak RSS GB | peak CUDA GB |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in results:
        speed = (
            f"{r['images_per_s']:.2f} images/s"
            if "images_per_s" in r
            else f"{r['features_patches_per_s']:.0f} patches/s, {r['bags_per_s']:.1f} bags/s"
        )
        lines.append(
            f"| {r['method']} | {r['val_auc']:.3f} / {r['best_val_auc']:.3f} | {r['wall_s']:.0f} "
            f"| {speed} | {r['peak_rss_gb']:.2f} | {r['peak_cuda_gb']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=20)
    ap.add_argument("--val", type=int, default=8)
    ap.add_argument("--size", type=int, default=2048, help="level-0 side at 0.5 µm/px")
    ap.add_argument("--tumour-fraction", type=float, default=0.2)
    ap.add_argument("--prep-mpp", type=float, default=4.0, help="streaming: prepare at this mpp")
    ap.add_argument("--image", type=int, default=256, help="streaming: image side (px)")
    ap.add_argument("--epochs", type=int, default=6, help="streaming epochs")
    ap.add_argument("--encoder", default="resnet18@layer2")
    ap.add_argument("--patch", type=int, default=64, help="MIL patch size (px)")
    ap.add_argument("--patch-mpp", type=float, default=2.0)
    ap.add_argument("--mil-epochs", type=int, default=20)
    ap.add_argument("--mil-lr", type=float, default=2e-4, help="train-mil AdamW lr (2e-4)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(HERE / "_data" / "slide_methods"))
    args = ap.parse_args()
    out = Path(args.out) / f"run_{int(time.time())}"
    out.mkdir(parents=True)
    cohort = make_cohort(
        Path(args.out) / f"cohort_{args.slides}_{args.size}_{args.tumour_fraction}",
        args.slides,
        args.size,
        args.val,
        args.tumour_fraction,
    )
    results = [streaming(args, cohort, out / "streaming"), mil(args, cohort, out / "mil")]
    log(table(results))
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    print(json.dumps({"results": results, "settings": settings}))


if __name__ == "__main__":
    main()
