"""Where the server's time goes under load: py-spy samples of one real server, 8 browser sessions.

    python tests/benchmarks/profile_load.py [--data DIR] [--sessions 8] [--widget-changes 3]
                                            [--py-spy PATH] [--rate 200]

Starts the server and ``--sessions`` browser sessions as ``bench_load.py`` does, then records
the server with py-spy (``pip install py-spy``; not a project dependency) twice: while every
session uploads one different film at the same moment, and while every session moves its
Opacity slider ``--widget-changes`` times at the same moment. py-spy samples every Python thread
(``--idle``: waiting counts too, so a thread blocked in a TensorFlow call or on the GIL is
charged to the step it waits in). Each sample of a script thread is charged to one step: the
outermost ``core`` function on its stack (decode, checks, Grad-CAM, ...), else the innermost
Streamlit step (cache-key hashing, image encoding, ...), else "other script". Prints one JSON
object: per phase, milliseconds per upload (or per widget change) of script-thread time per
step, the busy time of the server's I/O threads (websocket, uploads, media files), and the CPU
seconds per event of the server, of the browser (chromium: it renders every session) and of the
other processes on the machine (other people's jobs).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

import bench_load as bl  # noqa: E402

# (step, needle in a frame "function (file:line)"), outermost match wins among these.
CORE_STEPS = [
    ("decode upload (core.images.decode)", "decode (core/images.py"),
    ("resize to model size (core.images.resize)", "resize (core/images.py"),
    ("prepare (core.inputs)", "core/inputs.py"),
    ("plausibility checks (core.checks)", "core/checks.py"),
    ("Grad-CAM heatmap (core.explain.explain)", "explain (core/explain/methods.py"),
    ("overlay (core.explain.overlay)", "overlay (core/explain/draw.py"),
    ("probabilities (core.model)", "probabilities (core/model.py"),
    ("lung mask (core.lungs.mask)", "mask (core/lungs.py"),
    ("in-lung share (core.heat.heat_share)", "heat_share (core/heat.py"),
    ("trust panel: faithfulness, OOD (core.trust)", "core/trust.py"),
    ("penultimate features (core.model.features)", "features (core/model.py"),
    ("severity (core.severity)", "core/severity.py"),
    ("display-size film (core.explain.display_film)", "display_film (core/explain/draw.py"),
    ("case report HTML (core.report)", "case_report_html (core/report.py"),
    ("overlay PNG for download (core.report.png_bytes)", "png_bytes (core/report.py"),
    ("waiting for a model slot (core.work)", "slot (core/work.py"),
    ("model load / lookup (core.runs)", "core/runs.py"),
]
# Streamlit internals, innermost match wins.
ST_STEPS = [
    ("cache keys: hashing arrays (streamlit caching)", "streamlit/runtime/caching/hashing.py"),
    ("cache lookup / replay (streamlit caching)", "streamlit/runtime/caching/"),
    ("st.image: encode image (streamlit)", "streamlit/elements/lib/image_utils.py"),
    ("media file store (streamlit)", "streamlit/runtime/media_file"),
    ("download button data (streamlit)", "streamlit/elements/widgets/button.py"),
    ("protobuf / forward messages (streamlit)", "forward_msg"),
]


IDLE_LEAVES = ("Condition.wait", "select (selectors", "EpollSelector.select", "Event.wait", "_worker (concurrent")


def classify(frames: list[str]) -> str:
    """The step one stack (root first) is charged to."""
    for f in frames:
        for step, needle in CORE_STEPS:
            if needle in f:
                return step
    for f in reversed(frames):
        for step, needle in ST_STEPS:
            if needle in f:
                return step
    return "other script (page code, widgets, Streamlit)"


def _where(frames: list[str]) -> str:
    """The innermost frame of Streamlit, Keras, gc or the project's code on a stack (short form)."""
    for f in reversed(frames):
        if any(k in f for k in ("streamlit/", "keras/", "dashboard/", "core/", "gc")):
            name, _, loc = f.partition(" (")
            return f"{name} ({loc.split('site-packages/')[-1].split(':')[0]})"
    return frames[-1].partition(" (")[0]


def summarise(raw: Path, rate: int, n_events: int) -> dict:
    """Per-step milliseconds per event from py-spy's raw (collapsed) output."""
    script, main, other, rest = collections.Counter(), 0, 0, collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        n = int(count)
        if any("_run_script" in f for f in frames):
            step = classify(frames)
            script[step] += n
            if step.startswith("other"):
                rest[_where(frames)] += n
        elif any("asyncio" in f or "starlette" in f or "uvicorn" in f for f in frames):
            main += n * (not any(w in frames[-1] for w in IDLE_LEAVES))
        else:
            other += n
    ms = 1000.0 / rate / max(1, n_events)
    steps = {k: round(v * ms, 1) for k, v in script.most_common()}
    return {"events": n_events, "script_thread_ms_per_event": steps,
            "script_thread_ms_total": round(sum(script.values()) * ms, 1),
            "other_script_top_ms_per_event": {k: round(v * ms, 1) for k, v in rest.most_common(8)},
            "server_io_threads_busy_ms_per_event": round(main * ms, 1), "other_threads_ms_per_event": round(other * ms, 1)}


