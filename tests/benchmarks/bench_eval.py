"""Benchmark: how long the patient bootstrap and a full run evaluation take (prints one JSON object).

    .venv/bin/python tests/benchmarks/bench_eval.py [--n 200 1000 5000] [--n-boot 1000] [--run R]

Synthetic predictions with ~2 images per patient; ``--run`` also times ``evaluate_run`` on a real
run folder (no writing). Figures are wall-clock seconds on this machine (median of 3 repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from core import evaluate, metrics  # noqa: E402


def _time(fn, *args, repeats=3, **kw) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args, **kw)
        out.append(time.perf_counter() - t0)
    return round(statistics.median(out), 6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[200, 1000, 5000])
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--run", help="also time evaluate_run on this run folder")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    result = {"n_boot": args.n_boot, "binary_metrics_s": {}, "bootstrap_all_metrics_s": {}, "at_threshold_s": {}}
    for n in args.n:
        y = rng.integers(0, 2, n)
        p = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(size=n))))
        g = np.arange(n) // 2
        result["binary_metrics_s"][n] = _time(metrics.binary_metrics, y, p, 0.5, g, args.n_boot)
        result["bootstrap_all_metrics_s"][n] = _time(metrics.bootstrap, y, p, g, 0.5, metrics.ALL_METRICS, args.n_boot)
        result["at_threshold_s"][n] = _time(metrics.at_threshold, y, p, 0.5, prevalence=0.05, repeats=20)
    if args.run:
        result["evaluate_run_s"] = _time(evaluate.evaluate_run, args.run, n_boot=args.n_boot, write=False,
                                         progress=False, repeats=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
