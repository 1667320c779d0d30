"""Large cohorts: compact rows, masks cached per file, a bounded number of open slides."""

from __future__ import annotations

import gc
import itertools
from pathlib import Path

from slidestream.data.stream import PatchStream
from slidestream.io import Slide, open_slide
from slidestream.sampling import RandomPatchSampler, SlideEntry, load_cohort
from slidestream.tissue import TissueMask, detect_tissue


def _links(target, folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        link = folder / f"case{i:03d}.tiff"
        link.symlink_to(target)
        out.append(link)
    return out


def test_links_to_one_file_share_its_cached_mask(slides, tmp_path):
    cache = tmp_path / "masks"
    links = _links(slides["small"], tmp_path / "links", 3)
    masks = [detect_tissue(open_slide(p), cache_dir=cache) for p in links]
    assert len(list(cache.glob("*.tissue.png"))) == 1
    assert list(cache.glob("*.tissue.png"))[0].name.startswith("small.")
    assert all((m.mask == masks[0].mask).all() for m in masks)


def test_cohort_rows_are_compact():
    entry = SlideEntry(Path("a.tiff"), "x")
    assert not hasattr(entry, "__dict__")


def test_stream_holds_a_bounded_number_of_handles_and_masks(slides, tmp_path):
    links = _links(slides["small"], tmp_path / "links", 70)
    (tmp_path / "c.csv").write_text("slide\n" + "\n".join(map(str, links)) + "\n")
    stream = PatchStream(
        load_cohort(tmp_path / "c.csv"),
        RandomPatchSampler(32, 4.0, min_tissue=0.2),
        pool_size=3,
        patches_per_visit=1,
        mask_dir=tmp_path / "masks",
        seed=1,
    )
    assert len(stream.cohort) == 70  # links to one file are rows of their own
    items = list(itertools.islice(iter(stream), 300))
    assert len({it["slide"] for it in items}) > 64  # more slides visited than masks kept
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, Slide)]
    open_ = [s for s in alive if s._handle is not None and str(s.path).startswith(str(tmp_path))]
    assert len(open_) <= 3
    masks = [o for o in gc.get_objects() if isinstance(o, TissueMask)]
    assert len(masks) <= 64 + 3
    assert len(list((tmp_path / "masks").glob("*.tissue.png"))) == 1
