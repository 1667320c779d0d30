"""Train a small patch classifier straight from slides with PatchStream (no patch files).

    python examples/patch_stream_training.py SLIDE_OR_CSV... [--steps 1000] [--workers 2]
        [--model resnet18] [--size 128] [--mpp 1.0]

Slides without labels are labelled by file name (one class per slide) so that any set of slides
gives a runnable loop; with a cohort CSV the ``label`` column is used. Prints loader throughput,
data-wait fraction and slides opened every 100 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torchvision

from slidestream.data import (
    LoaderMonitor,
    PatchLoader,
    PatchStream,
    default_augmentation,
    normalize,
)
from slidestream.sampling import RandomPatchSampler, load_cohort


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cohort", nargs="+")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--mpp", type=float, default=1.0)
    ap.add_argument("--model", default="resnet18", help="any torchvision classification model")
    args = ap.parse_args()
    torch.set_num_threads(1)

    cohort = load_cohort(args.cohort[0] if len(args.cohort) == 1 else args.cohort)
    if not cohort.classes:
        cohort.slides = [dataclasses.replace(s, label=s.path.stem) for s in cohort]
    stream = PatchStream(
        cohort,
        RandomPatchSampler(args.size, args.mpp, min_tissue=0.5),
        transform=default_augmentation(),
        balance="balanced",
        seed=0,
    )
    loader = PatchLoader(stream, batch_size=args.batch, num_workers=args.workers)
    model = torchvision.models.get_model(args.model, weights=None, num_classes=len(stream.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = LoaderMonitor(loader, stream)
    t0, running = time.perf_counter(), 0.0
    for step, batch in enumerate(monitor, start=1):
        loss = torch.nn.functional.cross_entropy(model(normalize(batch["image"])), batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = 0.95 * running + 0.05 * loss.item() if step > 1 else loss.item()
        if step % 100 == 0 or step == args.steps:
            s = monitor.stats()
            print(
                f"step {step:5d} loss {running:.3f} | {s['patches_per_s']:.0f} patches/s, "
                f"waiting for data {100 * s['data_wait_fraction']:.0f}%, "
                f"slides opened {s['slides_opened']:.0f}, dropped {s['slides_dropped']:.0f}",
                flush=True,
            )
        if step == args.steps:
            break
    print(f"{args.steps} steps in {time.perf_counter() - t0:.0f} s; classes {stream.classes}")


if __name__ == "__main__":
    main()
