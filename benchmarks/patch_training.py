"""Training steps per second fed from an HDF5 patch database vs straight from slides.

On a generated 3-class cohort (normal, tumour, inflamed textures; cached in benchmarks/_data), the
same torchvision model (resnet18, random init) trains on 128x128 patches at 1 µm/px with flips +
HED jitter, batch 32, 2 DataLoader workers, one thread per process:

- ``db_build_s``: building the database (grid patches over tissue, gzip) with ``slidestream
  patches``' builder;
- ``db_steps_per_s`` / ``stream_steps_per_s``: optimizer steps per second after a warm-up;
- ``stream_ttfs_s``: time from nothing (no masks cached) to the first finished step when
  streaming; ``db_ttfs_s`` is the build plus the first step from the database.

The last line is JSON with those keys.

    python benchmarks/patch_training.py [--slides 12] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from slidestream.data import PatchStream, default_augmentation, normalize  # noqa: E402
from slidestream.data.database import build_patch_databases  # noqa: E402
from slidestream.data.hdf5 import PatchDatabase  # noqa: E402
from slidestream.sampling import GridPatchSampler, RandomPatchSampler, load_cohort  # noqa: E402
from slidestream.synthetic import write_synthetic_slide  # noqa: E402

HERE = Path(__file__).resolve().parent
SIZE, MPP, BATCH = 128, 1.0, 32


def one_thread(_: int = 0) -> None:
    torch.set_num_threads(1)


def make_cohort(n: int, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        texture = ("normal", "tumour", "inflamed")[i % 3]
        p = folder / f"s{i:02d}.tiff"
        if not p.exists():
            print(f"generating {p} (once) ...", file=sys.stderr)
            write_synthetic_slide(p, 4000, 4000, mpp=0.5, seed=300 + i, texture=texture)
        rows.append(f"{p},{texture},p{i}")
    csv = folder / "cohort.csv"
    csv.write_text("slide,label,patient\n" + "\n".join(rows) + "\n")
    return csv


def steps(loader: DataLoader, n: int, warmup: int = 3) -> tuple[float, float]:
    """(seconds to the first finished step, steps/s after ``warmup``)."""
    model = torchvision.models.resnet18(num_classes=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    first = rate_start = None
    it = iter(loader)
    for i in range(warmup + n):
        if i == warmup:
            rate_start = time.perf_counter()
        batch = next(it)
        loss = torch.nn.functional.cross_entropy(model(normalize(batch["image"])), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if first is None:
            first = time.perf_counter() - t0
    return first, n / (time.perf_counter() - rate_start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=12)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    one_thread()
    csv = make_cohort(args.slides, HERE / "_data" / f"three_class_{args.slides}")
    cohort = load_cohort(csv)
    loader_kw = {"batch_size": BATCH, "num_workers": 2, "worker_init_fn": one_thread}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build = build_patch_databases(
            cohort,
            Path(tmp) / "db.h5",
            GridPatchSampler(SIZE, MPP, min_tissue=0.5),
            mask_dir=Path(tmp) / "masks",
            progress=False,
        )
        db_build_s = time.perf_counter() - t0
        db = PatchDatabase(build.files["all"], transform=default_augmentation())
        db_first, db_rate = steps(DataLoader(db, shuffle=True, **loader_kw), args.steps)
        stream = PatchStream(
            cohort,
            RandomPatchSampler(SIZE, MPP),
            transform=default_augmentation(),
            mask_dir=Path(tmp) / "cold",
            patches_per_visit=4,
            seed=0,
        )
        stream_first, stream_rate = steps(DataLoader(stream, **loader_kw), args.steps)
        db_bytes = build.files["all"].stat().st_size
    cohort_bytes = sum(s.path.stat().st_size for s in cohort)
    print(
        f"database: {len(db)} patches, {db_bytes / 1e6:.1f} MB, built in {db_build_s:.1f} s",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "db_build_s": round(db_build_s, 2),
                "db_steps_per_s": round(db_rate, 3),
                "stream_steps_per_s": round(stream_rate, 3),
                "stream_ttfs_s": round(stream_first, 2),
                "db_ttfs_s": round(db_build_s + db_first, 2),
                "db_patches": len(db),
                "db_disk_ratio": round(db_bytes / cohort_bytes, 4),
                "slides": len(cohort),
                "batch": BATCH,
                "patch": SIZE,
                "model": "resnet18",
            }
        )
    )


if __name__ == "__main__":
    main()
