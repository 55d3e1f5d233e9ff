"""Benchmark the dashboard under load, in real browsers against one real server.

    python tests/benchmarks/bench_load.py [--data DIR] [--run RUN] [--sessions 8] [--per-session 4]
                                          [--rss-uploads 200]

Starts ``streamlit run dashboard/app.py`` on 127.0.0.1 and drives Debian's chromium through
Playwright (async API, one browser, one context per session = separate Streamlit sessions).
Every upload is a different real X-ray (no cache hits). Latency is from handing the file to the
page's uploader to the new Grad-CAM overlay image loaded in the page. Once the script run is over,
each shown P(covid) is checked against the value computed directly with the model (no
cross-session mix-up).
Prints one JSON object:

- ``single``: p50/p95/max seconds for one session (after a warm-up upload);
- ``concurrent``: the same for ``--sessions`` sessions uploading at the same time (pooled), with
  the wall time of the burst and the number of wrong P(covid) values shown;
- ``rss``: the server process's resident memory (MiB) after 20 and after ``--rss-uploads``
  uploads from one session, its maximum, and the growth in between.

The model is ``--run``, else the shipped model, else a tiny known-answer run written to a temp
folder (then the figures measure the app, not a realistic network).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from test_browser import CHROMIUM, CHROMIUM_ARGS, OVERLAY, browser_missing, streamlit_server  # noqa: E402

from core import config, images, runs  # noqa: E402

NEW_OVERLAY = """([sel, prev]) => { const el = document.querySelector(sel);
    return el && el.complete && el.naturalWidth > 0 && el.getAttribute('src') !== prev; }"""


def server_rss_mib() -> float:
    """Resident memory of the streamlit child process (MiB)."""
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == me and b"streamlit" in (d / "cmdline").read_bytes():
                for line in (d / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            continue
    return float("nan")


def mime(p: Path) -> str:
    return "image/png" if p.suffix.lower() == ".png" else "image/jpeg"


def stats(xs: list[float]) -> dict:
    a = np.asarray(xs, dtype=float)
    return {"n": len(xs), "p50_s": round(float(np.percentile(a, 50)), 3),
            "p95_s": round(float(np.percentile(a, 95)), 3), "max_s": round(float(a.max()), 3)}


async def open_session(browser, url: str):
    ctx = await browser.new_context(viewport={"width": 1400, "height": 1000})
    page = await ctx.new_page()
    page.set_default_timeout(300_000)
    await page.goto(url, wait_until="domcontentloaded")
    await page.get_by_text("Explain a chest X-ray").first.wait_for()
    await page.locator('input[type="file"]').first.wait_for(state="attached")
    return page


async def wait_idle(page, quiet_s: float = 0.3) -> None:
    """Until the app's script run is over (no 'running' indicator for ``quiet_s``)."""
    quiet_since = None
    while True:
        running = await page.query_selector('[data-testid="stStatusWidgetRunningIcon"]') is not None
        now = time.perf_counter()
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= quiet_s:
            return
        await page.wait_for_timeout(25)


async def upload(page, f: Path, prev: str | None) -> tuple[float, str, float | None]:
    """Upload ``f``; return (seconds to the new overlay, its src, the P(covid) shown)."""
    t = time.perf_counter()
    await page.locator('input[type="file"]').first.set_input_files(
        {"name": f.name, "mimeType": mime(f), "buffer": f.read_bytes()})
    await page.wait_for_function(NEW_OVERLAY, arg=[OVERLAY, prev], polling=25)
    dt = time.perf_counter() - t
    src = await page.get_attribute(OVERLAY, "src")
    await wait_idle(page)  # the answer is filled in after the maps: read it once the run is over
    return dt, src, await shown_p_covid(page)


async def shown_p_covid(page) -> float | None:
    """The P(covid) the page shows now (None while it is not drawn)."""
    metrics = page.locator('[data-testid="stMetric"]')
    for i in range(await metrics.count()):
        text = await metrics.nth(i).inner_text()
        if text.startswith("P(covid)"):
            return float(text.split()[-1])
    return None


async def session_run(page, files: list[Path], expected: dict[str, float]) -> tuple[list[float], int]:
    lat, wrong, prev = [], 0, await page.get_attribute(OVERLAY, "src") if await page.query_selector(OVERLAY) else None
    for f in files:
        dt, prev, shown = await upload(page, f, prev)
        lat.append(dt)
        # Under load the 'running' indicator can pause before the answer is drawn, so a first
        # read may still show the previous image's value: a mix-up is a value that stays wrong.
        for _ in range(20):
            if shown is not None and abs(shown - expected[f.name]) <= 0.0011:
                break
            await page.wait_for_timeout(500)
            await wait_idle(page, 1.0)
            shown = await shown_p_covid(page)
        else:
            wrong += 1
    return lat, wrong


