"""The viewer: a DeepZoom pyramid of the slide's own pixels, shown offline by OpenSeadragon with
the heatmap and the contours over it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slidestream.errors import ConfigError
from slidestream.infer.deepzoom import DeepZoom, _direct_image, dz_levels, write_deepzoom
from slidestream.infer.viewer import copy_viewer, viewer_files, write_viewer
from slidestream.io import open_slide

GEO = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [
                    [[256, 256], [768, 256], [768, 512], [256, 512], [256, 256]],
                    [[300, 300], [400, 300], [400, 400], [300, 300]],
                ],
            },
            "properties": {"classification": {"name": "tumour", "color": [220, 50, 32]}},
        },
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}},
    ],
}


def _grid():
    grid = np.full((3, 4), np.nan)
    grid[1, 1:3] = [0.2, 0.9]
    return grid


def _level(dz: DeepZoom, level: int) -> np.ndarray:
    """One level of a pyramid, put together from its tiles (overlaps dropped)."""
    w, h = dz_levels(dz.width, dz.height)[level]
    out = np.zeros((h, w, 3), np.uint8)
    seen = np.zeros((h, w), bool)
    for f in (dz.tiles / str(level)).iterdir():
        col, row = (int(v) for v in f.stem.split("_"))
        tile = np.asarray(Image.open(f).convert("RGB"))
        x0 = col * dz.tile_size - (dz.overlap if col else 0)
        y0 = row * dz.tile_size - (dz.overlap if row else 0)
        out[y0 : y0 + tile.shape[0], x0 : x0 + tile.shape[1]] = tile
        seen[y0 : y0 + tile.shape[0], x0 : x0 + tile.shape[1]] = True
    assert seen.all(), f"level {level} has holes"
    return out


def test_dz_levels_geometry():
    levels = dz_levels(1001, 700)
    assert len(levels) == 11 and levels[0] == (1, 1) and levels[-1] == (1001, 700)
    assert levels[-2] == (501, 350) and levels[-3] == (251, 175)
    assert dz_levels(1, 1) == [(1, 1)] and dz_levels(2, 1) == [(1, 1), (2, 1)]
    with pytest.raises(ConfigError):
        dz_levels(0, 5)


@pytest.mark.parametrize("backend", ["pyvips", "tiffslide", "openslide"])
def test_pyramid_holds_the_slide_reader_pixels(slides, tmp_path, backend):
    """Both routes (libvips loader for pyvips, Slide.read streaming for the others) give the
    pixels Slide.read returns, at the finest level, and coarser levels of the same size."""
    with open_slide(slides["aperio"], backend=backend) as slide:
        assert (_direct_image(slide) is not None) == (backend == "pyvips")
        dz = write_deepzoom(tmp_path / "p", slide, tile_format="png", tile_size=126)
        assert (dz.width, dz.height, dz.downsample, dz.mpp) == (1501, 1203, 1.0, 0.499)
        np.testing.assert_array_equal(_level(dz, dz.max_level), slide.read(0, 0, 1501, 1203))
    assert _level(dz, dz.max_level - 2).shape == (301, 376, 3)
    assert sorted(int(p.name) for p in dz.tiles.iterdir()) == list(range(dz.max_level + 1))
    dzi = (tmp_path / "p.dzi").read_text()
    assert 'Width="1501"' in dzi and 'Height="1203"' in dzi and 'TileSize="126"' in dzi
    assert [p.name for p in tmp_path.iterdir()] == ["p_files", "p.dzi"] or sorted(
        p.name for p in tmp_path.iterdir()
    ) == ["p.dzi", "p_files"]  # no temporary files left


def test_alpha_slide_is_white_where_transparent(slides, tmp_path):
    with open_slide(slides["rgba"]) as slide:
        dz = write_deepzoom(tmp_path / "a", slide, tile_format="png")
        finest = _level(dz, dz.max_level)
        np.testing.assert_array_equal(finest, slide.read(0, 0, *slide.dimensions))
    assert (finest[100:200, 100:300] == 255).all()


def test_finest_mpp_caps_the_pyramid(slides, tmp_path):
    with open_slide(slides["small"]) as slide:  # 1024x768 at 0.5 µm/px
        dz = write_deepzoom(tmp_path / "c", slide, tile_format="png", finest_mpp=1.25)
        assert (dz.width, dz.height, dz.downsample, dz.mpp) == (410, 308, 2.5, 1.25)
        ref = slide.read(0, 0, 410, 308, downsample=2.5)
        assert np.abs(_level(dz, dz.max_level).astype(int) - ref).max() <= 1
        full = write_deepzoom(tmp_path / "f", slide, finest_mpp=0.25)  # finer than the scan
        assert (full.width, full.downsample, full.tile_format) == (1024, 1.0, "jpeg")
        assert (tmp_path / "f_files" / str(full.max_level) / "0_0.jpeg").is_file()


def test_finest_mpp_without_slide_mpp_is_ignored_with_a_warning(slides, tmp_path, caplog):
    with open_slide(slides["nompp"]) as slide, caplog.at_level("WARNING"):
        dz = write_deepzoom(tmp_path / "n", slide, finest_mpp=1.0)
    assert (dz.width, dz.downsample, dz.mpp) == (1200, 1.0, None)
    assert "nompp.tiff has no mpp: finest_mpp=1.0 ignored" in caplog.text


def test_array_pyramid_and_replacing_an_old_one(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    dz = write_deepzoom(tmp_path / "x", img, tile_format="png")
    stale = dz.tiles / "0" / "stale.png"
    stale.write_bytes(b"")
    dz = write_deepzoom(tmp_path / "x", img[:100], tile_format="png")
    np.testing.assert_array_equal(_level(dz, dz.max_level), img[:100])
    assert not stale.exists() and dz.height == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.dzi", "x_files"]


@pytest.mark.parametrize(
    "kwargs",
    [{"tile_format": "gif"}, {"finest_mpp": 0}, {"quality": 0}, {"overlap": 200}],
)
def test_bad_pyramid_arguments(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        write_deepzoom(tmp_path / "x", np.zeros((8, 8, 3), np.uint8), **kwargs)
    with pytest.raises(ConfigError, match="uint8"):
        write_deepzoom(tmp_path / "x", np.zeros((8, 8), np.float32))


def _config(text: str) -> dict:
    m = re.search(r'<script type="application/json" id="ss-config">(.+?)</script>', text, re.S)
    return json.loads(m.group(1))


def test_page_is_offline_and_describes_its_layers(slides, tmp_path):
    with open_slide(slides["small"]) as slide:
        page = write_viewer(
            tmp_path / "s 1.viewer.html", slide, slide.dimensions, _grid(), (256.0, 256.0), GEO
        )
    text = page.read_text()
    assert not re.search(r"<script[^>]+src=", text) and not re.search(r"<link[^>]+href=", text)
    assert "OpenSeadragon" in text and "heatmap opacity" in text and "contours (1)" in text
    cfg = _config(text)
    src = cfg["slide"]["source"]["Image"]
    assert src["Url"] == "s%201.viewer_files/" and src["Size"] == {"Width": "1024", "Height": "768"}
    assert cfg["slide"]["mpp"] == 0.5 and cfg["slide"]["width"] == 1024
    assert cfg["heat"]["width"] == 1024 and cfg["heat"]["url"].startswith("data:image/png;base64,")
    (contour,) = cfg["contours"]  # the Point is not drawn; the hole is a second sub-path
    assert contour["color"] == "#dc3220" and contour["d"].count("M") == 2
    assert [p.exists() for p in viewer_files(page)] == [True, True, True]


def test_copied_viewer_points_at_its_copied_tiles(tmp_path):
    img = np.random.default_rng(1).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    page = write_viewer(tmp_path / "a" / "s.viewer.html", img, (960, 640))
    copy = copy_viewer(page, tmp_path / "report" / "img", "ab12-s.viewer.html")
    url = _config(copy.read_text())["slide"]["source"]["Image"]["Url"]
    assert url == "ab12-s.viewer_files/" and (copy.parent / url).is_dir()
    tiles = sorted(p.relative_to(copy.parent / url) for p in (copy.parent / url).rglob("*.jpeg"))
    assert tiles == sorted(
        p.relative_to(viewer_files(page)[2]) for p in viewer_files(page)[2].rglob("*.jpeg")
    )
    assert (copy.parent / "ab12-s.viewer.dzi").is_file()
    bare = tmp_path / "bare.viewer.html"
    bare.write_text("<html>x</html>")  # no pyramid: the page alone
    assert copy_viewer(bare, tmp_path / "r2", "b.html").read_text() == "<html>x</html>"


def test_array_viewer_and_argument_checks(slides, tmp_path):
    thumb = np.full((300, 400, 3), 230, np.uint8)
    page = write_viewer(tmp_path / "t.html", thumb, (4000, 3000), mpp=0.25, title="t")
    cfg = _config(page.read_text())
    assert cfg["slide"]["width"] == 4000 and cfg["slide"]["mpp"] == 0.25 and cfg["heat"] is None
    assert cfg["contours"] == [] and 'id="ss-contours"' not in page.read_text()
    with open_slide(slides["small"]) as slide, pytest.raises(ConfigError, match="slide_size"):
        write_viewer(tmp_path / "u.html", slide, (10, 10))
    with pytest.raises(ConfigError, match="cell"):
        write_viewer(tmp_path / "u.html", thumb, (4000, 3000), _grid())


def test_hostile_title_is_escaped(tmp_path):
    from html.parser import HTMLParser

    hostile = "a' onerror='alert(1)' <script>x</script>"
    page = write_viewer(tmp_path / "h.html", np.zeros((8, 8, 3), np.uint8), (8, 8), title=hostile)
    text = page.read_text()
    seen = {"attrs": [], "title": "", "in_title": False}

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            seen["attrs"] += [k for k, _ in attrs]
            seen["in_title"] = tag == "title"

        def handle_data(self, data):
            if seen["in_title"]:
                seen["title"] += data

    Parser(convert_charrefs=True).feed(text)
    assert seen["title"].strip() == hostile  # shown as text, not markup
    assert "onerror" not in seen["attrs"] and "<script>x</script>" not in text


def test_vendored_openseadragon_has_its_licence():
    from importlib import resources

    folder = resources.files("slidestream.infer").joinpath("static", "openseadragon")
    assert "Redistribution and use" in folder.joinpath("LICENSE.txt").read_text()
    assert folder.joinpath("openseadragon.min.js").read_text().startswith("//! openseadragon 6")


# ------------------------------------------------------------------ in a headless browser
def _browser() -> str:
    names = ("chromium", "chromium-browser", "google-chrome", "chrome")
    found = next((b for b in names if shutil.which(b)), None)
    if found is None:
        pytest.skip("no chromium/chrome binary on PATH (apt-get install chromium)")
    return found


def _chromium(page: Path, hash_: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--window-size=900,700", "--virtual-time-budget=8000", *args, page.as_uri() + hash_]  # fmt: skip
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)


def _state(page: Path, hash_: str = "") -> dict[str, str]:
    html_tag = re.search(r"<html[^>]*>", _chromium(page, hash_, "--dump-dom").stdout).group(0)
    return dict(re.findall(r'data-([a-z0-9-]+)="([^"]*)"', html_tag))


def test_viewer_reaches_the_finest_level_in_a_browser(slides, tmp_path):
    _browser()
    with open_slide(slides["odd"]) as slide:  # 3001x2003 at 0.25 µm/px
        page = write_viewer(
            tmp_path / "o.viewer.html", slide, slide.dimensions, _grid(), (750.0, 667.0), GEO
        )
    whole = _state(page)
    assert whole["opened"] == "1" and whole["items"] == "2" and whole["contours"] == "1"
    assert whole["max-level"] == "12" and int(whole["max-level-loaded"]) < 12
    assert 3.0 < float(whole["l0-per-px"]) < 4.5  # the whole slide fits 900 px
    assert whole["heat-opacity"] == "0.5"
    near = _state(page, "#x=1500&y=1000&scale=0.5&opacity=0.3")
    assert near["max-level-loaded"] == "12" and int(near["tiles-loaded"]) > 0
    assert float(near["um-per-px"]) == pytest.approx(0.125, rel=1e-3)
    assert near["heat-opacity"] == "0.3"


def test_heatmap_and_contours_are_drawn_in_place(tmp_path):
    """A black square on white: the contour (green) and the heatmap's red cell land on it."""
    img = np.full((768, 1024, 3), 255, np.uint8)
    img[256:512, 512:768] = 0
    grid = np.full((3, 4), np.nan)
    grid[1, 2] = 1.0
    geo = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {
        "type": "Polygon", "coordinates": [[[512, 256], [768, 256], [768, 512], [512, 512]]]}}]}  # fmt: skip
    page = write_viewer(
        tmp_path / "b.html", img, (1024, 768), grid, (256.0, 256.0), geo, contour_color="#00ff00"
    )
    shot = tmp_path / "shot.png"
    _chromium(page, "#x=640&y=384&scale=0.5", f"--screenshot={shot}")
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # at 0.5 level-0 px per screen px the cell spans 512 screen px around the centre
    centre = px[400:500, 400:500]
    assert (centre[..., 0] > 40).all() and (centre[..., 1:] < 30).all(), "heat over black"
    green = (px[..., 1] > 200) & (px[..., 0] < 80) & (px[..., 2] < 80)
    cols = np.nonzero(green.any(0))[0]
    assert green.sum() > 500 and cols.min() < 250 and cols.max() > 650, "contour not drawn"
    assert (px[40:60, 5:40] > 240).all(), "white slide left of the square"
