"""Feature extraction throughput: ``extract_cohort`` end to end vs the encoder alone.

Writes ``--slides`` synthetic slides (``--size``² at 0.5 µm/px), then extracts ResNet-50 (random
init) features of every 224² tissue patch at 0.5 µm/px through
:func:`slidestream.infer.features.extract_cohort` (DataLoader workers read patches while the
encoder runs batched on the device, bf16 autocast on CUDA) and times it beside the ceiling: the
same encoder on batches of the same size already on the device. On CUDA the GPU's utilisation
(NVML, sampled every 0.5 s during extraction) is reported as its mean (``gpu_util_mean``) and as
the share of samples with any kernel running (``gpu_busy_frac``). The last line is JSON.

    python benchmarks/feature_extraction.py --device cuda [--slides 8] [--size 16384]
    python benchmarks/feature_extraction.py --device cpu --slides 2 --size 2048 --encoder resnet18
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _write(job: tuple[str, int, int]) -> str:
    from slidestream.synthetic import write_synthetic_slide

    path, size, seed = job
    if not Path(path).exists():
        write_synthetic_slide(path, size, size, mpp=0.5, seed=seed, tumour=seed % 2 == 1)
    return path


def make_cohort(folder: Path, slides: int, size: int, cores: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"f{i:02d}.tiff"), size, 500 + i) for i in range(slides)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(min(cores, slides)) as pool:
        list(pool.map(_write, jobs))
    log(f"{slides} slides of {size}² ready in {time.perf_counter() - t0:.0f} s")
    csv = folder / "cohort.csv"
    csv.write_text("slide,label\n" + "".join(f"{p},x\n" for p, _, _ in jobs))
    return csv


def ceiling(model: torch.nn.Module, batch: int, size: int, device: torch.device) -> float:
    """Patches/s of the encoder alone on uint8 batches already on the device."""
    from slidestream.data.functional import normalize

    x = torch.randint(0, 255, (batch, 3, size, size), dtype=torch.uint8, device=device)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    reps = 30 if cuda else 2
    with torch.no_grad():
        for i in range(reps + 3):
            if i == 3:
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
            with amp:
                out = model(normalize(x, device=device))
            out.float().cpu()  # the extractor copies every batch's features to the host
    if cuda:
        torch.cuda.synchronize(device)
    return reps * batch / (time.perf_counter() - t0)


def main() -> None:
    from _slide_speed import GpuSampler
    from slidestream.infer.features import FeatureExtractor, extract_cohort
    from slidestream.sampling import load_cohort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", type=int, default=16384, help="level-0 side at 0.5 µm/px")
    ap.add_argument("--encoder", default="resnet50")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None, help="loader workers (cores - 2)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(HERE / "_data" / "feature_extraction"))
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    workers = max(1, cores - 2) if args.workers is None else args.workers
    out = Path(args.out)
    cohort = load_cohort(make_cohort(out / f"slides_{args.slides}_{args.size}", args.slides,
                                     args.size, cores))  # fmt: skip
    device = torch.device(args.device)
    extractor = FeatureExtractor(
        args.encoder, mpp=0.5, size=224, batch_size=args.batch, workers=workers,
        device=args.device,
    )  # fmt: skip
    feats = out / f"features_{int(time.time())}"
    with GpuSampler(device) as gpu:
        report = extract_cohort(cohort, feats, extractor)
    e2e = report.patches_per_s
    top = ceiling(extractor.model, args.batch, 224, device)
    print(
        json.dumps(
            {
                "patches_per_s": round(e2e, 1),
                "ceiling_patches_per_s": round(top, 1),
                "vs_ceiling": round(e2e / top, 3),
                "gpu_util_mean": gpu.mean(),
                "gpu_busy_frac": gpu.busy(),
                "patches": report.patches,
                "extract_s": round(report.seconds, 1),
                "failed": len(report.failed),
                "encoder": args.encoder,
                "batch": args.batch,
                "workers": workers,
                "slides": args.slides,
                "size": args.size,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            }
        )
    )


if __name__ == "__main__":
    main()