async def bench(url: str, files: list[Path], expected: dict[str, float], a) -> dict:
    from playwright.async_api import async_playwright

    out: dict = {}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = await open_session(browser, url)
            await upload(page, files[0], None)  # warm-up: model load, tracing
            k = 1
            lat, wrong = await session_run(page, files[k : k + a.per_session], expected)
            k += a.per_session
            out["single"] = {**stats(lat), "wrong_p_covid": wrong}

            pages = [await open_session(browser, url) for _ in range(a.sessions)]
            chunks = [files[k + i * a.per_session : k + (i + 1) * a.per_session] for i in range(a.sessions)]
            k += a.sessions * a.per_session
            t0 = time.perf_counter()
            res = await asyncio.gather(*(session_run(pg, ch, expected) for pg, ch in zip(pages, chunks, strict=True)))
            wall = time.perf_counter() - t0
            out["concurrent"] = {"sessions": a.sessions, **stats([x for lat, _ in res for x in lat]),
                                 "wall_s": round(wall, 2), "wrong_p_covid": sum(w for _, w in res)}
            for pg in pages:
                await pg.context.close()

            rss, peak, prev = {}, 0.0, None
            t0 = time.perf_counter()
            for i in range(a.rss_uploads):
                f = files[i % len(files)]
                _, prev, _ = await upload(page, f, prev)
                cur = server_rss_mib()
                peak = max(peak, cur)
                if i + 1 in (20, a.rss_uploads):
                    rss[i + 1] = cur
            out["rss"] = {"uploads": a.rss_uploads, "distinct_images": min(a.rss_uploads, len(files)),
                          "after_20_mib": round(rss.get(20, float("nan")), 1),
                          "after_all_mib": round(rss.get(a.rss_uploads, float("nan")), 1),
                          "growth_mib": round(rss.get(a.rss_uploads, 0) - rss.get(20, 0), 1),
                          "max_mib": round(peak, 1),
                          "s_per_upload": round((time.perf_counter() - t0) / max(1, a.rss_uploads), 3)}
        finally:
            await browser.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="data root (default: $CXR_DATA_DIR or ../shared/cxr)")
    ap.add_argument("--run", default=None, help="run folder (default: the shipped model; else a tiny test run)")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--per-session", type=int, default=4)
    ap.add_argument("--rss-uploads", type=int, default=200)
    a = ap.parse_args(argv)
    why = browser_missing()
    if why:
        print(json.dumps({"skipped": why}))
        return 0

    data = Path(a.data or os.environ.get("CXR_DATA_DIR") or config.REPO_ROOT.parent / "shared" / "cxr")
    runs_root = None
    if a.run:
        run = Path(a.run).resolve()
        runs_root = run.parent
        note = str(run)
    elif runs.is_run(config.DEFAULT_RUN):
        run, note = config.DEFAULT_RUN.resolve(), "shipped model (assets/model)"
    else:
        from robust_util import brightness_run

        runs_root = Path(tempfile.mkdtemp(prefix="bench-load-"))
        run = brightness_run(runs_root).resolve()
        note = "tiny known-answer run (no shipped model found)"

    from test_load import distinct_cases, pool_files

    # Distinct images whose P(covid) differ (so that a mix-up would show), computed directly.
    n_needed = 1 + a.per_session * (1 + a.sessions)
    cases = distinct_cases(run, pool_files(data, 400), n_needed, gap=0.0025)
    files = [f for f, _ in cases]
    expected = {f.name: p for f, p in cases}
    extra = [f for f in pool_files(data, 400) if f.name not in expected]
    files_all = files + extra  # the RSS loop cycles through many distinct images

    out = {"model": note, "cpu_count": os.cpu_count(), "load_avg_before": os.getloadavg()}
    log = Path(tempfile.mkdtemp(prefix="bench-load-log-")) / "streamlit.log"
    with streamlit_server(data, runs_root, log=log) as (url, _):
        res = asyncio.run(bench(url, files + [f for f in files_all if f not in files], expected, a))
    out.update(res)
    out["load_avg_after"] = os.getloadavg()
    _ = images
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
