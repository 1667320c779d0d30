"""Sharded cohort commands (--shard i/n) and their merge step: every slide once, and merged
outputs equal to one unsharded run."""

from __future__ import annotations

import json
import re
import shutil

import h5py
import numpy as np
import pytest

from slidestream.cli import main
from slidestream.data.hdf5 import PatchDatabase
from slidestream.errors import ConfigError, SlideStreamError
from slidestream.sampling.shards import parse_shard, shard_files, shard_items, shard_path
from slidestream.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def cohort7(tmp_path_factory: pytest.TempPathFactory):
    """7 small slides (2 labels, one unreadable file) and their cohort CSV."""
    d = tmp_path_factory.mktemp("shards")
    rows = []
    for i in range(6):
        p = write_synthetic_slide(
            d / f"s{i}.tiff", 640, 512, mpp=1.0, seed=700 + i, tumour=i % 2 == 1
        )
        rows.append(f"{p},{'tumour' if i % 2 else 'normal'},p{i}")
    (d / "bad.tiff").write_bytes(b"not a tiff")
    rows.insert(3, f"{d / 'bad.tiff'},normal,p9")
    (d / "c.csv").write_text("slide,label,patient\n" + "\n".join(rows) + "\n")
    return d


def test_shards_cover_every_item_once(monkeypatch):
    items = list(range(10))
    got = [shard_items(items, (i, 3)) for i in range(3)]
    assert sorted(sum(got, [])) == items
    assert got[1] == [1, 4, 7]
    assert shard_items(items, (0, 1)) == items
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_shard(None) == (2, 4)  # torchrun ranks by default
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "a/b", "1"):
        with pytest.raises(ConfigError, match="--shard must be i/n"):
            parse_shard(bad)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="RANK must be"):
        parse_shard(None)
    from slidestream.infer.features import parse_shard as old

    assert old is parse_shard
    assert shard_path("a/t.csv", (1, 3)).name == "t.shard-1-of-3.csv"
    assert shard_path("a/t.csv", (0, 1)).name == "t.csv"


def test_shard_files_refuses_missing_and_mixed(tmp_path):
    for i in (0, 2):
        (tmp_path / f"t.shard-{i}-of-3.csv").write_text("slide\n")
    with pytest.raises(ConfigError, match=r"1 of 3 shards missing \(t.shard-1-of-3.csv\)"):
        shard_files(tmp_path / "t.csv")
    (tmp_path / "t.shard-1-of-3.csv").write_text("slide\n")
    assert len(shard_files(tmp_path / "t.csv")) == 3
    (tmp_path / "t.shard-0-of-2.csv").write_text("slide\n")
    with pytest.raises(ConfigError, match="2 different shard counts"):
        shard_files(tmp_path / "t.csv")


