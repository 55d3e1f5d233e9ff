"""Benchmark the dashboard under load, in real browsers against one real server.

    python tests/benchmarks/bench_load.py [--data DIR] [--run RUN] [--sessions 8] [--per-session 4]
                                          [--widget-changes 10] [--many 20] [--many-per-session 2]
                                          [--rss-uploads 500] [--phases single,concurrent,widget,many,rss]
                                          [--browser-nice 0]

Starts ``streamlit run dashboard/app.py`` on 127.0.0.1 and drives Debian's chromium through
Playwright (async API, one browser, one context per session = separate Streamlit sessions).
Every upload is a different real X-ray (no cache hits). Upload latency is from handing the file to
the page's uploader to the new Grad-CAM overlay shown with a fresh trust panel (``test_browser``'s
readiness check); a widget change is one step of the Opacity slider (keyboard) to the redrawn
overlay. Once a session's script run
is over, each shown P(covid) is checked against the value computed directly with the model (no
cross-session mix-up). The server's resident memory is sampled every 0.25 s during each phase.
Prints one JSON object:

- ``single``: p50/p95/max seconds for one session (after a warm-up upload), and ``widget_single``:
  the same for ``--widget-changes`` slider steps in that idle session;
- ``concurrent``: ``--sessions`` sessions uploading at the same time (pooled), with the wall time
  of the burst, the number of wrong P(covid) values shown and the server's peak memory; beside
  these end-to-end figures, ``server``: the server's own seconds per upload (``server_s`` = waiting
  for the model slot + the work in it: decode, lung crop, network, Grad-CAM; logged by
  ``dashboard.state`` under $CXR_SERVER_TIMES), and the CPU seconds the server and the browsers
  took during the burst (``*_cpu_s``; ``*_cores`` = per wall second), since the browsers share the
  machine's cores with the server;
- ``widget_concurrent``: right after, every one of those sessions moves its slider
  ``--widget-changes`` times at the same time (pooled latencies); an upload without an answer
  within ``--timeout`` seconds is counted (``timeouts``, with what its page showed) and skipped;
- ``many``: ``--many`` sessions uploading ``--many-per-session`` films each at the same time:
  errors shown on pages, sessions lost (no answer within 5 minutes or the page broke), wrong
  values, latencies, server peak memory;
- ``rss``: the server's memory after 20 and after ``--rss-uploads`` uploads from one session, its
  maximum, and the growth in between.

``--browser-nice 19`` runs the browsers at the lowest CPU priority: the server then gets the cores
first, about as when the users' browsers run on their own machines; the end-to-end figures then
include the browsers' slower rendering, and the server's own time is the figure to read.

The model is ``--run``, else the shipped model, else a tiny known-answer run written to a temp
folder (then the figures measure the app, not a realistic network). The browser shares the CPU
with the server: the figures are what a classroom on this one machine would see, and a quiet
machine matters (the load average before and after is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from test_browser import _READY_JS as NEW_OVERLAY  # noqa: E402
from test_browser import CHROMIUM, CHROMIUM_ARGS, OVERLAY, TRUST_TITLE, browser_missing, streamlit_server  # noqa: E402

from core import checks, config, images, runs  # noqa: E402

ERRORS = '[data-testid="stException"], [data-testid="stAlertContentError"]'
PHASES = ("single", "concurrent", "widget", "many", "rss")
LOST_AFTER_MS = 300_000  # a session without an answer for 5 minutes is lost
# The server appends its own seconds per analysis here (dashboard.state, $CXR_SERVER_TIMES).
TIMES_LOG = Path(tempfile.mkdtemp(prefix="bench-load-times-")) / "server_times.jsonl"


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


def children() -> dict[int, tuple[str, float]]:
    """This benchmark's descendant processes that are the streamlit server or a browser (chromium and
    its helpers): ``{pid: (kind, CPU seconds so far, user + system)}``, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu, kind = {}, {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        pid = int(d.name)
        parent[pid], cpu[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
        kind[pid] = "server" if b"streamlit" in cmd else "browsers" if b"chrom" in cmd else None
    out = {}
    for pid, k in kind.items():
        up = pid
        while up in parent and up != os.getpid():
            up = parent[up]
        if k and up == os.getpid():
            out[pid] = (k, cpu[pid])
    return out


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) so far of the streamlit server and of the browsers; exited
    processes are not counted."""
    out = {"server": 0.0, "browsers": 0.0}
    for k, c in children().values():
        out[k] += c
    return out


def nice_browsers(n: int) -> None:
    """Run the browsers at nice level ``n`` (``--browser-nice``; never raised back): a deployed server does not
    share its cores with its users' browsers; a niced browser yields them to the server here.
    Processes the browser starts later (a new session's renderer) inherit it from their parent."""
    for pid, (k, _) in children().items():
        if k == "browsers":
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, pid, max(n, os.getpriority(os.PRIO_PROCESS, pid)))


def server_times(path: Path, since: float) -> dict:
    """The server's own seconds per analysed upload after ``since`` (dashboard.state logs them under
    $CXR_SERVER_TIMES): the wait for the model slot, the work in it, and their sum."""
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    rows = [r for r in rows if r["t"] >= since and r.get("analysed")]
    return {"uploads": len(rows), "server_s": stats([r["wait_s"] + r["work_s"] for r in rows]),
            "slot_wait_s": stats([r["wait_s"] for r in rows]), "slot_work_s": stats([r["work_s"] for r in rows])}


def cpu_share(before: dict, after: dict, wall: float) -> dict:
    """CPU seconds the server and the browsers took during a phase, and in cores (seconds per wall second)."""
    used = {k: round(after[k] - before[k], 1) for k in before}
    return {**{f"{k}_cpu_s": v for k, v in used.items()}, **{f"{k}_cores": round(v / wall, 2) for k, v in used.items()}}


@contextlib.asynccontextmanager
async def peak_rss():
    """Sample the server's memory every 0.25 s while the block runs; yields a dict with ``peak_mib``."""
    out = {"peak_mib": server_rss_mib()}

    async def sample():
        while True:
            out["peak_mib"] = max(out["peak_mib"], server_rss_mib())
            await asyncio.sleep(0.25)

    task = asyncio.create_task(sample())
    try:
        yield out
    finally:
        task.cancel()
        out["peak_mib"] = round(max(out["peak_mib"], server_rss_mib()), 1)


def mime(p: Path) -> str:
    return "image/png" if p.suffix.lower() == ".png" else "image/jpeg"


def stats(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs, dtype=float)
    return {"n": len(xs), "p50_s": round(float(np.percentile(a, 50)), 3),
            "p95_s": round(float(np.percentile(a, 95)), 3), "max_s": round(float(a.max()), 3)}


async def open_session(browser, url: str, timeout_ms: int = 300_000):
    ctx = await browser.new_context(viewport={"width": 1400, "height": 1000})
    page = await ctx.new_page()
    page.set_default_timeout(timeout_ms)
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


async def overlay_src(page) -> str | None:
    """The data URI of the first overlay picture (a plotly image trace), None before the first."""
    el = await page.query_selector(OVERLAY)
    return (await el.get_attribute("href") or await el.get_attribute("xlink:href")) if el else None


async def upload(page, f: Path, prev: str | None) -> tuple[float, str, float | None]:
    """Upload ``f``; return (seconds to the new overlay, its src, the P(covid) shown)."""
    t = time.perf_counter()
    await page.locator('input[type="file"]').first.set_input_files(
        {"name": f.name, "mimeType": mime(f), "buffer": f.read_bytes()})
    await page.wait_for_function(NEW_OVERLAY, arg=[OVERLAY, prev, TRUST_TITLE], polling=25)
    dt = time.perf_counter() - t
    src = await overlay_src(page)
    await wait_idle(page)  # the answer is filled in after the maps: read it once the run is over
    return dt, src, await shown_p_covid(page)


async def widget_change(page, prev: str | None, step: int) -> tuple[float, str]:
    """Move the Opacity slider one step (right on even ``step``, back on odd); seconds to the redrawn overlay."""
    await page.get_by_role("slider", name="Opacity").first.focus()
    t = time.perf_counter()
    await page.keyboard.press("ArrowRight" if step % 2 == 0 else "ArrowLeft")
    await page.wait_for_function(NEW_OVERLAY, arg=[OVERLAY, prev, TRUST_TITLE], polling=10)
    dt = time.perf_counter() - t
    src = await overlay_src(page)
    await wait_idle(page, 0.2)
    return dt, src


async def shown_p_covid(page) -> float | None:
    """The P(covid) the page shows now (None while it is not drawn)."""
    metrics = page.locator('[data-testid="stMetric"]')
    for i in range(await metrics.count()):
        text = await metrics.nth(i).inner_text()
        if text.startswith("P(covid)"):
            return float(text.split()[-1])
    return None


WRONG: list[dict] = []  # every upload whose answer stayed wrong: what was expected, what was shown


async def settled_p_covid(page, shown: float | None, expected: float) -> bool:
    """True when the page shows ``expected`` (Under load the 'running' indicator can pause before
    the answer is drawn, so a first read may still show the previous value: a mix-up is a value
    that stays wrong)."""
    for _ in range(20):
        if shown is not None and abs(shown - expected) <= 0.0011:
            return True
        await page.wait_for_timeout(500)
        await wait_idle(page, 1.0)
        shown = await shown_p_covid(page)
    WRONG.append({"expected": round(expected, 4), "shown": shown})
    return False


async def page_state(page) -> str:
    """What the page shows when an upload got no answer (for the report of a timed-out upload)."""
    parts = []
    for sel in ('[data-testid="stFileUploader"]', '[data-testid="stStatusWidget"]', ERRORS,
                '[data-testid="stConnectionStatus"]'):
        for el in await page.query_selector_all(sel):
            parts.append((await el.inner_text()).strip().replace("\n", " ")[:160])
    return " | ".join(p for p in parts if p) or "(nothing shown)"


async def session_run(page, files: list[Path], expected: dict[str, float], timeouts: list | None = None):
    """Upload ``files`` one after the other; returns (latencies, wrong answers). An upload without
    an answer within the page's timeout is recorded in ``timeouts`` (with what the page shows) and
    counted as wrong; the session goes on with the next file."""
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    lat, wrong, prev = [], 0, await overlay_src(page)
    for f in files:
        try:
            dt, prev, shown = await upload(page, f, prev)
        except PlaywrightTimeout:
            if timeouts is None:
                raise
            timeouts.append(f"{f.name}: {await page_state(page)}")
            wrong += 1
            prev = await overlay_src(page)
            continue
        lat.append(dt)
        wrong += not await settled_p_covid(page, shown, expected[f.name])
    return lat, wrong


async def widget_run(page, n: int) -> list[float]:
    lat, prev = [], await overlay_src(page)
    for i in range(n):
        dt, prev = await widget_change(page, prev, i)
        lat.append(dt)
    return lat


async def many_session(browser, url: str, files: list[Path], expected: dict[str, float]) -> dict:
    """One of the ``--many`` sessions: open, upload each file; never raises (a failure is reported)."""
    out = {"lat": [], "wrong": 0, "errors": [], "lost": None}
    try:
        page = await open_session(browser, url, LOST_AFTER_MS)
        out["page"] = page
        prev = await overlay_src(page)
        for f in files:
            dt, prev, shown = await upload(page, f, prev)
            out["lat"].append(dt)
            out["wrong"] += not await settled_p_covid(page, shown, expected[f.name])
            out["errors"] += [await e.inner_text() for e in await page.query_selector_all(ERRORS)]
    except Exception as exc:  # timeout, closed page, ...: the session is lost
        out["lost"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return out


async def phase_concurrent(browser, url, files, k, expected, a) -> tuple[dict, dict, int]:
    pages = [await open_session(browser, url, a.timeout * 1000) for _ in range(a.sessions)]
    nice_browsers(a.browser_nice)  # the new sessions' renderers too
    chunks = [files[k + i * a.per_session : k + (i + 1) * a.per_session] for i in range(a.sessions)]
    k += a.sessions * a.per_session
    timeouts: list[str] = []
    async with peak_rss() as mem:
        t0, since, cpu0 = time.perf_counter(), time.time(), cpu_seconds()
        res = await asyncio.gather(*(session_run(pg, ch, expected, timeouts) for pg, ch in zip(pages, chunks, strict=True)))
        wall = time.perf_counter() - t0
    conc = {"sessions": a.sessions, **stats([x for lat, _ in res for x in lat]), "wall_s": round(wall, 2),
            "server": server_times(TIMES_LOG, since), **cpu_share(cpu0, cpu_seconds(), wall),
            "wrong_p_covid": sum(w for _, w in res), "wrong_shown": WRONG[:5], "timeouts": len(timeouts),
            "timeout_pages": timeouts[:5],
            "server_peak_mib": mem["peak_mib"]}
    widget = {}
    if "widget" in a.phases:
        async with peak_rss() as mem:
            lats = await asyncio.gather(*(widget_run(pg, a.widget_changes) for pg in pages))
        widget = {"sessions": a.sessions, **stats([x for lat in lats for x in lat]), "server_peak_mib": mem["peak_mib"]}
    for pg in pages:
        await pg.context.close()
    return conc, widget, k


async def phase_many(browser, url, files, k, expected, a) -> tuple[dict, int]:
    chunks = [files[k + i * a.many_per_session : k + (i + 1) * a.many_per_session] for i in range(a.many)]
    k += a.many * a.many_per_session
    async with peak_rss() as mem:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(many_session(browser, url, ch, expected) for ch in chunks))
        wall = time.perf_counter() - t0
    for r in res:
        if r.get("page"):
            await r["page"].context.close()
    out = {"sessions": a.many, "uploads_per_session": a.many_per_session,
           **stats([x for r in res for x in r["lat"]]), "wall_s": round(wall, 2),
           "uploads_done": sum(len(r["lat"]) for r in res),
           "errors_shown": sum(len(r["errors"]) for r in res),
           "error_texts": sorted({e[:200] for r in res for e in r["errors"]})[:5],
           "sessions_lost": sum(r["lost"] is not None for r in res),
           "lost_reasons": sorted({r["lost"] for r in res if r["lost"]})[:5],
           "wrong_p_covid": sum(r["wrong"] for r in res), "server_peak_mib": mem["peak_mib"]}
    return out, k


async def phase_rss(page, files, a) -> dict:
    rss, peak, prev = {}, 0.0, await overlay_src(page)
    t0 = time.perf_counter()
    for i in range(a.rss_uploads):
        f = files[i % len(files)]
        _, prev, _ = await upload(page, f, prev)
        cur = server_rss_mib()
        peak = max(peak, cur)
        if i + 1 in (20, a.rss_uploads) or (i + 1) % 100 == 0:
            rss[i + 1] = round(cur, 1)
    return {"uploads": a.rss_uploads, "distinct_images": min(a.rss_uploads, len(files)),
            "after_20_mib": rss.get(20, float("nan")), "after_all_mib": rss.get(a.rss_uploads, float("nan")),
            "growth_mib": round(rss.get(a.rss_uploads, 0) - rss.get(20, 0), 1), "max_mib": round(peak, 1),
            "samples_mib": rss, "s_per_upload": round((time.perf_counter() - t0) / max(1, a.rss_uploads), 3)}


async def bench(url: str, files: list[Path], expected: dict[str, float], a) -> dict:
    from playwright.async_api import async_playwright

    out: dict = {}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        nice_browsers(a.browser_nice)
        try:
            page = await open_session(browser, url)
            await upload(page, files[0], None)  # warm-up: model load, tracing
            k = 1
            if "single" in a.phases:
                since = time.time()
                lat, wrong = await session_run(page, files[k : k + a.per_session], expected)
                k += a.per_session
                out["single"] = {**stats(lat), "wrong_p_covid": wrong, "server": server_times(TIMES_LOG, since)}
            if "widget" in a.phases:
                out["widget_single"] = stats(await widget_run(page, a.widget_changes))
            if "concurrent" in a.phases:
                out["concurrent"], out["widget_concurrent"], k = await phase_concurrent(
                    browser, url, files, k, expected, a)
            if "many" in a.phases:
                out["many"], k = await phase_many(browser, url, files, k, expected, a)
            if "rss" in a.phases:
                # not from files[0]: the warm-up film is shown already, and the same film again draws no new overlay
                out["rss"] = await phase_rss(page, files[1:], a)
        finally:
            await browser.close()
    return out


def expected_values(run: Path, files: list[Path]) -> dict[str, float]:
    """P(covid) computed directly with the model, for the files the page gives an answer for."""
    from core import explain, inputs, lungs
    from core import model as cmodel
    from core.severity import LUNG_SIDE

    model = runs.load_model(run)
    size = cmodel.input_size(model)
    crop = inputs.settings(runs.read_config(run))
    out = {}
    for f in files:
        native = images.load(f)
        mask = lungs.mask(explain.display_film(native, LUNG_SIDE))  # the page's checks read the lung mask
        if checks.image_warnings(native, f.read_bytes(), lungs=mask):
            continue  # the page withholds the answer for such images
        x = inputs.load(f, size, crop)[0][None]  # the network's copy as every path reads it (needed size)
        out[f.name] = float(cmodel.probabilities(model, x)[0, config.COVID_INDEX])
    return out


def order_files(files: list[Path], expected: dict[str, float], gap: float) -> tuple[list[Path], int]:
    """Files with an answer, those whose P(covid) differ pairwise by >= ``gap`` first (a mix-up
    between them would show); returns (files, how many are pairwise distinct)."""
    distinct: list[Path] = []
    rest: list[Path] = []
    for f in files:
        if f.name not in expected:
            continue
        if all(abs(expected[f.name] - expected[g.name]) >= gap for g in distinct):
            distinct.append(f)
        else:
            rest.append(f)
    return distinct + rest, len(distinct)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="data root (default: $CXR_DATA_DIR or ../shared/cxr)")
    ap.add_argument("--run", default=None, help="run folder (default: the shipped model; else a tiny test run)")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--per-session", type=int, default=4)
    ap.add_argument("--widget-changes", type=int, default=10)
    ap.add_argument("--many", type=int, default=20, help="sessions of the 'many' phase")
    ap.add_argument("--many-per-session", type=int, default=2)
    ap.add_argument("--rss-uploads", type=int, default=500)
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--pool", type=int, default=600, help="real X-rays to draw uploads from")
    ap.add_argument("--timeout", type=int, default=180, help="seconds an upload of the 8-session phase may take")
    ap.add_argument("--browser-nice", type=int, default=0,
                    help="run the browsers at this nice level (0-19): 19 approximates a server whose cores are "
                    "its own, as when the users' browsers run on their own machines; 0 = equal shares")
    a = ap.parse_args(argv)
    a.phases = set(a.phases.split(","))
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

    from test_load import pool_files

    pool = pool_files(data, a.pool)
    expected = expected_values(run, pool)
    files, n_distinct = order_files(pool, expected, gap=0.0025)
    out = {"model": note, "cpu_count": os.cpu_count(), "browser_nice": a.browser_nice, "load_avg_before": os.getloadavg(),
           "films_with_answer": len(files), "films_pairwise_distinct": n_distinct}
    log = Path(tempfile.mkdtemp(prefix="bench-load-log-")) / "streamlit.log"
    os.environ["CXR_SERVER_TIMES"] = str(TIMES_LOG)  # the server inherits it (streamlit_server)
    with streamlit_server(data, runs_root, log=log) as (url, _):
        out.update(asyncio.run(bench(url, files, expected, a)))
    out["load_avg_after"] = os.getloadavg()
    out["server_log"] = str(log)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