def _ppids() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return out


def cpu_snapshot(server: int) -> dict:
    """CPU seconds so far: the server, the browser (chromium under this process), this process,
    and the whole machine (busy time of all cores)."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(pid):
        try:
            f = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / tick
        except (OSError, ValueError, IndexError):
            return 0.0

    ppids, me = _ppids(), os.getpid()
    mine = {me}
    for _ in range(6):  # descendants, a few levels deep
        mine |= {p for p, pp in ppids.items() if pp in mine}
    browser = [p for p in mine if p not in (me, server) and b"chrom" in _cmdline(p)]
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(fields) - fields[3] - fields[4]) / tick
    return {"server": cpu(server), "browser": sum(cpu(p) for p in browser), "bench": cpu(me), "machine": busy,
            "t": time.perf_counter()}


def _cmdline(pid) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def cpu_split(before: dict, after: dict, n_events: int) -> dict:
    """Seconds of CPU per event: server, browser, everything else on the machine, and wall."""
    d = {k: after[k] - before[k] for k in before}
    others = d["machine"] - d["server"] - d["browser"] - d["bench"]
    return {"wall_s": round(d["t"], 2), "server_cpu_s_per_event": round(d["server"] / n_events, 3),
            "browser_cpu_s_per_event": round(d["browser"] / n_events, 3),
            "other_processes_cpu_s": round(others, 1), "machine_cores_busy": round(d["machine"] / d["t"], 2)}


def spy(py_spy: str, pid: int, rate: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--idle", "--format", "raw",
                             "--output", str(out), "--nonblocking"], stdout=subprocess.DEVNULL,
                            stderr=open(out.with_suffix(".log"), "wb"))  # noqa: SIM115


def stop(proc: subprocess.Popen) -> None:
    import signal

    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)


def server_pid() -> int:
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == me and b"streamlit" in (d / "cmdline").read_bytes():
                    return int(d.name)
            except (OSError, ValueError, IndexError):
                continue
    raise RuntimeError("streamlit server process not found")


async def profile(url, files, expected, a, work: Path) -> dict:
    from playwright.async_api import async_playwright

    out = {}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=bl.CHROMIUM, args=bl.CHROMIUM_ARGS, headless=True)
        try:
            pages = [await bl.open_session(browser, url) for _ in range(a.sessions)]
            await bl.upload(pages[0], files[0], None)  # warm-up: model load, tracing
            for pg in pages[1:]:
                await bl.upload(pg, files[1], None)  # every session has drawn the page once
            pid = server_pid()
            chunks = [files[2 + i : 3 + i] for i in range(a.sessions)]
            rec = spy(a.py_spy, pid, a.rate, work / "upload.txt")
            await asyncio.sleep(1.0)
            t0, c0 = time.perf_counter(), cpu_snapshot(pid)
            res = await asyncio.gather(*(bl.session_run(pg, ch, expected) for pg, ch in zip(pages, chunks, strict=True)))
            wall, cpu = time.perf_counter() - t0, cpu_split(c0, cpu_snapshot(pid), a.sessions)
            stop(rec)
            out["upload"] = {**summarise(work / "upload.txt", a.rate, a.sessions), "burst_wall_s": round(wall, 2),
                             "cpu": cpu, "latency": bl.stats([x for lat, _ in res for x in lat]),
                             "wrong_p_covid": sum(w for _, w in res)}
            rec = spy(a.py_spy, pid, a.rate, work / "widget.txt")
            await asyncio.sleep(1.0)
            t0, c0 = time.perf_counter(), cpu_snapshot(pid)
            lats = await asyncio.gather(*(bl.widget_run(pg, a.widget_changes) for pg in pages))
            wall, cpu = time.perf_counter() - t0, cpu_split(c0, cpu_snapshot(pid), a.sessions * a.widget_changes)
            stop(rec)
            out["widget"] = {**summarise(work / "widget.txt", a.rate, a.sessions * a.widget_changes),
                             "burst_wall_s": round(wall, 2), "cpu": cpu, "latency": bl.stats([x for lat in lats for x in lat])}
        finally:
            await browser.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--widget-changes", type=int, default=3)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--py-spy", default="py-spy", help="the py-spy executable")
    a = ap.parse_args(argv)
    why = bl.browser_missing()
    if why:
        print(json.dumps({"skipped": why}))
        return 0
    data = Path(a.data or os.environ.get("CXR_DATA_DIR") or bl.config.REPO_ROOT.parent / "shared" / "cxr")
    run = bl.config.DEFAULT_RUN.resolve()
    from test_load import pool_files

    pool = pool_files(data, 200)
    expected = bl.expected_values(run, pool)
    files, _ = bl.order_files(pool, expected, gap=0.0025)
    work = Path(tempfile.mkdtemp(prefix="profile-load-"))
    out = {"model": str(run), "load_avg_before": os.getloadavg(), "samples_dir": str(work)}
    with bl.streamlit_server(data, None, log=work / "streamlit.log") as (url, _):
        out.update(asyncio.run(profile(url, files, expected, a, work)))
    out["load_avg_after"] = os.getloadavg()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
