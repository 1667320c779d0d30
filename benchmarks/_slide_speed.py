"""The speed run of ``benchmarks/slide_training.py``: streamed slide training vs its model step.

Everything runs in this process after the cohort is written and prepared: ``train_slides`` with
the trainer's defaults for two epochs (epoch 2 is measured: epoch 1 holds cuDNN's autotuning and
the workers' start), then the ceiling (the same model's step on images already on the device),
the conventional step at the same size, and the staged model at twice the size.
"""

from __future__ import annotations

import csv
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_prepared(out: Path, slides: int, image: int, cores: int) -> Path:
    """``slides`` synthetic slides of 2 × ``image`` px at 0.5 µm/px, prepared at 1 µm/px."""
    from slide_training import _write  # the acceptance run's generator (same folder)
    from slidestream.data.prepare import prepare_cohort
    from slidestream.sampling import load_cohort

    folder = out / f"speed_{slides}_{image}"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [
        (str(folder / f"s{i:02d}.tiff"), 2 * image, 9000 + i, i % 2 == 1) for i in range(slides)
    ]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(_write, jobs))
    rows = [f"{p},{'tumour' if t else 'normal'},p{i}" for i, (p, _, _, t) in enumerate(jobs)]
    (folder / "cohort.csv").write_text("slide,label,patient\n" + "\n".join(rows) + "\n")
    log(f"{slides} slides of {2 * image}² written in {time.perf_counter() - t0:.0f} s")
    prep = folder / "prepared"
    if not (prep / "prepared.csv").exists():
        t0 = time.perf_counter()
        res = prepare_cohort(
            load_cohort(folder / "cohort.csv"), prep, 1.0, workers=cores, progress=False
        )
        log(f"prepared {len(res.rows)} slides at 1 µm/px in {time.perf_counter() - t0:.0f} s")
    return prep / "prepared.csv"


class GpuSampler:
    """GPU busy fraction (``torch.cuda.utilization``, NVML) sampled every 0.5 s."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self.stop = device, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception:  # no NVML (pynvml): nothing to report
                return

    def __enter__(self) -> GpuSampler:
        if self.device.type == "cuda":
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()

    def busy(self) -> float | None:
        """Share of samples in which any kernel ran (NVML utilisation > 0)."""
        s = self.samples
        return round(sum(v > 0 for v in s) / len(s), 3) if s else None

    def mean(self) -> float | None:
        """Mean NVML utilisation (share of each sample period with a kernel running), 0..1."""
        s = self.samples
        return round(sum(s) / len(s) / 100.0, 3) if s else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(model: Any, images: list, device: torch.device, dtype: Any, passes: int) -> float:
    """Seconds per streamed step (forward, backward, SGD step) over ``images`` on the device."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    target = torch.zeros(1, dtype=torch.long, device=device)

    def step(x: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x[None]).float(), target)
        loss.backward()
        opt.step()

    for x in images[:2]:
        step(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(passes):
        for x in images:
            step(x)
    _sync(device)
    return (time.perf_counter() - t0) / (passes * len(images))


def _conventional_step(model: Any, image: torch.Tensor, device: torch.device, dtype: Any) -> float:
    """Seconds per conventional step (the trunk on the whole image at once), median of 3."""
    from slidestream.data.functional import normalize

    x = normalize(image[None], channels_last=device.type == "cuda")
    times = []
    for _ in range(4):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model.fc(model.trunk(x).amax((2, 3)))
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[1]


def _staged_peak_gb(ckpt: dict, size: int, device: torch.device, dtype: Any) -> float:
    """Peak activation memory (GB) of a step of the model cut after layer2 at ``size``²."""
    from slidestream.models.slide import load_slide_model

    model, _ = load_slide_model(ckpt)
    model.configure(2048, ["layer2"], channels_last=device.type == "cuda")
    model.to(device)
    x = torch.randint(0, 255, (1, 3, size, size), dtype=torch.uint8, device=device)
    if device.type != "cuda":
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    else:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(x)
    out.float().sum().backward()
    _sync(device)
    if device.type != "cuda":
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def speed_run(out: Path, slides: int, image: int, device_name: str, workers: int | None) -> dict:
    from slidestream.data.slides import SlideImageDataset, finish_image
    from slidestream.models import load_checkpoint
    from slidestream.models.slide import load_slide_model
    from slidestream.sampling import load_cohort
    from slidestream.train.loop import amp_dtype
    from slidestream.train.slide_config import SlideTrainConfig
    from slidestream.train.slide_loop import train_slides

    cores = len(os.sched_getaffinity(0))
    workers = max(1, cores - 2) if workers is None else workers
    device = torch.device(device_name)
    prepared = make_prepared(out, slides, image, cores)
    run = out / "runs" / f"speed_{image}_{device.type}"
    shutil.rmtree(run, ignore_errors=True)
    cfg = SlideTrainConfig(
        data=str(prepared), model="resnet34", image_size=image, epochs=2, accumulate=4,
        lr=1e-4, workers=workers, device=device_name, out=str(run.parent), name=run.name,
        tile_size="auto" if device.type == "cuda" else min(1024, image),
    )  # fmt: skip
    t0 = time.perf_counter()
    with GpuSampler(device) as gpu:
        train_slides(cfg)
    log(f"train: {time.perf_counter() - t0:.0f} s")
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    last = rows[-1]
    ckpt = load_checkpoint(run / "last.pt")
    tile = int(ckpt["model"]["tile_size"])
    dtype = amp_dtype(device, None)
    model, spec = load_slide_model(ckpt)
    cl = device.type == "cuda"
    model.configure(tile, spec.stages, channels_last=cl)
    model.to(device)
    if cl:
        model.to(memory_format=torch.channels_last)
    ds = SlideImageDataset(load_cohort(prepared), "binary", spec.classes, image_size=(image,) * 2)
    images = [finish_image(ds[i], None, device) for i in range(min(len(ds), 8))]
    streamed_s = _timed_steps(model, images, device, dtype, passes=2)
    conventional_s = _conventional_step(model, images[0], device, dtype)
    del images
    staged_gb = _staged_peak_gb(ckpt, 2 * image, device, dtype)
    wall = float(last["time_s"])
    ceiling = 1.0 / streamed_s
    return {
        "images_per_s": round(float(last["images_per_s"]), 3),
        "ceiling_images_per_s": round(ceiling, 3),
        "vs_ceiling": round(float(last["images_per_s"]) / ceiling, 3),
        "data_wait_frac": round(float(last["data_wait_s"]) / wall, 3),
        "gpu_busy_frac": gpu.busy(),
        "gpu_util_mean": gpu.mean(),
        "peak_mem_gb": float(last["peak_mem_gb"]),
        "streamed_step_s": round(streamed_s, 4),
        "conventional_step_s": round(conventional_s, 4),
        "streamed_over_conventional": round(streamed_s / conventional_s, 3),
        "staged_layer2_peak_gb": round(staged_gb, 3),
        "staged_image": 2 * image,
        "tile": tile,
        "image": image,
        "mpp": 1.0,
        "model": "resnet34",
        "amp": str(dtype).replace("torch.", "") if dtype else "off",
        "workers": workers,
        "slides": slides,
        "device": torch.cuda.get_device_name(device) if cl else "cpu",
    }
