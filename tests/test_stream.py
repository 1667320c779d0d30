from __future__ import annotations

import shutil
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import slidestream as ss
from slidestream.data import (
    HEDJitter,
    LoaderMonitor,
    MultiView,
    PatchStream,
    RandomFlipRot90,
    StainNormalize,
    default_augmentation,
    normalize,
)
from slidestream.data import stream as stream_mod
from slidestream.io import open_slide
from slidestream.sampling import RandomPatchSampler, load_cohort


@pytest.fixture(scope="module")
def cohort_csv(slides, tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort")
    rows = [
        ("pyramid", "tumour", "p1"),
        ("odd", "normal", "p2"),
        ("small", "normal", "p3"),
        ("tumour2", "tumour", "p4"),
    ]
    csv = d / "cohort.csv"
    csv.write_text(
        "slide,label,patient\n" + "".join(f"{slides[n]},{lab},{p}\n" for n, lab, p in rows)
    )
    return csv


def _take(stream, n):
    return [it for _, it in zip(range(n), iter(stream), strict=False)]


def _fake_worker(monkeypatch, wid, n):
    monkeypatch.setattr(
        stream_mod, "get_worker_info", lambda: SimpleNamespace(id=wid, num_workers=n)
    )


def test_items_are_exact_patches_with_metadata(cohort_csv):
    stream = PatchStream(cohort_csv, RandomPatchSampler(128, mpp=1.0, min_tissue=0.5), seed=0)
    items = _take(stream, 40)
    assert stream.classes == ["normal", "tumour"]
    for it in items[:10]:
        assert it["image"].shape == (3, 128, 128) and it["image"].dtype == torch.uint8
        assert it["mpp"] == 1.0 and it["tissue_fraction"] >= 0.5
        slide = open_slide(it["slide"])
        want = slide.read(it["x"], it["y"], 128, 128, mpp=1.0)
        np.testing.assert_array_equal(it["image"].permute(1, 2, 0).numpy(), want)
        expected = {"pyramid.tiff": 1, "tumour2.tiff": 1}.get(slide.path.name, 0)
        assert it["label"] == expected


def test_deterministic_for_a_seed_and_epoch(cohort_csv):
    sampler = RandomPatchSampler(64, mpp=1.0)
    aug = default_augmentation()

    def run(seed, epoch=0):
        s = PatchStream(cohort_csv, sampler, transform=aug, seed=seed)
        s.set_epoch(epoch)
        return _take(s, 30)

    a, b, c, d = run(0), run(0), run(1), run(0, epoch=1)
    assert [(i["slide"], i["x"], i["y"]) for i in a] == [(i["slide"], i["x"], i["y"]) for i in b]
    assert all(torch.equal(i["image"], j["image"]) for i, j in zip(a, b, strict=True))
    key = [(i["slide"], i["x"], i["y"]) for i in a]
    assert key != [(i["slide"], i["x"], i["y"]) for i in c]
    assert key != [(i["slide"], i["x"], i["y"]) for i in d]


def test_workers_and_ranks_get_disjoint_slides(cohort_csv, monkeypatch):
    sampler = RandomPatchSampler(64, mpp=1.0)
    seen = []
    for rank in (0, 1):
        for wid in (0, 1):
            _fake_worker(monkeypatch, wid, 2)
            s = PatchStream(cohort_csv, sampler, rank=rank, world_size=2, seed=0)
            seen.append({it["slide"] for it in _take(s, 40)})
    assert all(len(x) == 1 for x in seen)
    assert len(set().union(*seen)) == 4


def test_no_duplicate_streams_when_slides_are_fewer_than_workers(slides, monkeypatch):
    sampler = RandomPatchSampler(64, mpp=1.0)
    streams = []
    for wid in (0, 1):
        _fake_worker(monkeypatch, wid, 2)
        streams.append(
            [(i["x"], i["y"]) for i in _take(PatchStream([slides["small"]], sampler), 20)]
        )
    assert streams[0] != streams[1]


def test_finite_epoch_without_replacement(cohort_csv):
    sampler = RandomPatchSampler(64, mpp=1.0, min_tissue=0.3, replacement=False)
    s = PatchStream(cohort_csv, sampler, patches_per_slide=5, patches_per_visit=2, seed=0)
    items = list(s)
    counts = Counter(i["slide"] for i in items)
    assert set(counts.values()) == {5} and len(counts) == 4, counts
    keys = [(i["slide"], i["x"], i["y"]) for i in items]
    assert len(keys) == len(set(keys))
    many = list(PatchStream(cohort_csv, sampler, patches_per_slide=10_000, seed=0))
    keys = [(i["slide"], i["x"], i["y"]) for i in many]
    assert len(keys) == len(set(keys)) and len(keys) > 20  # each slide runs dry, no repeats


@pytest.mark.parametrize("sampler", ["random", "grid"])
def test_endless_stream_resumes_evicted_slides_without_repeats(cohort_csv, sampler):
    """With a pool of one open slide, every visit evicts the last slide; a sampler without
    replacement must go on where the slide stopped, so the whole stream has no repeat."""
    from slidestream.sampling import GridPatchSampler

    samplers = {
        "random": RandomPatchSampler(64, mpp=1.0, min_tissue=0.3, replacement=False),
        "grid": GridPatchSampler(64, mpp=1.0, min_tissue=0.3),
    }
    s = PatchStream(cohort_csv, samplers[sampler], pool_size=1, patches_per_visit=3, seed=0)
    items = list(s)  # endless mode ends when every slide has run dry
    keys = [(i["slide"], i["x"], i["y"]) for i in items]
    assert len(keys) == len(set(keys)) and len(set(i["slide"] for i in items)) == 4
    assert s.stats()["slides_opened"] > 4  # slides really were evicted and reopened


def test_balanced_visits(cohort_csv, slides, tmp_path):
    csv = tmp_path / "unbalanced.csv"
    csv.write_text(
        "slide,label\n"
        + f"{slides['pyramid']},a\n"
        + "".join(f"{slides[n]},b\n" for n in ("odd", "small", "tumour2"))
    )
    s = PatchStream(
        csv, RandomPatchSampler(32, mpp=2.0), balance="balanced", patches_per_visit=1, seed=0
    )
    labels = Counter(i["label"] for i in _take(s, 400))
    assert 0.4 < labels[0] / 400 < 0.6


def test_corrupt_slides_are_dropped_and_the_stream_goes_on(slides, tmp_path, shared_data):
    cut = tmp_path / "cut.tiff"
    data = slides["small"].read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    shutil.copy(shared_data / "unreadable.svs", tmp_path / "unreadable.svs")
    cohort = load_cohort([slides["small"], cut, tmp_path / "unreadable.svs"])
    s = PatchStream(cohort, RandomPatchSampler(64, mpp=1.0), max_failures=2, seed=0)
    items = _take(s, 200)
    assert len(items) == 200 and {i["slide"] for i in items} == {str(slides["small"])}
    assert s.stats()["slides_dropped"] == 2


def test_dataloader_with_two_workers_and_monitor(cohort_csv):
    s = PatchStream(
        cohort_csv, RandomPatchSampler(64, mpp=1.0), transform=default_augmentation(), seed=0
    )
    loader = DataLoader(s, batch_size=16, num_workers=2)
    mon = LoaderMonitor(loader, s)
    batches = [b for _, b in zip(range(6), mon, strict=False)]
    assert batches[0]["image"].shape == (16, 3, 64, 64)
    stats = mon.stats()
    assert stats["patches"] == 96 and stats["patches_per_s"] > 0
    assert 0 <= stats["data_wait_fraction"] <= 1 and stats["slides_opened"] >= 2
    x = normalize(batches[0]["image"])
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 3


def test_multiview(cohort_csv):
    s = PatchStream(
        cohort_csv,
        RandomPatchSampler(128, mpp=1.0),
        views=MultiView(global_size=96, local_size=32, n_global=2, n_local=3),
    )
    views = _take(s, 1)[0]["views"]
    assert [tuple(v.shape) for v in views] == [(3, 96, 96)] * 2 + [(3, 32, 32)] * 3


def test_flip_rot90_and_hed_jitter():
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(0)
    outs = [RandomFlipRot90()(x) for _ in range(20)]
    assert all(torch.equal(o.flatten().sort().values, x.flatten().sort().values) for o in outs)
    assert len({o.numpy().tobytes() for o in outs}) > 3
    assert torch.equal(HEDJitter(0.0, 0.0)(x), x)
    y = HEDJitter(0.2, 0.1)(x)
    assert y.dtype == torch.uint8 and not torch.equal(y, x)
    with pytest.raises(ss.ConfigError, match="uint8"):
        HEDJitter()(x.float())


def test_opencv_paths_match_torch_paths():
    """A single CPU patch takes the OpenCV path; a batch takes the torch path: same pixels."""
    from torchvision import tv_tensors

    from slidestream.data.functional import to_chw

    x = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    flip = RandomFlipRot90()
    for k in range(4):
        for f in (False, True):
            ref = torch.rot90(x[None], k, dims=(-2, -1))
            ref = ref.flip(-1) if f else ref
            assert torch.equal(flip.transform(x, {"k": k, "flip": f}), ref[0])
    jitter = HEDJitter(0.2, 0.2)
    for seed in range(10):
        torch.manual_seed(seed)
        params = jitter.make_params([x])
        one, batch = jitter.transform(x, params), jitter.transform(x[None], params)[0]
        # float32 rounding may differ by one grey level on a few pixels
        assert (one.int() - batch.int()).abs().max() <= 1
        assert (one != batch).float().mean() < 1e-3
    # tv_tensors keep their type; a strided view goes through torch and still works
    image = tv_tensors.Image(x)
    assert isinstance(jitter(image), tv_tensors.Image) and isinstance(flip(image), tv_tensors.Image)
    assert torch.equal(
        flip.transform(x[:, ::2], {"k": 1, "flip": True}),
        flip.transform(x[:, ::2].contiguous(), {"k": 1, "flip": True}),
    )
    hwc = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(to_chw(hwc), hwc.transpose(2, 0, 1))
    assert np.array_equal(to_chw(hwc[:, ::2]), hwc[:, ::2].transpose(2, 0, 1))


def test_stream_runs_our_transforms_on_hwc_pixels_with_the_same_result(cohort_csv):
    """PatchStream applies leading HEDJitter/RandomFlipRot90 steps to the pixels as read (HWC)
    and converts to CHW once; items equal those of the tensor path, step by step."""
    from torchvision.transforms import v2

    from slidestream.data.functional import to_chw
    from slidestream.data.transforms import split_hwc

    hed, flip, vflip = HEDJitter(0.2, 0.2), RandomFlipRot90(), v2.RandomVerticalFlip()
    assert split_hwc(v2.Compose([hed, flip])) == ([hed, flip], None)
    assert split_hwc(v2.Compose([hed, vflip])) == ([hed], vflip)
    assert split_hwc(v2.Compose([vflip, hed]))[0] == [] and split_hwc(vflip) == ([], vflip)
    subclass = type("MyJitter", (HEDJitter,), {})()  # may override transform: tensor path
    assert split_hwc(subclass) == ([], subclass)
    hwc = np.random.default_rng(1).integers(0, 256, (31, 45, 3), dtype=np.uint8)
    for seed in range(16):  # all 8 symmetries, odd sizes
        for step in (hed, flip):
            torch.manual_seed(seed)
            a = to_chw(step.hwc(hwc))
            torch.manual_seed(seed)
            assert np.array_equal(a, step(torch.from_numpy(to_chw(hwc))).numpy())
    aug = v2.Compose([hed, flip, vflip])
    sampler = RandomPatchSampler(64, mpp=1.0)
    fast = PatchStream(cohort_csv, sampler, transform=aug, seed=3)
    slow = PatchStream(cohort_csv, sampler, transform=lambda x: aug(x), seed=3)
    assert fast._split_transform() == ([hed, flip], vflip)
    for a, b in zip(_take(fast, 40), _take(slow, 40), strict=True):
        assert a["image"].is_contiguous() and torch.equal(a["image"], b["image"])
    fast.transform = v2.Compose([vflip])  # a new transform is split anew
    assert fast._split_transform() == ([], fast.transform)
    fast.transform.transforms.insert(0, hed)  # and so is one changed in place
    assert fast._split_transform()[0] == [hed]


def test_hed_jitter_matches_skimage_round_trip():
    """The fused float32 transform equals rgb2hed -> scale/shift -> hed2rgb in float64 (skimage's
    convention with I + 1 / 256) to within one grey level."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    x = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    jitter = HEDJitter(0.2, 0.1)
    torch.manual_seed(3)
    y = jitter(x)
    torch.manual_seed(3)
    draw = torch.rand(6, dtype=torch.float64).numpy() * 2 - 1
    alpha, beta = 1 + draw[:3] * 0.2, draw[3:] * 0.1
    rgb = x.permute(1, 2, 0).reshape(-1, 3).double().numpy()
    hed = -np.log((rgb + 1) / 256) @ hed_from_rgb * alpha + beta
    ref = np.clip(np.exp(-(hed @ rgb_from_hed)) * 256 - 1, 0, 255)
    got = y.permute(1, 2, 0).reshape(-1, 3).double().numpy()
    assert np.abs(got - ref).max() <= 1.0


def test_coarse_elastic_is_exact_for_known_displacements():
    from slidestream.data import CoarseElastic

    x = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    e = CoarseElastic(sigma=5.0, spacing=16, band=7)
    assert torch.equal(CoarseElastic(sigma=0.0)(x), x)
    # a constant displacement of +3 px in x: a shift left, white coming in on the right
    grid = torch.zeros(1, 2, 5, 6)
    grid[:, 0] = 3.0
    y = e.transform(x, {"grid": grid})
    assert torch.equal(y[..., :-3], x[..., 3:]) and bool((y[..., -3:] == 255).all())
    # the same downwards with bands of 2 rows: the last bands read only rows past the edge
    grid = torch.zeros(1, 2, 5, 6)
    grid[:, 1] = 3.0
    y = CoarseElastic(sigma=5.0, spacing=16, band=2).transform(x, {"grid": grid})
    assert torch.equal(y[:, :-3], x[:, 3:]) and bool((y[:, -3:] == 255).all())
    # banding does not change the result (beyond rounding); one draw per torch seed
    torch.manual_seed(1)
    a = e(x)
    torch.manual_seed(1)
    b = CoarseElastic(sigma=5.0, spacing=16, band=512)(x)
    assert (a.int() - b.int()).abs().max() <= 1  # float rounding of the band's coordinates
    assert (a.int() - x.int()).abs().float().mean() > 5


def test_stain_normalize(slides):
    target = open_slide(slides["pyramid"]).read(900, 700, 128, 128)
    src = torch.from_numpy(open_slide(slides["odd"]).read(1500, 1000, 64, 64)).permute(2, 0, 1)
    for method in ("macenko", "reinhard", "vahadane"):
        out = StainNormalize(target, method)(src.contiguous())
        assert out.shape == src.shape and out.dtype == torch.uint8
        assert not torch.equal(out, src)
        batch = StainNormalize(target, method)(torch.stack([src, src]))
        assert torch.equal(batch[1], out)
    with pytest.raises(ss.ConfigError, match="stain-norm must be one of"):
        StainNormalize(target, "ruifrok")


def test_bad_stream_arguments(cohort_csv, tmp_path):
    with pytest.raises(ss.ConfigError, match="patches_per_visit"):
        PatchStream(cohort_csv, RandomPatchSampler(), patches_per_visit=0)
    with pytest.raises(ss.ConfigError, match="no usable slides"):
        PatchStream([tmp_path / "none.svs"], RandomPatchSampler())


def test_prepare_makes_masks_in_parallel_and_drops_bad_slides(slides, tmp_path):
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"junk")
    s = PatchStream(
        [slides["small"], slides["tumour2"], bad],
        RandomPatchSampler(64, mpp=1.0),
        mask_dir=tmp_path / "masks",
    )
    failed = s.prepare(workers=2)
    assert len(failed) == 1 and "bad.svs" in failed[0]
    assert len(s.cohort) == 2 and len(list((tmp_path / "masks").glob("*.tissue.png"))) == 2
    assert len(_take(s, 10)) == 10
