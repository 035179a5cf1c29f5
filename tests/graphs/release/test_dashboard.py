"""The offline dashboard: static checks (no network reference, every local link resolves), then a
real headless Chromium loading the index, a feature page and the graph viewer (DOM after the
scripts ran, and screenshots that are not blank)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from graphs.release import load_release

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
]
LINK = re.compile(r'(?:src|href)="([^"#]*)(?:#[^"]*)?"')


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip(
        "no Chromium on this machine: install it with `apt-get install -y chromium` (.ci/run does "
        "this)"
    )


def browse(chromium: str, url: str, profile: Path, *extra: str) -> str:
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_site_is_offline_and_every_local_link_resolves(tiny_release: Path) -> None:
    site = tiny_release / "dashboard"
    pages = sorted(site.rglob("*.html"))
    assert len(list((site / "features").glob("*.html"))) == 256  # one page per feature
    for page in [site / "index.html", site / "graph.html", *pages[:40]]:
        text = page.read_text()
        for target in LINK.findall(text):
            assert not re.match(r"[a-z]+://|//", target), f"{page} reaches the network: {target}"
            assert not target or (page.parent / target).exists(), (
                f"{page} links to missing {target}"
            )
    assert (
        all(p.stat().st_size > 1000 for p in (site / "plots").glob("*.png"))
        and (site / "plots" / "features.png").exists()
    )


def test_feature_page_shows_label_stats_logits_and_contexts(tiny_release: Path) -> None:
    release = load_release(tiny_release)
    row = release.data["features"][7]
    page = (tiny_release / "dashboard" / "features" / "7.html").read_text()
    assert "heuristic" in page and 'class="hist"' in page
    assert page.count('class="ctx"') == len(release.examples_of(7))
    assert all(
        token.replace("<", "&lt;") in page
        for token in row["top_logit_tokens"][:1]
        if token.isalnum()
    )


def test_chromium_renders_index_feature_page_and_graph_viewer(
    chromium: str, tiny_release: Path, tmp_path: Path
) -> None:
    site = tiny_release / "dashboard"
    features = load_release(tiny_release).data["features"]
    densest = int(np.argmax(features["density"]))
    index = browse(
        chromium, f"{site.as_uri()}/index.html#sort=density", tmp_path / "p1", "--dump-dom"
    )
    rows = re.findall(r'<tr data-feature="(\d+)"', index)
    # the script drew every feature, densest first
    assert len(rows) == 256 and int(rows[0]) == densest
    assert "showing 256 of 256" in index
    label_word = next(w for w in features["top_tokens"][densest] if w.isalpha())
    searched = browse(
        chromium, f"{site.as_uri()}/index.html#q={label_word}", tmp_path / "p2", "--dump-dom"
    )
    found = [int(r) for r in re.findall(r'<tr data-feature="(\d+)"', searched)]
    assert densest in found and len(found) < 256  # search filtered
    page = browse(
        chromium, f"{site.as_uri()}/features/{densest}.html", tmp_path / "p3", "--dump-dom"
    )
    assert f"feature {densest}" in page and page.count('class="ctx"') >= 10
    viewer = browse(chromium, f"{site.as_uri()}/graph.html", tmp_path / "p4", "--dump-dom")
    assert len(re.findall(r'<circle[^>]*class="node"', viewer)) > 10 and "<line" in viewer
    # a token is selected and its paths listed
    assert "reasoning paths" in viewer and 'class="on"' in viewer
    assert viewer.count("<option") == 2


def test_chromium_screenshots_are_not_blank(
    chromium: str, tiny_release: Path, tmp_path: Path
) -> None:
    from matplotlib.image import imread

    site = tiny_release / "dashboard"
    for i, page in enumerate(("index.html", "graph.html")):
        png = tmp_path / f"{i}.png"
        browse(
            chromium,
            f"{site.as_uri()}/{page}",
            tmp_path / f"s{i}",
            f"--screenshot={png}",
            "--window-size=1200,900",
        )
        pixels = imread(png)[..., :3]  # [h, w, 3] floats in [0, 1]
        assert pixels.shape[:2] == (900, 1200)
        assert pixels.std() > 0.05, f"{page} rendered blank"
        assert (np.abs(pixels - pixels[0, 0]).sum(-1) > 0.3).mean() > 0.01  # more than a background
