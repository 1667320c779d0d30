"""Slides by URL: a local HTTP server (with Range requests) serves a generated pyramid."""

from __future__ import annotations

import functools
import http.server
import os
import pickle
import re
import threading

import numpy as np
import pytest

from slidestream.errors import BackendUnavailableError, ConfigError
from slidestream.io import find_slides, open_slide
from slidestream.io.remote import RemotePath, as_slide_path, is_url
from slidestream.sampling import load_cohort
from slidestream.sampling.naming import output_stems
from slidestream.tissue import detect_tissue

pytest.importorskip("fsspec")


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=a-b`` support (as object stores have); counts bytes."""

    served = [0]

    def log_message(self, *args: object) -> None:
        pass

    def send_head(self):  # noqa: ANN201 - the base class's protocol
        path = self.translate_path(self.path)
        m = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if not os.path.isfile(path) or not m:
            self._left = None
            return super().send_head()
        size = os.path.getsize(path)
        start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
        f = open(path, "rb")  # noqa: SIM115 - closed by the base class
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._left = end - start + 1
        return f

    def copyfile(self, source, outputfile) -> None:  # noqa: ANN001
        data = source.read(self._left) if self._left is not None else source.read()
        self.served[0] += len(data)
        outputfile.write(data)


@pytest.fixture(scope="module")
def server(slides):
    pytest.importorskip("aiohttp")
    folder = slides["pyramid"].parent
    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_RangeHandler, directory=str(folder))
    )
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_url_reads_equal_the_local_file(server, slides, tmp_path):
    url = f"{server}/pyramid.tiff"
    remote = open_slide(url, cache_dir=tmp_path / "cache")
    local = open_slide(slides["pyramid"], backend="tiffslide")
    assert remote.backend == "tiffslide" and str(remote.path) == url
    assert remote.dimensions == local.dimensions and remote.mpp == local.mpp
    for args, kw in [((300, 200, 257, 129), {}), ((0, 0, 200, 150), {"mpp": 2.0})]:
        np.testing.assert_array_equal(remote.read(*args, **kw), local.read(*args, **kw))
    again = pickle.loads(pickle.dumps(remote))  # as DataLoader workers get it
    np.testing.assert_array_equal(again.read(10, 10, 64, 64), local.read(10, 10, 64, 64))
    mask = detect_tissue(remote, cache_dir=tmp_path / "masks")
    assert mask.fraction == detect_tissue(local).fraction
    assert len(list((tmp_path / "masks").glob("pyramid.*.tissue.png"))) == 1
    with pytest.raises(ConfigError, match="URLs are read by the tiffslide backend"):
        open_slide(url, backend="pyvips")


def test_block_cache_serves_what_was_fetched(server, tmp_path):
    url = f"{server}/small.tiff"
    before = _RangeHandler.served[0]
    first = open_slide(url, cache_dir=tmp_path / "cache").read(100, 100, 300, 300)
    fetched = _RangeHandler.served[0] - before
    before = _RangeHandler.served[0]
    second = open_slide(url, cache_dir=tmp_path / "cache").read(100, 100, 300, 300)
    assert _RangeHandler.served[0] - before < fetched / 10
    np.testing.assert_array_equal(first, second)
    before = _RangeHandler.served[0]
    open_slide(url, cache_dir=False).read(100, 100, 300, 300)  # no cache: fetched again
    assert _RangeHandler.served[0] - before >= fetched / 2


def test_cohort_keeps_urls_intact(tmp_path, slides):
    csv = tmp_path / "c.csv"
    csv.write_text(
        "slide,label\ns3://bucket/dir/case1.svs,a\ngs://b/x/case2.tiff,b\n"
        f"https://host/p/case3.tiff?v=2,a\n{slides['small']},b\nmissing.tiff,a\n"
    )
    cohort = load_cohort(csv)
    got = [str(s.path) for s in cohort]
    assert got[:3] == [
        "s3://bucket/dir/case1.svs",
        "gs://b/x/case2.tiff",
        "https://host/p/case3.tiff?v=2",
    ]
    assert [s.path.name for s in cohort][:3] == ["case1.svs", "case2.tiff", "case3.tiff"]
    assert len(cohort) == 4 and "missing.tiff" in cohort.problems[0]
    assert output_stems([s.path for s in cohort]) == ["case1", "case2", "case3", "small"]
    assert find_slides(["s3://bucket/dir/case1.svs"]) == [RemotePath("s3://bucket/dir/case1.svs")]


def test_remote_path_basics(monkeypatch):
    p = as_slide_path("s3://bucket/a/b.svs")
    assert isinstance(p, RemotePath) and p.stem == "b" and p.suffix == ".svs"
    assert p == RemotePath("s3://bucket/a/b.svs") and p.resolve() is p
    assert pickle.loads(pickle.dumps(p)) == p
    assert not is_url("slides/a.svs") and not is_url("C:/x/a.svs") and is_url("HTTPS://h/a.tiff")
    assert not isinstance(as_slide_path("a.svs"), RemotePath)
    import fsspec.core

    def absent(url: str):  # noqa: ANN202
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", absent)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'slidestream\[remote\]'"):
        open_slide("s3://bucket/a/b.svs")


def test_patch_stream_from_a_cohort_of_urls(server, tmp_path):
    import itertools

    from slidestream.data import PatchStream
    from slidestream.sampling import RandomPatchSampler

    csv = tmp_path / "c.csv"
    csv.write_text(f"slide,label\n{server}/pyramid.tiff,a\n{server}/tumour2.tiff,b\n")
    stream = PatchStream(csv, RandomPatchSampler(64, 2.0), mask_dir=tmp_path / "masks", seed=0)
    items = list(itertools.islice(iter(stream), 40))
    assert {it["slide"] for it in items} == {f"{server}/pyramid.tiff", f"{server}/tumour2.tiff"}
    assert items[0]["image"].shape == (3, 64, 64)
