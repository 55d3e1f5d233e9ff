"""Benchmark: dataset audit wall time and decode throughput over the whole pool (prints one JSON object).

    .venv/bin/python tests/benchmarks/bench_data.py [--data DIR] [--size 224] [--repeats 1]

* ``load_table_s``: finding and reading every source layout.
* ``audit_cold_s``: ``core.data.audit`` with an empty fingerprint cache (hashes and decodes every
  image for the near-duplicate check); ``audit_warm_s``: the same with the cache filled;
  ``audit_cli_warm_s``: ``python -m core.data audit --json`` as a user runs it (includes imports).
* ``decode``: ``core.images.load(path, size)`` over every image of the pool, as training does;
  images/s by wall clock and by process CPU time (the machine may be shared), overall and per source.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from core import config, data, datasets, images  # noqa: E402


def _clock(fn, *a, **k):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*a, **k)
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="data root (default: $CXR_DATA_DIR, ../shared/cxr or data/)")
    ap.add_argument("--size", type=int, default=config.BUILD_SIZE)
    ap.add_argument("--repeats", type=int, default=1, help="decode passes (the best is reported)")
    args = ap.parse_args()
    root = Path(args.data) if args.data else None
    if root is None:
        shared = REPO.parent / "shared" / "cxr"
        root = config.data_dir() if os.environ.get("CXR_DATA_DIR") or not shared.exists() else shared
    out = {"data": str(root), "size": args.size, "cpu_count": os.cpu_count(),
           "loadavg_start": [round(x, 2) for x in os.getloadavg()]}

    table, wall, _ = _clock(datasets.load_table, root)
    out["n_images"] = len(table)
    out["load_table_s"] = round(wall, 3)

    with tempfile.TemporaryDirectory() as cache:
        os.environ["CXR_CACHE_DIR"] = cache
        rep, wall, cpu = _clock(data.audit, root)
        out["audit_cold_s"], out["audit_cold_cpu_s"] = round(wall, 2), round(cpu, 2)
        _, wall, cpu = _clock(data.audit, root)
        out["audit_warm_s"], out["audit_warm_cpu_s"] = round(wall, 2), round(cpu, 2)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "core.data", "audit", "--data", str(root), "--json"],
                           cwd=REPO, capture_output=True, text=True, env={**os.environ})
        out["audit_cli_warm_s"] = round(time.perf_counter() - t0, 2)
        out["audit_cli_ok"] = r.returncode == 0 and json.loads(r.stdout)["counts"] == rep["counts"]
    out["counts"] = rep["counts"]

    paths = [datasets.abspath(root, p) for p in table["path"]]
    best = None
    for _ in range(args.repeats):
        per: dict[str, list[float]] = {}
        w0, c0 = time.perf_counter(), time.process_time()
        errors = 0
        for p, src in zip(paths, table["source"], strict=True):
            t = time.perf_counter()
            try:
                images.load(p, args.size)
            except images.ImageError:
                errors += 1
            per.setdefault(src, []).append(time.perf_counter() - t)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if best is None or wall < best[0]:
            best = (wall, cpu, per, errors)
    wall, cpu, per, errors = best
    out["decode"] = {
        "images": len(paths),
        "errors": errors,
        "wall_s": round(wall, 2),
        "images_per_s": round(len(paths) / wall, 1),
        "images_per_cpu_s": round(len(paths) / cpu, 1),
        "ms_per_image_by_source": {s: round(1000 * sum(v) / len(v), 2) for s, v in per.items()},
    }
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
