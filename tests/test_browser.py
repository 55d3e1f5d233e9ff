"""Real-browser tests: `streamlit run` on 127.0.0.1, Debian's chromium driven by Playwright.

Uploads a real X-ray (a synthetic chest-like image without the data), waits for the heatmap on
the original film and its trust panel, works the controls (lung outline, method, opacity, view,
wipe), downloads the report, and checks a screenshot: the film panel correlates with the film
and the heat sits where ``core`` puts it. Skips, with the reason, when chromium or Playwright is
missing on a developer's machine, and FAILS under CI (``CI`` set, as .ci/run does), so CI is never
green without having opened a browser. The helpers here are also used by
tests/benchmarks/bench_dashboard.py.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest

from core import config, runs

CHROMIUM = os.environ.get("CXR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]
APP = config.REPO_ROOT / "dashboard" / "app.py"
OVERLAY = ".stPlotlyChart image"  # the first picture of the first overlay figure (a plotly image trace)
TRUST_TITLE = "How far to trust this map"
# True once the first overlay shows a picture other than ``prev`` and a trust panel that is not stale.
_READY_JS = """([sel, prev, title]) => {
  const el = document.querySelector(sel);
  if (!el) return false;
  const href = el.getAttribute('href') || el.getAttribute('xlink:href');
  if (!href || href === prev) return false;
  const fresh = [...document.querySelectorAll('[data-testid="stMarkdownContainer"]')].filter(
    (m) => m.innerText.includes(title) && !m.closest('[data-stale="true"]'));
  return fresh.length > 0 && !el.closest('[data-stale="true"]');
}"""


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
def streamlit_server(data: Path, runs_root: Path | None = None, port: int | None = None, log: Path | None = None,
                     runs_flag: bool = False):
    """Start ``streamlit run dashboard/app.py -- --data DATA`` headless on 127.0.0.1; yield (url, t_start).

    ``runs_root`` is passed as ``$CXR_RUNS_DIR``, or with ``runs_flag`` as ``--runs`` after ``--``."""
    port = port or free_port()
    env = {**os.environ, "CXR_DATA_DIR": str(data), "TF_CPP_MIN_LOG_LEVEL": "2",
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    if runs_root is not None and not runs_flag:
        env["CXR_RUNS_DIR"] = str(runs_root)
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
           "--server.address", "127.0.0.1", "--server.headless", "true", "--server.fileWatcherType", "none",
           "--browser.gatherUsageStats", "false", "--", "--data", str(data)]
    if runs_root is not None and runs_flag:
        cmd += ["--runs", str(runs_root)]
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
    """The data URI of the first overlay picture shown (None before the first)."""
    el = page.query_selector(OVERLAY)
    return (el.get_attribute("href") or el.get_attribute("xlink:href")) if el else None


def wait_new_overlay(page, previous: str | None) -> None:
    """Wait until the first overlay picture differs from ``previous`` and its trust panel is fresh."""
    page.wait_for_function(_READY_JS, arg=[OVERLAY, previous, TRUST_TITLE], polling=25)


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
    """Upload one file and wait until a new overlay on the film and its trust panel are shown.

    Returns (seconds to the overlay, seconds until the whole page is done or None), the second
    with ``until_idle`` (the quiet period itself is not counted).
    """
    t0 = time.perf_counter()
    page.locator('input[type="file"]').first.set_input_files({"name": name, "mimeType": mime, "buffer": data})
    wait_new_overlay(page, previous)
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


def element_pixels(page, element) -> np.ndarray:
    """RGB pixels of one element of the page as shown (a screenshot clipped to its box)."""
    from PIL import Image

    element.scroll_into_view_if_needed()
    png = element.screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def core_view(name: str, data: bytes):
    """What core says for this film with the shipped model: the film at display size and Grad-CAM on it."""
    from core import explain, inputs
    from core import model as cmodel

    model = runs.load_model(config.DEFAULT_RUN)
    cfg = runs.read_config(config.DEFAULT_RUN)
    x, box, _, film = inputs.load(data, cmodel.input_size(model), inputs.settings(cfg), name=name)
    shown = explain.display_film(film)
    return shown, inputs.to_film(explain.explain(model, x, "gradcam"), box, shown.shape)


def covid_upload(data_root: Path | None) -> tuple[str, bytes]:
    """A COVID-19 film of ieee8023 when the data is there (its Grad-CAM for covid is not blank)."""
    if data_root is not None:
        from core import datasets

        t = datasets.read_ieee8023(Path(data_root) / "ieee8023", base=data_root)
        path = Path(data_root) / sorted(t.loc[t["label"] == "covid", "path"])[3]
        return path.name, path.read_bytes()
    return sample_upload(None)


def pick(page, label: str) -> None:
    """Click a radio option or toggle by its visible label."""
    page.get_by_text(label, exact=True).first.click()


def wait_redrawn(page, previous: str | None) -> str:
    wait_new_overlay(page, previous)
    wait_idle(page)
    return overlay_src(page)


def need_browser() -> None:
    """Skip with the reason when no browser is here, but FAIL under CI (never green without one)."""
    why = browser_missing()
    if why and under_ci():
        pytest.fail(f"CI must run the browser test, but {why}", pytrace=False)
    if why:
        pytest.skip(why)


@pytest.mark.slow
def test_upload_in_a_real_browser(tmp_path, request, shipped_run):
    need_browser()
    try:
        data_root = request.getfixturevalue("cxr_root")
    except pytest.skip.Exception:
        data_root = None
    runs_root = tmp_path / "runs"  # the shipped model is listed first anyway
    data_arg = data_root if data_root is not None else tmp_path / "no-data"
    data_arg.mkdir(exist_ok=True)
    name, data = covid_upload(data_root)
    film, heat = core_view(name, data)
    assert heat.max() > 0, "the check needs a film whose Grad-CAM map is not blank"
    with streamlit_server(data_arg, runs_root, log=tmp_path / "streamlit.log") as (url, _), browser_page() as page:
        open_app(page, url)
        mime = "image/png" if name.lower().endswith(".png") else "image/jpeg"
        seconds, _ = upload_and_wait(page, name, data, mime, until_idle=True)
        page.get_by_text("P(covid)").first.wait_for()
        src = overlay_src(page)
        pick(page, "Lung outline")  # the outline on
        src = wait_redrawn(page, src)
        slider = page.get_by_role("slider", name="Opacity").first  # opacity 0.40 -> 0.60
        slider.focus()
        for _ in range(4):
            page.keyboard.press("ArrowRight")
        src = wait_redrawn(page, src)
        pick(page, "wipe")  # the slider-style blend
        src = wait_redrawn(page, src)
        page.locator('[data-testid="stMultiSelect"] input').first.click()  # add a second method
        page.keyboard.type("LayerCAM")
        page.keyboard.press("Enter")
        page.keyboard.press("Escape")
        page.locator(".stPlotlyChart").nth(1).wait_for()
        wait_idle(page)
        pick(page, "side by side")
        src = wait_redrawn(page, src)
        with page.expect_download() as dl:
            page.get_by_text("Download case report (HTML)").first.click()
        report_html = Path(dl.value.path()).read_text()
        with page.expect_download() as dl:
            page.get_by_text("Download case report (PDF)").first.click()
        report_pdf = Path(dl.value.path()).read_bytes()
        shot = tmp_path / "explain.png"
        page.screenshot(path=str(shot), full_page=True)
        pictures = page.locator(".stPlotlyChart").first.locator("image")
        assert pictures.count() == 2, "side by side: the film and the overlay"
        left, right = (element_pixels(page, pictures.nth(i)) for i in range(2))
        body = page.inner_text("body")
    assert shot.stat().st_size > 10_000
    assert "Traceback" not in body and TRUST_TITLE in body
    assert "Decision at the run's operating point" in body or "No answer is given" in body
    assert TRUST_TITLE in report_html and "data:image/png;base64," in report_html
    assert report_pdf.startswith(b"%PDF") and TRUST_TITLE.encode() in report_pdf
    # The screenshot against core: the film panel is the film (aligned, not blank, not offset) ...
    h, w = left.shape[:2]
    small = cv2.resize(film, (w, h), interpolation=cv2.INTER_AREA)
    grey = left.mean(axis=-1)
    aligned = corr(grey, small)
    shifted = corr(grey[:, : w - w // 20], small[:, w // 20 :])
    assert grey.std() > 10 and aligned > 0.8 and aligned > shifted + 0.05, (aligned, shifted)
    # ... and the heat in the overlay panel sits where core says: red minus blue of the shown
    # overlay against red minus blue of core's map through jet (the film's grey adds none; jet's
    # red - blue is not monotonic in the heat, so the map itself would be the wrong reference).
    hot = cv2.resize(heat, (right.shape[1], right.shape[0]), interpolation=cv2.INTER_AREA)
    jet = cv2.applyColorMap(np.clip(hot * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET).astype(float)
    hot = jet[..., 2] - jet[..., 0]  # BGR
    rb = right[..., 0].astype(float) - right[..., 2].astype(float)
    where, moved = corr(rb, hot), corr(rb, np.roll(hot, (h // 4, w // 4), axis=(0, 1)))
    assert where > 0.5 and where > moved + 0.15, (where, moved)
    print(f"upload -> overlay and trust panel {seconds:.2f} s (cold); film r={aligned:.3f} (shifted {shifted:.3f}); "
          f"heat r={where:.3f} (moved by a quarter {moved:.3f}); screenshot {shot}")


@pytest.mark.slow  # adopts a small model, then drives a browser
def test_upload_on_an_adopted_run_in_a_real_browser(tmp_path, monkeypatch):
    """``--runs`` holds an adopted run: pick it in the sidebar, upload a film, see the overlay and trust panel."""
    need_browser()
    from test_adopted_pages import RUN_NAME, adopted_run

    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    run, data = adopted_run(tmp_path)
    from test_dashboard import chest_like_png

    with streamlit_server(data, run.parent, log=tmp_path / "streamlit.log", runs_flag=True) as (url, _), \
            browser_page() as page:
        open_app(page, url)
        page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').first.click()
        page.get_by_role("option", name=RUN_NAME).first.click()
        wait_idle(page)
        page.locator('input[type="file"]').first.wait_for(state="attached")  # the Explain page, same session
        upload_and_wait(page, "chest.png", chest_like_png(), until_idle=True)
        page.get_by_text("P(covid)").first.wait_for()
        picked = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').first.inner_html()
        body = page.inner_text("body")
    # the picked run's name is the select's value (an input's value or aria label, not its inner text)
    assert RUN_NAME in picked and "shipped model" not in picked, picked
    assert "Traceback" not in body and TRUST_TITLE in body
