"""The one-command demo: the whole pipeline on a small synthetic cohort, on a laptop CPU.

Steps: generate slides (tumour texture in half of them) → detect tissue (masks, QC images) →
prepare and train a streamed slide classifier on slide labels → patch features and a MIL
(gated attention) model on the same slide labels and splits → build a patch database labelled
from the synthetic ground truth and train a patch classifier → predict the held-out slides with
both (heatmaps, GeoJSON, calls) → write ``report/index.html``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from slidestream.data.database import build_patch_databases
from slidestream.data.prepare import prepare_cohort
from slidestream.infer.export import contours_geojson, write_geojson
from slidestream.infer.predict import PatchPredictor
from slidestream.io import open_slide
from slidestream.sampling import Cohort, GridPatchSampler, load_cohort
from slidestream.synthetic import write_synthetic_slide
from slidestream.tissue import detect_tissue, qc_overlay
from slidestream.train.patch_config import PatchTrainConfig
from slidestream.train.patches import train_patches
from slidestream.train.slide_config import SlideTrainConfig
from slidestream.train.slide_loop import evaluate_slides, train_slides

__all__ = ["DemoSettings", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    slides: int = 24
    size: int = 2048  # level-0 px of each generated slide
    mpp: float = 0.5
    slide_epochs: int = 6
    patch_steps: int = 40
    patch_epochs: int = 3
    mil_epochs: int = 20
    seed: int = 0

    @classmethod
    def fast(cls) -> DemoSettings:
        return cls(
            slides=16,
            size=1024,
            mpp=1.0,
            slide_epochs=5,
            patch_steps=25,
            patch_epochs=2,
            mil_epochs=10,
        )


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def make_cohort(out: Path, s: DemoSettings) -> Path:
    """Synthetic slides (odd index = tumour) with a train/val/test split and truth GeoJSON."""
    slides_dir = out / "slides"
    rows = []
    for i in range(s.slides):
        tumour = i % 2 == 1
        path = write_synthetic_slide(
            slides_dir / f"case{i:02d}.tiff",
            s.size,
            s.size,
            mpp=s.mpp,
            seed=s.seed * 1000 + i,
            tumour=tumour,
            tumour_fraction=0.15,
        )
        split = "train" if i < s.slides * 0.6 else "val" if i < s.slides * 0.75 else "test"
        ann = _truth_geojson(path) if tumour else _truth_geojson(path, empty=True)
        rel = [str(Path(p).relative_to(out)) for p in (path, ann)]  # the folder moves as one
        rows.append([rel[0], "tumour" if tumour else "normal", f"patient{i:02d}", split, rel[1]])
    cohort = out / "cohort.csv"
    with open(cohort, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "label", "patient", "split", "annotations"])
        w.writerows(rows)
    return cohort


def _truth_geojson(path: Path, empty: bool = False) -> str:
    """Ground-truth tumour polygons (and the rest of the tissue as 'normal') as GeoJSON."""
    truth = json.loads(path.with_suffix(".truth.json").read_text())
    ds = truth["mask_downsample"]
    slide = open_slide(path)
    mask = detect_tissue(slide)
    h, w = int(np.ceil(slide.dimensions[1] / ds)), int(np.ceil(slide.dimensions[0] / ds))
    tumour = (
        np.zeros((h, w), bool)
        if empty
        else np.asarray(Image.open(path.with_suffix(".tumour.png"))) > 0
    )
    tissue = np.asarray(Image.fromarray(mask.mask).resize((w, h), Image.Resampling.NEAREST))
    feats = contours_geojson(tumour.astype(float), (0, 0, ds, ds), "tumour")["features"]
    feats += contours_geojson((tissue & ~tumour).astype(float), (0, 0, ds, ds), "normal")[
        "features"
    ]
    out = path.with_suffix(".geojson")
    write_geojson({"type": "FeatureCollection", "features": feats}, out)
    return str(out)


def run_demo(out: str | Path = "demo_out", fast: bool = False, workers: int = 2) -> Path:
    """Run every step and return the report's path."""
    import torch

    torch.set_num_threads(1)
    s = DemoSettings.fast() if fast else DemoSettings()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _say(f"generating {s.slides} synthetic slides ({s.size}x{s.size} px, {s.mpp} µm/px)")
    cohort_csv = make_cohort(out, s)
    cohort = load_cohort(cohort_csv)
    _say("detecting tissue (masks and QC overlays)")
    for e in cohort:
        slide = open_slide(e.path)
        mask = detect_tissue(slide, cache_dir=out / "tissue" / "masks")
        Image.fromarray(qc_overlay(slide.thumbnail(512), mask)).save(
            out / "tissue" / f"{e.path.stem}.qc.png"
        )
    _say("training a streamed whole-slide classifier on slide labels")
    prep = prepare_cohort(cohort, out / "prepared", 4.0, workers=workers, progress=False)
    slide_run = train_slides(
        SlideTrainConfig(
            data=str(out / "prepared" / "prepared.csv"),
            model="resnet18",
            stream_until="layer1",
            image_size=256,
            tile_size=256,
            epochs=s.slide_epochs,
            lr=1e-3,
            optimizer="adamw",
            accumulate=4,
            workers=0,
            out=str(out / "runs"),
            name="slide_classifier",
            seed=s.seed,
        )
    )
    test_csv = out / "prepared" / "test.csv"
    _write_split(out / "prepared" / "prepared.csv", test_csv, "test")
    evaluate_slides(slide_run / "best.pt", test_csv, out / "predict_slide")
    _mil_step(out, cohort, s, workers)
    _say("building a patch database from the annotations and training a patch classifier")
    db = {
        split: build_patch_databases(
            cohort.split(split),
            out / "patches" / f"{split}.h5",
            GridPatchSampler(64, 1.0, min_tissue=0.5),
            labels="annotations",
            seed=s.seed,
            progress=False,
            mask_dir=out / "tissue" / "masks",
        ).files["all"]
        for split in ("train", "val")
    }
    patch_run = train_patches(
        PatchTrainConfig(
            data=str(db["train"]),
            val_data=str(db["val"]),
            model="resnet18",
            epochs=s.patch_epochs,
            steps_per_epoch=s.patch_steps,
            batch_size=32,
            lr=2e-3,
            balanced_sampling=True,
            workers=0,
            out=str(out / "runs"),
            name="patch_classifier",
            seed=s.seed,
        )
    )
    _say("predicting the held-out slides (heatmaps, GeoJSON, calls)")
    predictor = PatchPredictor(patch_run / "best.pt", workers=0, batch_size=64)
    rows = []
    for e in cohort.split("test"):
        res = predictor.predict(
            e.path, out / "predict", target="tumour", aggregate_by="topk", topk=5
        )
        rows.append([str(e.path), e.label, res.call, res.tiles, *res.probs])
    with open(out / "predict" / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "label", "call", "tiles", *[f"p_{c}" for c in predictor.classes]])
        w.writerows(rows)
    from slidestream.infer.report import write_report

    _write_about(out, s)
    report = write_report(out, title="slidestream demo")
    _say(f"done in {time.perf_counter() - t0:.0f} s ({len(prep.rows)} slides prepared)")
    return report


