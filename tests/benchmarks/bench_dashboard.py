"""Benchmark the dashboard in a real browser (Debian chromium via Playwright).

    python tests/benchmarks/bench_dashboard.py [--data DIR] [--runs DIR] [--n 10] [--screenshot PATH]

Prints one JSON object:
- ``start_to_first_page_s``: from launching ``streamlit run`` to the Explain page with its
  uploader shown in the browser (server start, first script run; target <= 15 s);
- ``start_to_model_loaded_s``: until that first run is over (TensorFlow imported, model loaded);
- ``upload_to_overlay_s``: from handing a file to the uploader to the Grad-CAM overlay on the
  original film shown together with its (fresh) trust panel; ``cold`` is the first upload,
  ``warm`` the next ``--n`` distinct images (p50/p95/max; targets p50 <= 1.0 s, p95 <= 1.5 s warm);
- ``upload_to_page_done_s``: until the script run is over (probabilities, decision, severity,
  downloads), each upload waiting for the previous run to finish;
- ``opacity_change_s``: from one step of the opacity slider to the redrawn overlay (a fragment
  rerun: no decode, no model);
- ``loadavg``: the 1-minute load average before and after (the figures are noisy on a busy machine).
The run is the app's default (the shipped model, else the newest run under --runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
from test_browser import (  # noqa: E402
    browser_missing,
    browser_page,
    open_app,
    overlay_src,
    streamlit_server,
    upload_and_wait,
    wait_idle,
    wait_new_overlay,
)
from test_dashboard import chest_like_png  # noqa: E402

from core import config, runs  # noqa: E402


def uploads(data: Path, n: int) -> list[tuple[str, bytes]]:
    """n + 1 distinct images: real X-rays from several sources when present, else synthetic."""
    files = []
    for sub in ("nih/Pneumonia", "nih/No_findings", "kermany/NORMAL", "kermany/PNEUMONIA", "ieee8023/images"):
        files += sorted((data / sub).glob("*.*"))[:4]
    files = [f for f in files if f.suffix.lower() in {".png", ".jpg", ".jpeg"}]
    out = [(f.name, f.read_bytes()) for f in files[: n + 1]]
    seed = 0
    while len(out) < n + 1:
        out.append((f"synthetic-{seed}.png", chest_like_png(seed=seed)))
        seed += 1
    return out


def mime(name: str) -> str:
    return "image/png" if name.lower().endswith(".png") else "image/jpeg"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="data root (default: $CXR_DATA_DIR or ../shared/cxr)")
    ap.add_argument("--runs", help="runs root (default: $CXR_RUNS_DIR or runs/)")
    ap.add_argument("--n", type=int, default=10, help="warm uploads (default %(default)s)")
    ap.add_argument("--screenshot", help="save a screenshot of the Explain page here")
    args = ap.parse_args(argv)
    why = browser_missing()
    if why:
        print(json.dumps({"skipped": why}))
        return 0
    data = Path(args.data) if args.data else config.data_dir()
    if not data.is_dir() and (config.REPO_ROOT.parent / "shared" / "cxr").is_dir():
        data = config.REPO_ROOT.parent / "shared" / "cxr"
    runs_root = Path(args.runs) if args.runs else config.runs_dir()
    files = uploads(data, args.n)
    load_before = os.getloadavg()[0]
    with browser_page() as page:
        with streamlit_server(data, runs_root) as (url, t0):
            open_app(page, url)
            start_s = time.perf_counter() - t0
            wait_idle(page)
            ready_s = time.perf_counter() - t0 - 0.4
            cold, cold_done = upload_and_wait(page, files[0][0], files[0][1], mime(files[0][0]), until_idle=True)
            warm, done = [], []
            for name, data_bytes in files[1:]:
                prev = overlay_src(page)
                a, b = upload_and_wait(page, name, data_bytes, mime(name), previous=prev, until_idle=True)
                warm.append(a)
                done.append(b)
            slider = page.get_by_role("slider", name="Opacity").first
            slider.focus()
            steps = []
            for _ in range(6):
                prev = overlay_src(page)
                t = time.perf_counter()
                page.keyboard.press("ArrowRight")
                wait_new_overlay(page, prev)
                steps.append(time.perf_counter() - t)
                wait_idle(page)
            if args.screenshot:
                page.get_by_text("Download case report (HTML)").first.wait_for()
                page.wait_for_timeout(500)
                page.screenshot(path=args.screenshot)
    w, d = np.asarray(warm), np.asarray(done)
    print(json.dumps({
        "run": str(runs.list_runs(runs_root)[0]) if runs.list_runs(runs_root) else None,
        "data": str(data),
        "start_to_first_page_s": round(start_s, 2),
        "start_to_model_loaded_s": round(ready_s, 2),
        "upload_to_overlay_s": {
            "cold": round(cold, 3),
            "warm_n": len(w),
            "warm_p50": round(float(np.percentile(w, 50)), 3),
            "warm_p95": round(float(np.percentile(w, 95)), 3),
            "warm_max": round(float(w.max()), 3),
        },
        "upload_to_page_done_s": {
            "cold": round(cold_done, 3),
            "warm_p50": round(float(np.percentile(d, 50)), 3),
            "warm_p95": round(float(np.percentile(d, 95)), 3),
        },
        "opacity_change_s": {"n": len(steps), "p50": round(float(np.percentile(steps, 50)), 3),
                             "max": round(float(max(steps)), 3)},
        "loadavg": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "targets": {"start_to_first_page_s": 15, "warm_upload_to_overlay_p50_s": 1.0,
                    "warm_upload_to_overlay_p95_s": 1.5},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
