"""One real-browser test: `streamlit run` on 127.0.0.1, Debian's chromium driven by Playwright.

Uploads a real X-ray (a synthetic chest-like image without the data), waits for the Grad-CAM
overlay and saves a screenshot under the test's tmp dir. Without chromium or Playwright it skips,
with the reason, on a developer's machine, and FAILS under CI (``CI`` set, as .ci/run does), so
CI is never green without having opened a browser. The helpers here are also used by
tests/benchmarks/bench_dashboard.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from core import config

CHROMIUM = os.environ.get("CXR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]
APP = config.REPO_ROOT / "dashboard" / "app.py"
OVERLAY = 'img[alt="heatmap overlay gradcam"]'


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        return f"chromium not found at {CHROMIUM} (apt-get install chromium; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def streamlit_server(data: Path, runs_root: Path | None = None, port: int | None = None, log: Path | None = None):
    """Start ``streamlit run dashboard/app.py -- --data DATA`` headless on 127.0.0.1; yield (url, t_start)."""
    port = port or free_port()
    env = {**os.environ, "CXR_DATA_DIR": str(data), "TF_CPP_MIN_LOG_LEVEL": "2",
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    if runs_root is not None:
        env["CXR_RUNS_DIR"] = str(runs_root)
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
           "--server.address", "127.0.0.1", "--server.headless", "true", "--server.fileWatcherType", "none",
           "--browser.gatherUsageStats", "false", "--", "--data", str(data)]
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=config.REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with code {proc.returncode}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("streamlit did not answer /_stcore/health within 90 s")
            time.sleep(0.2)
        yield url, t0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()


@contextmanager
def browser_page(width: int = 1500, height: int = 1100):
    """A chromium page (Debian's binary, no browser download)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(120_000)
            yield page
        finally:
            browser.close()


def open_app(page, url: str) -> None:
    """Load the app and wait until the Explain page's uploader is there."""
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_text("Explain a chest X-ray").first.wait_for()
    page.locator('input[type="file"]').first.wait_for(state="attached")


def overlay_src(page) -> str | None:
    el = page.query_selector(OVERLAY)
    return el.get_attribute("src") if el else None


def wait_idle(page, quiet_s: float = 0.4) -> None:
    """Wait until the app's script run is over (no 'running' status for ``quiet_s``)."""
    quiet_since = None
    while True:
        running = page.query_selector('[data-testid="stStatusWidgetRunningIcon"]') is not None
        now = time.perf_counter()
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= quiet_s:
            return
        page.wait_for_timeout(25)


def upload_and_wait(page, name: str, data: bytes, mime: str = "image/png", previous: str | None = None,
                    until_idle: bool = False) -> tuple[float, float | None]:
    """Upload one file and wait until a new Grad-CAM overlay is loaded in the page.

    Returns (seconds to the overlay, seconds until the whole page is done or None), the second
    with ``until_idle`` (the quiet period itself is not counted).
    """
    t0 = time.perf_counter()
    page.locator('input[type="file"]').first.set_input_files({"name": name, "mimeType": mime, "buffer": data})
    page.wait_for_function(
        """([sel, prev]) => { const el = document.querySelector(sel);
             return el && el.complete && el.naturalWidth > 0 && el.getAttribute('src') !== prev; }""",
        arg=[OVERLAY, previous], polling=25)
    overlay_s = time.perf_counter() - t0
    if not until_idle:
        return overlay_s, None
    wait_idle(page)
    return overlay_s, time.perf_counter() - t0 - 0.4


def sample_upload(data_root: Path | None) -> tuple[str, bytes]:
    """A real X-ray from the data when present, else a synthetic chest-like PNG."""
    if data_root is not None:
        files = sorted((Path(data_root) / "nih" / "Pneumonia").glob("*.png"))
        if files:
            return files[0].name, files[0].read_bytes()
    from test_dashboard import chest_like_png

    return "synthetic-chest.png", chest_like_png()


def under_ci() -> bool:
    """True on CI (the ``CI`` variable that CI services and .ci/run set), where nothing may skip quietly."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.mark.slow
def test_upload_in_a_real_browser(tmp_path, request, shipped_run):
    why = browser_missing()
    if why and under_ci():
        pytest.fail(f"CI must run the browser test, but {why}", pytrace=False)
    if why:
        pytest.skip(why)
    try:
        data_root = request.getfixturevalue("cxr_root")
    except pytest.skip.Exception:
        data_root = None
    runs_root = tmp_path / "runs"  # the shipped model is listed first anyway
    data_arg = data_root if data_root is not None else tmp_path / "no-data"
    data_arg.mkdir(exist_ok=True)
    name, data = sample_upload(data_root)
    with streamlit_server(data_arg, runs_root, log=tmp_path / "streamlit.log") as (url, _), browser_page() as page:
        open_app(page, url)
        seconds, _ = upload_and_wait(page, name, data)
        page.get_by_text("P(covid)").first.wait_for()
        page.get_by_text("Download case report (HTML)").first.wait_for()
        page.wait_for_timeout(500)  # let the last elements settle before the screenshot
        shot = tmp_path / "explain.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        body = page.inner_text("body")
    assert "Traceback" not in body
    assert "Decision at the run's operating point" in body or "No answer is given" in body
    print(f"upload -> overlay {seconds:.2f} s (cold); screenshot {shot}")