def _mil_step(out: Path, cohort: Cohort, s: DemoSettings, workers: int) -> None:
    """Features (ResNet-18 cut after layer2, random init), ABMIL on the same slide labels and
    splits as the streamed model, attention heatmaps of the held-out slides."""
    from slidestream.infer.features import FeatureExtractor, extract_cohort
    from slidestream.infer.mil import MILPredictor
    from slidestream.train.mil import train_mil
    from slidestream.train.mil_config import MILTrainConfig

    _say("patch features and a MIL (gated attention) model on the same slide labels")
    extractor = FeatureExtractor("resnet18@layer2", mpp=2.0, size=64, workers=workers)
    extract_cohort(cohort, out / "features", extractor)
    run = train_mil(
        MILTrainConfig(
            data=str(out / "cohort.csv"),
            features=str(out / "features"),
            epochs=s.mil_epochs,
            lr=1e-3,
            out=str(out / "runs"),
            name="mil_classifier",
            seed=s.seed,
        )
    )
    predictor = MILPredictor(run / "best.pt", features_dir=out / "features", workers=0)
    rows = []
    for e in cohort.split("test"):
        res = predictor.predict(e.path, out / "predict_mil")
        rows.append([str(e.path), res.stem, e.label, res.call, res.tiles, *res.probs])
    with open(out / "predict_mil" / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        head = ["slide", "stem", "label", "call", "tiles"]
        w.writerow([*head, *[f"p_{c}" for c in predictor.classes]])
        w.writerows(rows)


def _write_about(out: Path, s: DemoSettings) -> None:
    """What the demo did, in words and as the equivalent commands (shown by the report)."""
    n_test = sum(1 for i in range(s.slides) if i >= s.slides * 0.75)
    steps = [
        (
            f"Generated {s.slides} synthetic H&E-like slides ({s.size}² px at {s.mpp} µm/px); "
            "every other slide holds tumour texture in about 15% of its tissue; split "
            f"train/val/test by patient ({n_test} test slides)",
            f"slidestream synth slides/caseNN.tiff --size {s.size} {s.size} --mpp {s.mpp} --tumour",
        ),
        ("Detected tissue and drew QC overlays", "slidestream tissue slides/ --out tissue/"),
        (
            "Prepared the slides at 4 µm/px and trained a streamed ResNet-18 (trunk up to "
            "layer1) end to end on whole 256² images with slide labels only",
            "slidestream prepare cohort.csv --mpp 4 --out prepared/ && slidestream train "
            "--data prepared/prepared.csv --model resnet18 --stream-until layer1 --image-size "
            f"256 --tile-size 256 --epochs {s.slide_epochs} --accumulate 4 --name "
            "slide_classifier --out runs",
        ),
        (
            "Predicted the test slides with the streamed model: one call per whole slide",
            "slidestream train --only-eval prepared/test.csv --checkpoint "
            "runs/slide_classifier/best.pt",
        ),
        (
            "Extracted patch features (64² px at 2 µm/px, ResNet-18 cut after layer2, random "
            "init) and trained gated-attention MIL on the same slide labels and splits; "
            "attention maps of the test slides",
            "slidestream features cohort.csv --encoder resnet18@layer2 --mpp 2 --size 64 --out "
            f"features/ && slidestream train-mil --data cohort.csv --features features/ --epochs "
            f"{s.mil_epochs} --lr 1e-3 --name mil_classifier --out runs && slidestream predict "
            "runs/mil_classifier/best.pt TEST_SLIDES --features features/ --out predict_mil",
        ),
        (
            "Built patch databases (64² px at 1 µm/px on a grid inside tissue) labelled from "
            "the ground-truth annotations and trained a ResNet-18 patch classifier",
            "slidestream patches TRAIN.csv --labels annotations --mpp 1 --size 64 --grid 64 "
            "--min-tissue 0.5 --out patches/train.h5 (and VAL.csv → patches/val.h5) && "
            "slidestream train-patches --data patches/train.h5 --val-data patches/val.h5 "
            "--model resnet18 --balanced-sampling true --name patch_classifier --out runs",
        ),
        (
            "Predicted the test slides with the patch classifier: tiles over the tissue, "
            "p(tumour) heatmaps, QuPath GeoJSON contours, zoomable viewers; the slide call "
            "comes from the mean of the top-5 tiles",
            "slidestream predict runs/patch_classifier/best.pt TEST_SLIDES --class tumour "
            "--aggregate topk --topk 5 --out predict",
        ),
    ]
    about = {
        "summary": "The slidestream demo: the whole pipeline on a small synthetic cohort, "
        "with slide labels for the streamed model and region annotations for the patch model.",
        "steps": [{"what": w, "command": c} for w, c in steps],
        "folders": {
            "predict": "patch classifier: tile probabilities, top-5 tiles per slide",
            "predict_slide": "streamed slide classifier: one call per whole slide",
            "predict_mil": "MIL (gated attention) on patch features: one call per slide",
        },
    }
    (out / "about.json").write_text(json.dumps(about, indent=1))


def _write_split(src: Path, dst: Path, split: str) -> None:
    lines = src.read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("split")
    keep = [line for line in lines[1:] if line.split(",")[col] == split]
    dst.write_text("\n".join([lines[0], *keep]) + "\n")