def _fails(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The command exits 1 with a one-line error matching ``match``."""
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(match, err), err


def _run_sharded(args: list[str], n: int) -> list[int]:
    codes = [main([*args, "--shard", f"{i}/{n}"]) for i in range(n)]
    return [*codes, main([*args, "--merge"])]


def test_tissue_shards_merge_to_the_unsharded_table(cohort7, tmp_path, capsys):
    slides = sorted(str(p) for p in cohort7.glob("*.tiff"))
    assert main(["tissue", *slides, "--out", str(tmp_path / "one")]) == 1  # bad.tiff fails
    codes = _run_sharded(["tissue", *slides, "--out", str(tmp_path / "three")], 3)
    assert codes == [1, 0, 0, 1]  # the shard with bad.tiff (first), and the merge, report it
    one = (tmp_path / "one" / "tissue.csv").read_text()
    assert (tmp_path / "three" / "tissue.csv").read_text() == one
    assert one.count("\n") == 8 and "bad.tiff" in one
    parts = [(tmp_path / "three" / f"tissue.shard-{i}-of-3.csv").read_text() for i in range(3)]
    assert sum(p.count("\n") - 1 for p in parts) == 7  # each slide in exactly one shard
    (tmp_path / "three" / "tissue.shard-1-of-3.csv").unlink()
    _fails(
        ["tissue", *slides, "--out", str(tmp_path / "three"), "--merge"], "shards missing", capsys
    )


def test_prepare_shards_merge_to_the_unsharded_table(cohort7, tmp_path):
    csv = str(cohort7 / "c.csv")
    base = ["prepare", csv, "--mpp", "4", "--workers", "1"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 1  # bad.tiff fails
    assert _run_sharded([*base, "--out", str(tmp_path / "three")], 3) == [1, 0, 0, 1]
    one = (tmp_path / "one" / "prepared.csv").read_text()
    assert (tmp_path / "three" / "prepared.csv").read_text() == one
    assert one.count("\n") == 7
    assert len(list((tmp_path / "three").glob("s*.tiff"))) == 6


def _db(path):
    with h5py.File(path, "r") as h5:
        attrs = {k: h5.attrs[k] for k in h5.attrs if k != "merged_shards"}
        data = {k: h5[k][:] for k in h5}
        return attrs, data, h5["images"].is_virtual


def test_patch_database_shards_merge_without_copying(cohort7, tmp_path, capsys):
    csv = str(cohort7 / "c.csv")
    base = ["patches", csv, "--mpp", "4", "--size", "32", "--grid", "32"]
    base += ["--split", "train=0.5,val=0.5", "--compression", "lzf"]
    assert main([*base, "--out", str(tmp_path / "one" / "db.h5")]) == 1
    out = tmp_path / "three" / "db.h5"
    assert _run_sharded([*base, "--out", str(out)], 3) == [1, 0, 0, 0]
    for split in ("train", "val"):
        a_attrs, a, _ = _db(tmp_path / "one" / f"db.{split}.h5")
        b_attrs, b, virtual = _db(tmp_path / "three" / f"db.{split}.h5")
        assert virtual and len(a["images"]) > 10
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert {k: str(v) for k, v in a_attrs.items()} == {k: str(v) for k, v in b_attrs.items()}
    merged = tmp_path / "three" / "db.train.h5"
    shard_bytes = sum(p.stat().st_size for p in (tmp_path / "three").glob("db.shard-*train.h5"))
    assert merged.stat().st_size < shard_bytes / 4  # patches mapped, not copied
    db = PatchDatabase(merged)
    assert db[len(db) - 1]["image"].shape == (3, 32, 32)
    # the merged file moves with its folder, and refuses to read when a shard file is gone
    moved = shutil.copytree(tmp_path / "three", tmp_path / "moved")
    np.testing.assert_array_equal(PatchDatabase(moved / "db.train.h5")[3]["image"], db[3]["image"])
    (moved / "db.shard-2-of-3.train.h5").unlink()
    with pytest.raises(SlideStreamError, match=r"db.shard-2-of-3.train.h5 is gone"):
        PatchDatabase(moved / "db.train.h5")
    _fails([*base, "--out", str(moved / "db.h5"), "--merge"], "shards missing", capsys)
    # a merge never overwrites an unsharded database
    for shard in (tmp_path / "three").glob("db.shard-*"):
        shutil.copy(shard, tmp_path / "one")
    _fails(
        [*base, "--out", str(tmp_path / "one" / "db.h5"), "--merge"],
        "is not a merge of shards",
        capsys,
    )


def test_merge_refuses_shards_of_other_options(cohort7, tmp_path, capsys):
    csv = str(cohort7 / "c.csv")
    out = str(tmp_path / "db.h5")
    base = ["patches", csv, "--mpp", "4", "--size", "32", "--out", out]
    main([*base, "--grid", "32", "--shard", "0/2"])
    main([*base, "--grid", "64", "--shard", "1/2"])
    _fails([*base, "--merge"], "db.shard-1-of-2.h5 was built with another params", capsys)
    attrs = json.loads(h5py.File(tmp_path / "db.shard-0-of-2.h5", "r").attrs["completed_slides"])
    assert [a.rsplit("/", 1)[1] for a in attrs] == ["s0.tiff", "s2.tiff", "s3.tiff", "s5.tiff"]
