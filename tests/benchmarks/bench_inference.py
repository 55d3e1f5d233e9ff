"""Single-film inference with explanation, warm, as the dashboard and CLIs do it.

    python tests/benchmarks/bench_inference.py --data ../shared/cxr [--run assets/model] [--n 30]

Per film: decode + the run's preparation (lung crop: lung U-Net, box, crop, resize) through
``core.inputs.load``, P(covid) through ``core.model.probabilities``, Grad-CAM through
``core.explain`` (for an ensemble: every member's map, averaged) and the map put back on the film
(``core.inputs.to_film``). Films are taken from every source. Prints JSON: median and p90 of each
step and of the total, in milliseconds, after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from core import datasets, explain, inputs, model, runs  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--run", default=None)
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--method", default="gradcam")
    a = p.parse_args(argv)
    run = runs.resolve_run(a.run)
    cfg = runs.read_config(run)
    net = runs.load_model(run)
    size, crop = int(cfg["size"]), inputs.settings(cfg)
    table = datasets.load_table(a.data)
    paths = table.groupby("source").head(max(1, a.n // table["source"].nunique()))["path"].tolist()
    films = [Path(a.data) / p_ for p_ in paths]
    steps: dict[str, list[float]] = {"prepare": [], "predict": [], "explain": [], "to_film": [], "total": []}
    for i, src in enumerate([films[0]] * 3 + films):  # three warm-up calls
        t0 = time.perf_counter()
        x, box, _, film = inputs.load(src, size, crop)
        t1 = time.perf_counter()
        model.probabilities(net, x)
        t2 = time.perf_counter()
        heat = explain.explain(net, x, a.method)
        t3 = time.perf_counter()
        inputs.to_film(heat, box, film.shape)
        t4 = time.perf_counter()
        if i >= 3:
            for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                steps[k].append(v * 1000)
    out = {k: {"median_ms": round(float(np.median(v)), 1), "p90_ms": round(float(np.percentile(v, 90)), 1)}
           for k, v in steps.items()}
    out.update(run=str(run), n=len(films), members=len(model.members(net)) or 1, lung_crop=crop is not None,
               method=a.method, load_average=round(os.getloadavg()[0], 2))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
