"""The exported feature dashboard in a real browser: headless Chromium opens it from ``file://`` with every other
request refused. Its own module: Playwright's sync API cannot start while test_browser.py's session is open.
Screenshots as in test_browser.py (pytest's tmp dir; ``runs/screenshots/`` with ``CLTLAB_KEEP_SCREENSHOTS=1``)."""

from __future__ import annotations

import os
import re
import shutil

import pytest
from helpers import make_clt
from test_browser import CHROMIUM, FLAGS, KEPT_SCREENSHOTS, TIMEOUT_MS

import cltlab

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs it)")


@pytest.fixture
def screenshots(tmp_path):
    folder = tmp_path / "screenshots"
    folder.mkdir()
    yield folder
    if os.environ.get("CLTLAB_KEEP_SCREENSHOTS"):
        shutil.copytree(folder, KEPT_SCREENSHOTS, dirs_exist_ok=True)


def test_the_exported_dashboard_works_offline_from_file_urls(tmp_path, tiny_gpt2, screenshots):
    """The static site in Chromium from file://, every network request refused: the plots render, and a
    neighbour link opens that feature's page, whose plots render too."""
    from playwright.sync_api import sync_playwright

    profile = cltlab.config.get_profile("ci")
    cltlab.harvest(profile.harvest, tmp_path / "acts", model=tiny_gpt2, progress=False)
    buffer = cltlab.DiscBuffer(tmp_path / "acts")
    clt = make_clt(buffer.n_layers, buffer.d_model, 16, normalization=False, threshold_init=0.5, seed=1)
    clt.set_normalization(*buffer.stats)
    stats = cltlab.feature_statistics(clt, buffer, model=tiny_gpt2, progress=False)
    index = cltlab.export_dashboard(stats, clt, tiny_gpt2, tmp_path / "site", progress=False)
    requested = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.set_default_timeout(TIMEOUT_MS)
        page.route(
            re.compile(r"^(?!file:).*"), lambda route: (requested.append(route.request.url), route.abort())
        )
        page.goto(index.as_uri())
        page.locator("a", has_text="layer 2").click()
        page.locator("#features tbody tr").first.wait_for()
        page.locator("th", has_text="max activation").click()  # sort: the largest maximum first
        peaks = [float(v) for v in page.locator("#features tbody tr td:nth-child(3)").all_inner_texts()]
        assert peaks == sorted(peaks, reverse=True)
        page.locator("#features tbody tr a").first.click()
        page.locator("#activations .main-svg").first.wait_for()
        assert page.locator(".js-plotly-plot").count() == 3
        assert page.locator(".js-plotly-plot .bars path").count() > 0  # bars were drawn
        first = page.locator("h1").inner_text()
        page.screenshot(path=str(screenshots / "dashboard_feature.png"), full_page=True)
        neighbour = page.locator("a.neighbour").first
        name = neighbour.inner_text()
        neighbour.click()
        page.wait_for_function(
            f"() => document.querySelector('h1')?.innerText.toLowerCase() === {name.lower()!r}"
        )
        page.locator("#norms .main-svg").first.wait_for()
        assert page.locator("h1").inner_text() != first and page.locator(".js-plotly-plot").count() == 3
        assert page.locator(".contexts .ctx i.f").count() >= 1  # the contexts, their top tokens outlined
        page.screenshot(path=str(screenshots / "dashboard_neighbour.png"), full_page=True)
        browser.close()
    assert requested == []  # nothing outside the site was asked for
