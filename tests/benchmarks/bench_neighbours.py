"""Benchmark the nearest films and the map of the model's features (issue 20, items 1 and 2).

    flock /work/quiet.lock .venv/bin/python tests/benchmarks/bench_neighbours.py [--run assets/model]
        [--data ../shared/cxr] [--out /tmp/bench-neighbours] [--umap]

Prints one JSON object:

- ``features_s``: the penultimate features of every scored film of the run (decode, lung crop,
  network; one pass, shared by the map and the neighbour index);
- ``maps``: per embedding (t-SNE at core.feature_map.TSNE_ITER iterations and at sklearn's default
  1000, PCA; UMAP with ``--umap`` when umap-learn is importable, its numba compile included) its time
  in seconds on those features and its trustworthiness at k = 10 (sklearn.manifold.trustworthiness:
  1 = every film's nearest neighbours in the map are its neighbours in feature space);
  target: the map computed in <= 60 s for 1,112 films;
- ``nearest_ms``: a warm lookup of the 5 nearest development films (p50 / p95 of 200); target <= 50 ms;
- ``page_open_s``: the Shortcut audit page with its map, opened a second time in one AppTest
  session (warm: caches filled); target <= 2 s.

The features are kept in ``--out`` (features.npz) so that reruns only time the maps.
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

from core import config, feature_map, neighbours, runs  # noqa: E402


def features(run: runs.Run, data, out: Path) -> tuple[np.ndarray, float]:
    """Features of every scored film of the run (from ``out/features.npz`` when there) and the seconds
    they took (NaN when read back)."""
    cache = out / "features.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return z["features"], float(z["seconds"])
    t0 = time.perf_counter()
    feats, _ = neighbours.film_features(run, run.predictions(), run.data_root(data), progress=True)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    np.savez(cache, features=feats, seconds=seconds)
    return feats, seconds


def maps(unit: np.ndarray, with_umap: bool) -> dict:
    """Time and trustworthiness of each embedding of the unit features."""
    res = {}
    for method, iters in [(m, feature_map.TSNE_ITER) for m in feature_map.METHODS] + [("tsne", 1000)]:
        t0 = time.perf_counter()
        xy = feature_map.embed(unit, method, max_iter=iters)
        res[method if iters == feature_map.TSNE_ITER else f"{method}_{iters}_iter"] = {"seconds": round(time.perf_counter() - t0, 2),
                       "trustworthiness": round(feature_map.keeps_neighbours(unit, xy), 4)}
    if with_umap:
        try:
            import umap  # lazy: optional, only measured when installed
        except ImportError as exc:
            res["umap"] = {"reason": f"not importable ({exc})"}
        else:
            t0 = time.perf_counter()
            xy = umap.UMAP(n_components=2, random_state=config.SEED).fit_transform(unit)
            res["umap"] = {"seconds": round(time.perf_counter() - t0, 2),
                           "trustworthiness": round(feature_map.keeps_neighbours(unit, xy), 4)}
    return res


def nearest_ms(run: runs.Run, unit_queries: np.ndarray) -> dict:
    """p50 / p95 of warm lookups (the index is loaded once before timing)."""
    neighbours.nearest(run, unit_queries[0:1])
    t = []
    for i in range(200):
        t0 = time.perf_counter()
        neighbours.nearest(run, unit_queries[i % len(unit_queries)][None], 5, call="covid")
        t.append(1000 * (time.perf_counter() - t0))
    return {"p50": round(float(np.median(t)), 3), "p95": round(float(np.percentile(t, 95)), 3)}


def page_open_s(run: runs.Run, data) -> float | None:
    """Seconds for the Shortcut audit page (with its map) to run a second time in one session."""
    from streamlit.testing.v1 import AppTest  # lazy: only the page timing needs streamlit

    os.environ["CXR_RUNS_DIR"] = str(run.path.parent)
    os.environ["CXR_DATA_DIR"] = str(run.data_root(data))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120)
    at.session_state["run"] = str(run.path)
    at.run()
    at.switch_page("views/shortcuts.py").run()
    t0 = time.perf_counter()
    at.run()
    seconds = time.perf_counter() - t0
    return round(seconds, 3) if not at.exception else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(config.DEFAULT_RUN))
    ap.add_argument("--data", default=None, help="data root (default: $CXR_DATA_DIR or the run's)")
    ap.add_argument("--out", default="/tmp/bench-neighbours", help="where the features are kept")
    ap.add_argument("--umap", action="store_true", help="also time UMAP (needs umap-learn)")
    args = ap.parse_args(argv)
    run = runs.open_run(args.run)
    feats, feat_s = features(run, args.data, Path(args.out))
    unit = neighbours.standardise(feats, feats.mean(axis=0), np.maximum(feats.std(axis=0), 1e-6))
    out = {"run": str(run.path), "n_films": int(len(feats)), "features_s": round(feat_s, 2),
           "load_before": os.getloadavg()[0], "maps": maps(unit, args.umap),
           "nearest_ms": nearest_ms(run, feats[:50]), "page_open_s": page_open_s(run, args.data),
           "load_after": os.getloadavg()[0]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
