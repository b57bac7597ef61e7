"""The widgets in a real browser: JupyterLab started with jupyter_config/ on loopback, driven by headless Chromium.

03_features and 04_replacement run top to bottom in the page; the FeatureBrowser must render its plotly figure
and its shaded contexts and answer a changed feature number through the kernel, and a feature button of the
ReplacementComparison must open that feature in the browser below it. Screenshots of the widgets are saved in
pytest's tmp dir, and copied to the checkout's ``runs/screenshots/`` only with ``CLTLAB_KEEP_SCREENSHOTS=1``.
Skipped only where no Chromium is installed (``.ci/run`` installs Debian's ``chromium``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import make_clt

import cltlab

ROOT = Path(__file__).resolve().parents[1]
KEPT_SCREENSHOTS = ROOT / "runs" / "screenshots"
"""Where the screenshots are copied with ``CLTLAB_KEEP_SCREENSHOTS=1``."""
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VISIBLE_PROMPTS = (
    "[...[...document.querySelectorAll('.jp-NotebookPanel')].find(p => !p.classList.contains('lm-mod-hidden'))"
    ".querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
)
"""The input prompts of the notebook on screen, as a JavaScript array expression."""
TIMEOUT_MS = int(os.environ.get("CLTLAB_BROWSER_TIMEOUT_MS", 120_000))

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on this machine (.ci/run installs Debian's `chromium`; elsewhere install it to run this)",
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_gpt2):
    """A CI-profile run: a harvested buffer and a random CLT with the buffer's normalization."""
    paths = cltlab.run.run_paths("ci", tmp_path_factory.mktemp("lab-run"))
    profile = cltlab.config.get_profile("ci")
    cltlab.harvest(profile.harvest, paths.buffer, model=tiny_gpt2, progress=False)
    buffer = cltlab.DiscBuffer(paths.buffer)
    clt = make_clt(buffer.n_layers, buffer.d_model, 32, normalization=False, threshold_init=0.5, seed=1)
    clt.set_normalization(*buffer.stats)
    with torch.no_grad():
        clt.activation.log_threshold[:, -1] = 10.0  # one dead feature per layer
    clt.save(paths.clt)
    return paths.root


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    """The screenshots' folder in pytest's tmp dir; copied to ``KEPT_SCREENSHOTS`` when asked, failures included."""
    folder = tmp_path_factory.mktemp("screenshots")
    yield folder
    if os.environ.get("CLTLAB_KEEP_SCREENSHOTS"):
        shutil.copytree(folder, KEPT_SCREENSHOTS, dirs_exist_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, run_dir):
    """``jupyter lab`` as ``make lab`` starts it, on a copy of the notebooks (so nothing autosaves into git)."""
    tmp = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", tmp / "notebooks")
    port, token = free_port(), "cltlab-browser-test"
    env = dict(
        os.environ,
        CLTLAB_PROFILE="ci",
        CLTLAB_RUN_DIR=str(run_dir),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
    )
    command = [
        str(Path(sys.executable).with_name("jupyter")),
        "lab",
        f"--config={ROOT / 'jupyter_config' / 'jupyter_lab_config.py'}",
        f"--ServerApp.root_dir={tmp / 'notebooks'}",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--LabApp.user_settings_dir={tmp / 'user-settings'}",
        f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
    ]
    log = open(tmp / "lab.log", "w")  # noqa: SIM115
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"jupyter lab did not start:\n{(tmp / 'lab.log').read_text()}"
                    ) from None
                time.sleep(0.3)
        yield url, token, tmp
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def page(lab):
    from playwright.sync_api import sync_playwright

    url, token, tmp = lab
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp / "chromium-profile"),  # a fresh --user-data-dir
            executable_path=CHROMIUM,
            args=FLAGS,
            headless=True,
            viewport={"width": 1500, "height": 2000},
        )
        context.set_default_timeout(TIMEOUT_MS)
        page = context.pages[0] if context.pages else context.new_page()
        page.goto(f"{url}/lab?token={token}")
        yield page
        context.close()


def run_all(page, url: str, token: str, notebook: str, screenshots: Path) -> None:
    """Open ``notebook`` in the lab and run all its cells through the Run menu; wait until they finished."""
    page.goto(f"{url}/lab/tree/{notebook}?reset&token={token}")  # reset: only this notebook in the workspace
    page.locator(".lm-TabBar-tab.jp-mod-current", has_text=notebook).wait_for()
    panel = page.locator(".jp-NotebookPanel:visible")
    panel.locator(".jp-Cell").first.wait_for()
    panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for()  # its kernel started
    panel.locator(".jp-Cell").first.click()  # focus this notebook: the Run menu acts on the focused one
    run_all_item = page.locator(
        ".lm-Menu-item:not(.lm-mod-disabled)",
        has=page.locator(".lm-Menu-itemLabel", has_text=re.compile("^Run All Cells$")),
    )
    for attempt in range(3):  # the menu item can be clicked before the lab has wired it to this notebook
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
        run_all_item.click()
        try:
            page.wait_for_function(
                f"() => {VISIBLE_PROMPTS}.some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))", timeout=15_000
            )
            break
        except Exception:
            if attempt == 2:
                raise
            page.keyboard.press("Escape")
    # Every code cell gets an execution count: "[n]:" replaces the "[*]:" of a running or queued cell.
    try:
        page.wait_for_function(
            f"() => {VISIBLE_PROMPTS}.length > 0 && {VISIBLE_PROMPTS}.every(p => /\\[\\d+\\]/.test(p.textContent))"
        )
    except Exception:
        page.screenshot(path=str(screenshots / f"failed-{notebook}.png"), full_page=True)
        raise


