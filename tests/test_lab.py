"""The notebooks and the report in a real browser: headless Chromium (the system's, found on PATH)
driven by Playwright for Python; nothing is downloaded. JupyterLab opens aggregate.ipynb on the
smoke study and runs all its cells; the results browser's widgets and both explorers render and
respond; report.html likewise, offline. Skips cleanly where Chromium or Playwright is absent."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dad3dlib.html_report import AGGREGATE_NB

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # and --no-sandbox as root (TOOLCHAIN)
NOTEBOOK = "window.jupyterapp.shell.currentWidget"
# the share of a canvas's pixels that are not the explorer's background (explorer.js BACKGROUND), and a
# fingerprint of what it shows
CANVAS = """(canvas) => { const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let drawn = 0, sum = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i] !== 236 || d[i + 1] !== 241 || d[i + 2] !== 247) drawn++;
    sum = (sum * 31 + d[i] + 7 * d[i + 1] + 13 * d[i + 2]) % 1000000007; }
  return [drawn / (canvas.width * canvas.height), sum]; }"""


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium under Playwright (module-wide)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python not installed (dev extra)")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if not executable:
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS + (
            ["--no-sandbox"] if os.geteuid() == 0 else []))
        yield browser
        browser.close()


class Page:
    """A browser page that records what would fail silently: uncaught errors, console errors and
    every URL it requested."""

    def __init__(self, browser, width=1400, height=1000):
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.errors, self.requests = [], []
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def canvas(self, locator) -> tuple[float, int]:
        return tuple(locator.evaluate(CANVAS))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(smoke_study, tmp_path_factory):
    """JupyterLab serving a folder that holds aggregate.ipynb with the smoke study as its study_dir
    (injected after the parameters cell, as papermill does), with Jupyter's own directories in the
    test's folder. -> (URL of the notebook, folder, the server's log)"""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook
    import nbformat

    out, _, _ = smoke_study
    root = tmp_path_factory.mktemp("lab")
    nbformat.write(parameterize_notebook(load_notebook_node(str(AGGREGATE_NB)), {"study_dir": str(out)}),
                   root / "aggregate.ipynb")
    jupyter = tmp_path_factory.mktemp("jupyter")
    env = {**os.environ, **{k: str(jupyter / k.lower()) for k in (
        "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTERLAB_SETTINGS_DIR",
        "JUPYTERLAB_WORKSPACES_DIR", "IPYTHONDIR")}}
    notification = jupyter / "jupyterlab_settings_dir/@jupyterlab/apputils-extension/notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))  # no question popping up
    port, token, log = _free_port(), secrets.token_hex(16), root.parent / f"{root.name}.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "is running at" not in log.read_text() and "http://127.0.0.1" not in log.read_text():
            if server.poll() is not None or time.time() > deadline:
                pytest.fail(f"JupyterLab did not start: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/lab/tree/aggregate.ipynb?token={token}", root, log
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the kernels it started
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(scope="module")
def ran_all(lab, chromium):
    """aggregate.ipynb opened in JupyterLab and Run All Cells, once every code cell has run and the
    kernel is idle. -> (Page, seconds it took)"""
    url, _, log = lab
    page = Page(chromium)
    page.page.goto(url, timeout=120_000)
    page.page.wait_for_function(f"window.jupyterapp && {NOTEBOOK} && {NOTEBOOK}.sessionContext && "
                                f"{NOTEBOOK}.sessionContext.session?.kernel?.status === 'idle'", timeout=180_000)
    start = time.time()
    page.page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.page.wait_for_function(f"""(() => {{ const nb = {NOTEBOOK};
        const code = nb.content.widgets.filter(c => c.model.type === 'code');
        return nb.sessionContext.session.kernel.status === 'idle'
            && code.every(c => c.model.executionCount !== null); }})()""",
                                timeout=600_000, polling=1000)
    yield page, time.time() - start
    page.page.close()


def test_aggregate_notebook_runs_all_cells_in_jupyterlab(ran_all):
    page, _ = ran_all
    outputs = page.page.evaluate(f"{NOTEBOOK}.content.widgets.filter(c => c.model.type === 'code')"
                                 ".map(c => c.model.outputs.toJSON())")
    errors = [o for cell in outputs for o in cell if o["output_type"] == "error"]
    assert not errors, errors[0]["ename"] + ": " + errors[0]["evalue"]
    assert any("study: " in o.get("text", "") for o in outputs[2])  # says which study it opened
    assert sum(1 for cell in outputs if cell) >= 10  # tables, figures, explorer, browser
    assert not page.errors, page.errors


def _browser(page):
    """The results browser's output area (the notebook's last cell)."""
    return page.page.locator(".jp-Notebook .jp-Cell").last.locator(".jp-Cell-outputArea")


def test_results_browser_renders_and_responds(ran_all):
    page, _ = ran_all
    b = _browser(page)
    b.scroll_into_view_if_needed()
    assert b.locator(".widget-select-multiple select").count() == 2  # ablations, seeds
    assert b.locator(".widget-dropdown select").count() >= 2  # metric and the attribute filters
    summary = b.locator(".widget-html").first
    assert "6 ablation(s)" in summary.inner_text()
    images = b.locator(".widget-select select").last
    assert " · seed 1 · test_" in _text(images.locator("option").first)
    b.locator(".widget-dropdown select").first.select_option(label="Angle error (°)")
    summary.filter(has_text="mean Angle error (°)").wait_for(timeout=60_000)
    b.locator(".widget-checkbox input").check()
    images.locator("option", has_text="from baseline").first.wait_for(timeout=60_000)
    assert images.locator("option", has_text="baseline · seed").count() == 0  # the baseline is the reference
    ablation, _, item = _text(images.locator("option").nth(1)).split(" · ")[:3]
    images.select_option(index=1)
    shown = b.locator(".dad3d-explorer").filter(  # the selected image, with the baseline's prediction beside
        has=page.page.locator(f'select.x-ablation option:text-is("{ablation} (seed 1)")')).filter(
        has=page.page.locator(f'select.x-sample option:text-is("0: {item}")'))
    shown.wait_for(timeout=60_000)
    assert b.locator(".dad3d-explorer").count() == 1
    assert shown.locator("select.x-ablation option").all_inner_texts() == [f"{ablation} (seed 1)", "baseline (seed 1)"]
    assert not page.errors, page.errors


def _text(locator) -> str:
    """A widget's text, with the no-break spaces ipywidgets puts in option labels as spaces."""
    return locator.inner_text().replace("\xa0", " ")


