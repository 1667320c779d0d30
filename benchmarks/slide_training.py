"""Streamed whole-slide training: the CPU acceptance run (learn, survive kill -9) and the speed run.

``--device cpu`` (default ``--mode accept``), the acceptance run:

Generates a cohort of ``--slides`` synthetic slides (``--size``² at 0.5 µm/px; tumour-texture
regions in every other slide, about 15% of the tissue), runs ``slidestream prepare --mpp 2``, then
``slidestream train`` (ResNet-18 from random init, whole trunk streamed, 2048² images at 2 µm/px,
tile 1024, CPU). During epoch 2 the training process is killed with SIGKILL; the same command is
run again and must resume from the last complete checkpoint and finish with exactly ``--epochs``
rows in ``metrics.csv``. Finally ``--only-eval`` writes predictions for every slide.

The last line is JSON: ``val_auc`` (last epoch), ``best_val_auc``, ``epochs`` (rows in
metrics.csv), ``resumed`` (the second run started after epoch 1), ``killed_in_epoch``,
``predictions`` (rows of --only-eval), ``train_s`` and the settings.

    python benchmarks/slide_training.py [--slides 40] [--size 8192] [--epochs 3]

``--device cuda`` (default ``--mode speed``), the speed run: ``--slides`` synthetic slides of
2 × ``--image`` px at 0.5 µm/px, prepared at 1 µm/px, then ``slidestream train`` (ResNet-34,
``--image``² crops, accumulate 4, all defaults: DataLoader workers, channels-last, bf16,
``--tile-size auto``) for two epochs; the second epoch's images/s, data-wait fraction and peak
memory are reported beside the ceiling: the same streamed model step alone (forward, backward,
optimizer) on the same images already on the device. It also times the conventional step at
``--image``² (channels-last, bf16) and measures the staged model (cut after layer2) at
2 × ``--image``² for peak activation memory. The last line is JSON.

    python benchmarks/slide_training.py --device cuda [--image 8192] [--slides 16]
    python benchmarks/slide_training.py --device cpu --mode speed --image 512 --slides 4  # smoke
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _write(args: tuple[str, int, int, bool]) -> str:
    from slidestream.synthetic import write_synthetic_slide

    path, size, seed, tumour = args
    if not Path(path).exists():
        write_synthetic_slide(path, size, size, mpp=0.5, seed=seed, tumour=tumour)
    return path


def make_cohort(folder: Path, n: int, size: int, val: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"slide_{i:02d}.tiff"), size, 7000 + i, i % 2 == 1) for i in range(n)]
    log(f"generating {n} slides of {size}² (cached in {folder}) ...")
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_write, jobs))
    rows = ["slide,label,patient,split"]
    for i, (path, _, _, tumour) in enumerate(jobs):
        split = "val" if i >= n - val else "train"
        rows.append(f"{path},{'tumour' if tumour else 'normal'},p{i:02d},{split}")
    cohort = folder / "cohort.csv"
    cohort.write_text("\n".join(rows) + "\n")
    return cohort


def metric_rows(run: Path) -> list[dict[str, str]]:
    f = run / "metrics.csv"
    if not f.exists():
        return []
    return list(csv.DictReader(f.read_text().splitlines()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=40)
    ap.add_argument("--val", type=int, default=8, help="validation slides (8)")
    ap.add_argument("--size", type=int, default=8192, help="level-0 side at 0.5 µm/px (8192)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--kill-after", type=float, default=60.0, help="seconds into epoch 2 (60)")
    ap.add_argument("--out", default=str(HERE / "_data" / "slide_training"))
    ap.add_argument("--device", default="cpu", help="cpu (acceptance run) or cuda (speed run)")
    ap.add_argument("--mode", choices=("accept", "speed"), default=None)
    ap.add_argument("--image", type=int, default=8192, help="speed run: crop side at 1 µm/px")
    ap.add_argument("--workers", type=int, default=None, help="speed run: loader workers")
    args = ap.parse_args()
    if (args.mode or ("speed" if args.device.startswith("cuda") else "accept")) == "speed":
        from _slide_speed import speed_run

        slides = args.slides if args.slides != 40 else 16
        print(json.dumps(speed_run(Path(args.out), slides, args.image, args.device, args.workers)))
        return
    out = Path(args.out)
    cohort = make_cohort(
        out / f"cohort_{args.slides}_{args.size}", args.slides, args.size, args.val
    )
    exe = [sys.executable, "-m", "slidestream"]
    prep = out / "prepared"
    t0 = time.perf_counter()
    subprocess.run([*exe, "prepare", str(cohort), "--mpp", "2", "--out", str(prep)], check=True)
    log(f"prepare: {time.perf_counter() - t0:.0f} s")
    name = f"accept_{int(time.time())}"
    train = [
        *exe, "train", "--data", str(prep / "prepared.csv"), "--model", "resnet18",
        "--image-size", "2048", "--tile-size", "1024", "--epochs", str(args.epochs),
        "--optimizer", "adamw", "--lr", "3e-4", "--accumulate", "2", "--weight-decay", "1e-4",
        "--device", "cpu", "--out", str(out / "runs"), "--name", name,
    ]  # fmt: skip
    run = out / "runs" / name
    t0 = time.perf_counter()
    proc = subprocess.Popen(train, start_new_session=True)
    killed_in, before = None, None
    while proc.poll() is None:
        time.sleep(2)
        # epoch 1 is complete once its checkpoint is on disk (metrics.csv is written first)
        if killed_in is None and len(metric_rows(run)) == 1 and (run / "last.pt").exists():
            time.sleep(args.kill_after)
            if proc.poll() is None and len(metric_rows(run)) == 1:
                before = metric_rows(run)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed_in = 2
                log("killed the training process group with SIGKILL during epoch 2")
    if killed_in is None:
        raise SystemExit(
            f"training ended (exit {proc.returncode}) before it could be killed in epoch 2; "
            "pass a smaller --kill-after"
        )
    subprocess.run(train, check=True)
    train_s = time.perf_counter() - t0
    rows = metric_rows(run)
    for r in rows:
        log(f"epoch {r['epoch']}: train_loss {r.get('train_loss')} val_auc {r.get('val_auc')}")
    pred = out / "predictions"
    subprocess.run(
        [*exe, "train", "--only-eval", str(prep / "prepared.csv"), "--checkpoint",
         str(run / "best.pt"), "--out", str(pred), "--name", "eval", "--device", "cpu"],
        check=True,
    )  # fmt: skip
    n_pred = len(metric_rows_file(pred / "eval" / "predictions.csv"))
    aucs = [float(r["val_auc"]) for r in rows if r.get("val_auc") not in (None, "")]
    print(
        json.dumps(
            {
                "val_auc": aucs[-1] if aucs else None,
                "best_val_auc": max(aucs) if aucs else None,
                "epochs": len(rows),
                "epoch_numbers": [int(r["epoch"]) for r in rows],
                "killed_in_epoch": killed_in,
                # a resumed run carries epoch 1's row over from last.pt unchanged (time_s
                # included); a restart from scratch would have rewritten it
                "resumed": bool(before) and rows[:1] == before,
                "predictions": n_pred,
                "slides": args.slides,
                "train_s": round(train_s, 1),
                "model": "resnet18",
                "image": 2048,
                "tile": 1024,
                "mpp": 2.0,
            }
        )
    )


def metric_rows_file(f: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(f.read_text().splitlines()))


if __name__ == "__main__":
    main()
