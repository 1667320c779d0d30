"""Whole-slide inference throughput: ``predict`` end to end vs the model alone on the same tiles.

A patch classifier (resnet18, random init, 128x128 at 1 µm/px) predicts every tissue tile of a
generated 16000x16000 slide (0.5 µm/px): end to end through ``PatchPredictor.tile_probs`` (tiles
read and batched by 2 DataLoader workers while the model runs), and the model alone on the same
tiles already in memory (same batch size, same normalisation). One thread for the model.
The last line is JSON with ``e2e_tiles_per_s``, ``model_only_tiles_per_s`` and ``ratio``.

    python benchmarks/inference.py [--size 16000] [--batch 64]
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

from slidestream.data.functional import normalize  # noqa: E402
from slidestream.infer import PatchPredictor  # noqa: E402
from slidestream.io import open_slide  # noqa: E402
from slidestream.models.checkpoint import save_checkpoint  # noqa: E402
from slidestream.sampling import GridPatchSampler, PatchLocation  # noqa: E402
from slidestream.synthetic import write_synthetic_slide  # noqa: E402
from slidestream.tissue import detect_tissue  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = HERE / "_data" / f"infer_{args.size}.tiff"
    if not path.exists():
        print(f"generating {path} (once) ...", file=sys.stderr)
        write_synthetic_slide(path, args.size, args.size, mpp=0.5, seed=7, tumour=True)
    model = torchvision.models.resnet18(num_classes=2)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "m.pt"
        save_checkpoint(
            ckpt,
            {
                "kind": "patch",
                "model": {"name": "resnet18", "num_classes": 2},
                "state_dict": model.state_dict(),
                "classes": ["a", "b"],
                "mpp": 1.0,
                "patch_size": 128,
            },
        )
        pred = PatchPredictor(ckpt, workers=args.workers, batch_size=args.batch, device="cpu")
    slide = open_slide(path)
    sampler = GridPatchSampler(128, 1.0, min_tissue=0.25)
    xy = sampler.locations(slide, detect_tissue(slide))[:, :2].astype(np.int64)
    pred.tile_probs(slide, sampler, xy[: args.batch])  # warm-up (workers, allocator)
    t0 = time.perf_counter()
    probs = pred.tile_probs(slide, sampler, xy)
    e2e = len(xy) / (time.perf_counter() - t0)
    tiles = torch.stack(
        [
            torch.from_numpy(
                np.ascontiguousarray(
                    sampler.read(slide, PatchLocation(int(x), int(y), 1.0)).transpose(2, 0, 1)
                )
            )
            for x, y in xy
        ]
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(tiles), args.batch):
            torch.softmax(pred.model(normalize(tiles[i : i + args.batch])), 1)
    model_only = len(xy) / (time.perf_counter() - t0)
    assert probs.shape == (len(xy), 2)
    print(
        f"{len(xy)} tiles: end to end {e2e:.1f}/s, model only {model_only:.1f}/s", file=sys.stderr
    )
    print(
        json.dumps(
            {
                "e2e_tiles_per_s": round(e2e, 2),
                "model_only_tiles_per_s": round(model_only, 2),
                "ratio": round(e2e / model_only, 3),
                "tiles": len(xy),
                "batch": args.batch,
                "workers": args.workers,
            }
        )
    )


if __name__ == "__main__":
    main()
