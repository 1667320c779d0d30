from __future__ import annotations

import gc

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

import slidestream as ss
from slidestream.data import PatchCollate, PatchLoader, PatchStream, default_augmentation
from slidestream.sampling import RandomPatchSampler


@pytest.fixture(scope="module")
def stream_args(slides):
    paths = [slides["pyramid"], slides["odd"], slides["small"], slides["tumour2"]]
    return paths, RandomPatchSampler(64, mpp=1.0)


def _stream(stream_args, **kw):
    paths, sampler = stream_args
    return PatchStream(paths, sampler, transform=default_augmentation(), seed=5, **kw)


def _equal(a, b):
    assert list(a) == list(b)  # same keys, same order
    for key in a:
        if torch.is_tensor(a[key]):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_patch_collate_equals_default_collate(stream_args):
    items = [it for _, it in zip(range(12), _stream(stream_args), strict=False)]
    batch = PatchCollate()(items)
    _equal(batch, default_collate(items))
    # the numeric fields share one storage: one transfer between processes, not five
    ptrs = {batch[k].untyped_storage().data_ptr() for k in ("label", "x", "y", "mpp")}
    assert len(ptrs) == 1
    # fields of other types, missing fields and non-dict items go to default_collate
    odd = [{"x": 1, "mpp": 0.5, "label": "a"}, {"x": 2.5, "mpp": 1.0, "label": "b"}]
    _equal(PatchCollate()(odd), default_collate(odd))
    pairs = [(torch.zeros(2), 1), (torch.ones(2), 2)]
    got, ref = PatchCollate()(pairs), default_collate(pairs)
    assert all(torch.equal(g, r) for g, r in zip(got, ref, strict=True))


def test_patch_loader_gives_the_dataloader_batches_and_reuses_buffers(stream_args):
    ref = DataLoader(_stream(stream_args), batch_size=8, num_workers=2)
    loader = PatchLoader(_stream(stream_args), 8, num_workers=2)
    it = iter(loader)
    for _, want, got in zip(range(16), ref, it, strict=False):
        _equal(got, want)  # no private key reaches the caller
        del got
    gc.collect()
    assert it._held.released >= 8  # batches dropped by the caller had their buffers reused


def test_patch_loader_never_overwrites_a_batch_that_is_still_held(stream_args):
    """Keep whole batches, or only a view of one image, for longer than there are buffers: they
    must keep their pixels while the workers go on."""
    ref = DataLoader(_stream(stream_args), 8, num_workers=2)
    ref = [b for _, b in zip(range(24), ref, strict=False)]
    loader = PatchLoader(_stream(stream_args), 8, num_workers=2, prefetch_factor=1)
    kept, views, it = [], [], iter(loader)
    for i, batch in zip(range(24), it, strict=False):
        if i % 3 == 0:
            kept.append((i, batch))
        elif i % 3 == 1:
            views.append((i, batch["image"][2]))  # the batch itself is dropped
        del batch
    for i, batch in kept:
        _equal(batch, ref[i])
    for i, view in views:
        assert torch.equal(view, ref[i]["image"][2])
    assert it._held.released >= 2  # buffers of dropped batches were reused meanwhile


def test_patch_loader_keeps_reusing_buffers_after_early_stops(stream_args):
    """Breaking out of a loop makes a persistent-worker DataLoader drain the batches in flight
    at the next iter(); their buffers must come back too."""
    loader = PatchLoader(_stream(stream_args), 4, num_workers=2, persistent_workers=True)
    for _ in range(5):
        for i, batch in enumerate(loader):
            del batch
            if i == 2:
                break
    before = loader._held.released
    for i, batch in enumerate(loader):
        del batch
        if i == 20:
            break
    assert loader._held.released - before >= 15


def test_patch_loader_without_batching_and_with_a_collate(stream_args):
    for workers in (0, 2):
        item = next(iter(PatchLoader(_stream(stream_args), None, num_workers=workers)))
        assert item["image"].shape == (3, 64, 64) and isinstance(item["x"], int)
    with pytest.raises(ss.ConfigError, match="collate_fn"):
        PatchLoader(_stream(stream_args), 4, collate_fn=default_collate)


def test_patch_loader_options(stream_args):
    seen = []
    loader = PatchLoader(
        _stream(stream_args, patches_per_slide=6),
        4,
        num_workers=2,
        persistent_workers=True,
        worker_init_fn=seen.append,  # runs in the workers; here only checks it is accepted
    )
    for _ in range(2):  # two epochs on the same workers, last batches partial
        sizes = sorted(len(b["image"]) for b in loader)
        assert sum(sizes) == 24 and sizes[0] >= 1
    plain = PatchLoader(_stream(stream_args), 4, num_workers=0)
    batch = next(iter(plain))
    assert batch["image"].shape == (4, 3, 64, 64) and "_slidestream_slot" not in batch
    assert not plain.recycle and not PatchLoader(_stream(stream_args), 4, recycle=False).recycle
