"""The zoomable viewer: a standalone offline page with slide, heatmap and contours."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from slidestream.infer.viewer import write_viewer


def _page(tmp_path, name="v.html", title="s1"):
    thumb = np.full((300, 400, 3), 230, np.uint8)
    thumb[100:200, 100:300] = (180, 60, 140)  # "tissue"
    grid = np.full((3, 4), np.nan)
    grid[1, 1:3] = [0.2, 0.9]
    geo = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [
                        [[1000, 1000], [3000, 1000], [3000, 2000], [1000, 2000], [1000, 1000]],
                        [[1500, 1200], [1800, 1200], [1800, 1500], [1500, 1200]],
                    ],
                },
                "properties": {"classification": {"name": "tumour"}},
            }
        ],
    }
    return write_viewer(
        tmp_path / name, thumb, (4000, 3000), grid, (1000.0, 1000.0), geo, title=title
    )


def _doc(text):
    m = re.search(r'<script type="application/json" id="[^"]+">\s*(.+?)\s*</script>', text, re.S)
    return json.loads(m.group(1))


def test_page_is_offline_and_holds_the_three_layers(tmp_path):
    text = _page(tmp_path).read_text()
    assert not re.search(r"<script[^>]+src=", text)  # bokeh's JavaScript is inline
    assert "cdn.bokeh.org" not in text
    doc = json.dumps(_doc(text))
    for name in ("slide", "heatmap", "contours"):
        assert f'"name": "{name}"' in doc, name
    assert "heatmap opacity" in doc and "contours (1)" in doc and "WheelZoomTool" in doc


def test_hostile_title_is_escaped(tmp_path):
    from html.parser import HTMLParser

    hostile = "a' onerror='alert(1)' <script>x</script>"
    text = _page(tmp_path, title=hostile).read_text()
    seen = {"attrs": [], "title": "", "in_title": False, "scripts": 0}

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            seen["attrs"] += [k for k, _ in attrs]
            seen["in_title"] = tag == "title"
            seen["scripts"] += tag == "script"

        def handle_data(self, data):
            if seen["in_title"]:
                seen["title"] += data

    Parser(convert_charrefs=True).feed(text)
    assert seen["title"].strip() == hostile  # shown as text, not markup
    assert "onerror" not in seen["attrs"] and "<script>x</script>" not in text


def test_page_renders_in_a_headless_browser(tmp_path):
    browser = next(
        (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None:
        pytest.skip("no headless browser installed")
    page = _page(tmp_path)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=900,700",
         "--virtual-time-budget=5000", f"--screenshot={shot}", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the slide's grey background and the heatmap's high (red) cell are drawn on the canvas
    grey = (abs(pixels - 230).sum(-1) < 12).mean()
    red = ((pixels[..., 0] > 150) & (pixels[..., 1] < 90) & (pixels[..., 2] < 110)).mean()
    assert grey > 0.2, "the slide image was not drawn"
    assert red > 0.02, "the heatmap was not drawn"