def _drawn_and_rotates(page, explorer):
    """Both 3D views of an explorer show a head, and dragging the prediction turns both."""
    views = [explorer.locator("canvas.x-prediction"), explorer.locator("canvas.x-gt")]
    explorer.scroll_into_view_if_needed()
    before = [page.canvas(v) for v in views]
    assert all(drawn > 0.1 for drawn, _ in before), before
    box = views[0].bounding_box()
    y = box["y"] + box["height"] / 2
    page.page.mouse.move(box["x"] + box["width"] * 0.3, y)
    page.page.mouse.down()
    page.page.mouse.move(box["x"] + box["width"] * 0.7, y, steps=8)
    page.page.mouse.up()
    assert _until(lambda: all(page.canvas(v)[1] != b[1] for v, b in zip(views, before))), \
        "dragging did not rotate the meshes"


def _until(condition, timeout: float = 10.0) -> bool:
    """Whether ``condition()`` becomes true within ``timeout`` seconds (a redraw may take a frame)."""
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_both_explorers_draw_and_rotate_in_jupyterlab(ran_all):
    page, _ = ran_all
    explorers = page.page.locator(".jp-Notebook .dad3d-explorer")
    assert explorers.count() == 2  # the report's (first seed, first images) and the browser's selected image
    for k in range(2):
        _drawn_and_rotates(page, explorers.nth(k))
    assert not page.errors, page.errors


def test_report_page_offline_with_its_explorer(smoke_study, chromium):
    """report.html: loads nothing but itself, no error, no widget (its browser cell says where the
    browser runs), and its explorer draws, follows the sample picked and rotates."""
    out, _, _ = smoke_study
    page = Page(chromium, height=1600)
    page.page.goto((out / "report.html").as_uri())
    page.page.wait_for_load_state("load")
    assert all(u.startswith(("file:", "data:", "blob:", "about:")) for u in page.requests), page.requests
    assert page.page.locator(".jupyter-widgets, .widget-select-multiple").count() == 0
    assert page.page.get_by_text("The results browser runs in JupyterLab").count() == 1
    explorer = page.page.locator(".dad3d-explorer")
    assert explorer.count() == 1
    image = explorer.locator("canvas.x-image")
    before = page.canvas(image)
    explorer.locator("select.x-sample").select_option(index=1)
    assert _until(lambda: page.canvas(image)[1] != before[1]), "picking another sample did not change the image"
    _drawn_and_rotates(page, explorer)
    assert not page.errors, page.errors
    page.page.close()