def test_feature_browser_renders_and_answers_in_jupyterlab(page, lab, screenshots):
    url, token, _ = lab
    run_all(page, url, token, "03_features.ipynb", screenshots)
    assert "Traceback" not in page.locator(".jp-NotebookPanel:visible").inner_text()
    browser = page.locator(".cltlab-feature-browser")
    browser.locator(".js-plotly-plot .main-svg").first.wait_for()
    assert browser.locator(".js-plotly-plot").count() == 1  # the plotly FigureWidget
    assert browser.locator(".cltlab-contexts .cltlab-token").count() > 10  # shaded tokens of the contexts
    assert browser.locator(".cltlab-contexts .cltlab-focus").count() >= 1
    assert browser.locator(".cltlab-token-effects td").count() > 0
    assert browser.locator(".js-plotly-plot .subplot .bars path").count() > 0  # bars were drawn
    header = browser.locator(".widget-html-content", has_text="feature").first
    assert "density" in header.inner_text()
    browser.screenshot(path=str(screenshots / "feature_browser.png"))
    # Type another feature number: the kernel redraws the header (the widget round trip works in the browser).
    number = browser.locator(".widget-inline-hbox", has_text="feature").locator("input")
    number.fill("31")
    number.press("Enter")
    page.wait_for_function(
        "() => document.querySelector('.cltlab-feature-browser').innerText.includes('feature 31')"
    )
    assert "dead" in browser.inner_text()  # the last feature of every layer never fires
    browser.screenshot(path=str(screenshots / "feature_browser_dead.png"))
    page.screenshot(path=str(screenshots / "03_features.png"), full_page=True)


def test_replacement_comparison_links_features_to_the_browser(page, lab, screenshots):
    url, token, _ = lab
    run_all(page, url, token, "04_replacement.ipynb", screenshots)
    assert "Traceback" not in page.locator(".jp-NotebookPanel:visible").inner_text()
    comparison = page.locator(".cltlab-replacement-comparison")
    try:
        comparison.locator(".cltlab-top-tokens td").first.wait_for()
    except Exception:
        page.screenshot(path=str(screenshots / "failed-comparison.png"), full_page=True)
        raise
    assert comparison.locator(".cltlab-top-tokens tbody tr").count() == 8
    assert "KL(original" in comparison.inner_text()
    assert comparison.locator(".js-plotly-plot").count() == 2  # error per layer + the browser's figure
    link = comparison.locator(".cltlab-feature-link").nth(1)
    label = link.inner_text()
    layer, feature = re.match(r"L(\d+) #(\d+)", label).groups()
    link.click()
    page.wait_for_function(
        "text => document.querySelector('.cltlab-replacement-comparison .cltlab-feature-browser')"
        ".innerText.includes(text)",
        arg=f"layer {layer} · feature {feature}",
    )
    comparison.screenshot(path=str(screenshots / "replacement_comparison.png"))


FEATURE_POINT = """() => {
    const plot = document.querySelector('.cltlab-attribution-graph .js-plotly-plot');
    const traces = [...plot.querySelectorAll('.scatterlayer .trace')];
    const features = traces.find(g => g.__data__ && g.__data__[0].trace.name === 'feature');
    const points = [...features.querySelectorAll('path.point')];
    points[0].scrollIntoView({block: 'center', inline: 'nearest'});
    const box = points[0].getBoundingClientRect();
    return {x: box.x + box.width / 2, y: box.y + box.height / 2, n: points.length};
}"""
"""Scroll the first marker of the graph's feature trace into view and return its centre (plotly binds each
trace's data to its ``g.trace``)."""


def test_attribution_graph_click_opens_the_feature_in_the_browser(page, lab, screenshots):
    url, token, _ = lab
    run_all(page, url, token, "06_attribution.ipynb", screenshots)
    assert "Traceback" not in page.locator(".jp-NotebookPanel:visible").inner_text()
    view = page.locator(".cltlab-attribution-graph")
    plot = view.locator(".js-plotly-plot").first
    try:
        plot.locator(".scatterlayer path.point").first.wait_for()
    except Exception:
        page.screenshot(path=str(screenshots / "failed-attribution.png"), full_page=True)
        raise
    assert "replacement score" in view.locator(".cltlab-graph-scores").inner_text()
    assert view.locator(".js-plotly-plot").count() == 2  # the graph + the FeatureBrowser's figure
    point = page.evaluate(FEATURE_POINT)
    assert point["n"] > 0
    # Plotly reports a click on the point under the cursor: hover it first, then click.
    page.mouse.move(point["x"], point["y"])
    page.mouse.click(point["x"], point["y"])
    selected = view.locator(".cltlab-selected-node")
    try:
        selected.wait_for(timeout=30_000)
    except Exception:
        page.screenshot(path=str(screenshots / "failed-attribution-click.png"), full_page=True)
        raise AssertionError(f"clicking the feature marker at {point} selected nothing") from None
    feature, layer = re.search(r"feature (\d+) · layer (\d+)", selected.inner_text()).groups()
    page.wait_for_function(
        "text => document.querySelector('.cltlab-attribution-graph .cltlab-feature-browser')"
        ".innerText.includes(text)",
        arg=f"layer {layer} · feature {feature}",
    )
    assert not view.locator("button", has_text="Zero feature").is_disabled()
    view.locator("button", has_text="Zero feature").click()
    view.locator(".cltlab-intervention td").first.wait_for()
    view.evaluate("element => element.scrollIntoView({block: 'start', inline: 'nearest'})")
    view.screenshot(path=str(screenshots / "attribution_graph.png"))
    page.screenshot(path=str(screenshots / "06_attribution.png"), full_page=True)
