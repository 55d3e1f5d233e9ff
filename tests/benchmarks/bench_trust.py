"""Benchmark the trust panel's per-image work with the shipped model on real films.

    python tests/benchmarks/bench_trust.py [--data DIR] [--n 30]

Prints one JSON object: ``faithfulness_ms`` (core.trust.faithfulness: the hottest-20 % and 8
random regions removed, one batch; target <= 100 ms extra per image), and for comparison
``gradcam_ms``, ``features_ms`` (the OOD features), ``panel_ms`` (every row from computed
pieces), each p50/p95 over ``--n`` films, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]

import numpy as np  # noqa: E402

from core import checks, config, explain, inputs, lungs, runs, trust  # noqa: E402
from core import model as cmodel  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="data root (default: $CXR_DATA_DIR or ../shared/cxr)")
    ap.add_argument("--n", type=int, default=30)
    args = ap.parse_args(argv)
    data = Path(args.data) if args.data else config.data_dir()
    if not data.is_dir():
        data = ROOT.parent / "shared" / "cxr"
    files = []
    for sub in ("ieee8023/images", "nih/Pneumonia", "kermany/NORMAL"):
        files += sorted((data / sub).glob("*.*"))[: args.n // 3 + 1]
    model = runs.load_model(config.DEFAULT_RUN)
    cfg = runs.read_config(config.DEFAULT_RUN)
    size = cmodel.input_size(model)
    ref, sha = trust.load_reference(config.DEFAULT_RUN), cfg.get("model_sha256")
    t = {"gradcam_ms": [], "faithfulness_ms": [], "features_ms": [], "panel_ms": []}
    load_before = os.getloadavg()[0]
    for i, f in enumerate(files[: args.n + 2]):
        x, box, _, film = inputs.load(f, size, inputs.settings(cfg))
        mask = inputs.from_film(lungs.mask(film), box, size) >= 0.5
        t0 = time.perf_counter()
        heat = explain.explain(model, x, "gradcam")
        t1 = time.perf_counter()
        faith = trust.faithfulness(model, x, heat)
        t2 = time.perf_counter()
        feats = cmodel.features(model, x)
        t3 = time.perf_counter()
        trust.panel(heat, mask, faith, method="gradcam", audit_summary=None, model_sha256=sha,
                    warnings=checks.image_warnings(film), reference=ref, features=feats)
        t4 = time.perf_counter()
        if i >= 2:  # the first calls trace the compiled functions
            for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                t[k].append(1000 * v)
    out = {k: {"p50": round(float(np.percentile(v, 50)), 1), "p95": round(float(np.percentile(v, 95)), 1)}
           for k, v in t.items()}
    out.update(n=len(t["panel_ms"]), loadavg={"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
               targets={"faithfulness_ms": 100}, note="panel_ms includes the image checks on the full film")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
