"""Benchmark of the lung net, the shortcut audit and the Shortcut audit page; prints one JSON object.

    python tests/benchmarks/bench_audit.py [--data ../shared/cxr] [--run assets/model] [--no-audit]
                                           [--no-dice] [--no-page] [--copy]

Figures: held-out Dice of the shipped lung net (ieee8023 lungVAE masks, patients held out at
training), mask time per image (warm, single image at 224 px and batched); the wall time of the
whole audit of the run's test split (default methods, ROAD, probes, source probe, pointing game,
slices, findings; target <= 300 s on 2 cores) with the time of each step; and the time the
Shortcut audit page takes to open from the saved audit (Streamlit AppTest, the app's first page
already run in the process, as in a served session; target <= 3 s) in a fresh process (cold) and
on a second visit (warm). The audit writes its results into the run, as ``python -m core.audit``
does; ``--copy`` audits a temporary copy instead. The 1-minute load average is reported beside
each timing (other jobs on the machine slow it down).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from core import config, lungs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="data root (default: $CXR_DATA_DIR or data/)")
    ap.add_argument("--run", help="run to audit (default: assets/model)")
    ap.add_argument("--no-audit", action="store_true", help="skip the whole-audit timing")
    ap.add_argument("--methods", default=None, help="audit methods (default: core.audit.DEFAULT_METHODS)")
    ap.add_argument("--no-dice", action="store_true", help="skip the lung-net Dice and mask timings")
    ap.add_argument("--no-page", action="store_true", help="skip the page-open timing")
    ap.add_argument("--copy", action="store_true", help="audit a temporary copy of the run (leave it untouched)")
    args = ap.parse_args()
    root = config.data_dir(args.data)
    out = {"cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()[0]}
    if not args.no_dice:
        out.update(_lungs(root))
    run = Path(args.run) if args.run else config.DEFAULT_RUN
    if args.copy:
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp()) / run.name
        shutil.copytree(run, tmp, ignore=shutil.ignore_patterns("audit*"))
        run = tmp
    if not args.no_audit:
        from core import audit

        methods = args.methods.split(",") if args.methods else audit.DEFAULT_METHODS
        t0, c0 = time.perf_counter(), time.process_time()
        s = audit.run_audit(run, args.data, methods=methods, progress=False)
        out["audit"] = {"run": s["run"], "n_images": s["n_images"], "methods": list(methods),
                        "wall_s": round(time.perf_counter() - t0, 1),
                        # CPU seconds of all threads: what the audit costs, whatever else runs on the machine
                        "cpu_s": round(time.process_time() - c0, 1), "timing": s["timing"],
                        "load_avg_end": os.getloadavg()[0], "findings": len(s["findings"])}
    if not args.no_page:
        out["page"] = _page(run, root)
    print(json.dumps(out))
    return 0


def _page(run: Path, root: Path) -> dict:
    """Seconds for the Shortcut audit page to run from the saved audit, in a fresh process."""
    import subprocess

    code = f"""
import json, os, time
os.environ["CXR_DATA_DIR"] = {str(root)!r}
os.environ["CXR_RUNS_DIR"] = {str(run.parent)!r}
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({str(config.REPO_ROOT / "dashboard" / "app.py")!r}, default_timeout=300)
at.session_state["run"] = {str(run)!r}
at.run()
t0 = time.perf_counter(); at.switch_page("views/shortcuts.py").run(); cold = time.perf_counter() - t0
t0 = time.perf_counter(); at.run(); warm = time.perf_counter() - t0
print(json.dumps({{"cold_s": round(cold, 2), "warm_s": round(warm, 2), "exceptions": len(at.exception),
                  "cards": sum("severity" in (getattr(m, "value", "") or "") for m in at.markdown)}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=config.REPO_ROOT)
    try:
        return {**json.loads(res.stdout.strip().splitlines()[-1]), "load_avg": os.getloadavg()[0]}
    except (ValueError, IndexError):
        return {"error": (res.stderr or res.stdout)[-500:]}


def _lungs(root: Path) -> dict:
    out = {}
    rec = lungs._record()
    _, held = lungs.split_pairs(lungs.mask_pairs(root), seed=int(rec.get("seed", config.SEED)))
    net = lungs.lung_model()
    t0 = time.perf_counter()
    scores = lungs.held_out_dice(held, model=net)
    out["lung_dice"] = {"n": len(scores), "mean": float(np.mean(scores)), "median": float(np.median(scores)),
                        "min": float(np.min(scores)), "p10": float(np.percentile(scores, 10)),
                        "seconds": round(time.perf_counter() - t0, 2)}

    from core import images

    imgs = np.stack([images.load(p["image"], 224) for p in held[:32]])
    lungs.mask(imgs[0])  # warm up
    t0 = time.perf_counter()
    for im in imgs:
        lungs.mask(im)
    out["mask_ms_per_image_single"] = round(1000 * (time.perf_counter() - t0) / len(imgs), 2)
    lungs.masks(imgs)
    t0 = time.perf_counter()
    lungs.masks(imgs)
    out["mask_ms_per_image_batched"] = round(1000 * (time.perf_counter() - t0) / len(imgs), 2)
    return out


if __name__ == "__main__":
    sys.exit(main())
