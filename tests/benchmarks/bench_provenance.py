"""How much does a retrain differ when the machine differs? (for the model card's provenance section)

    .venv/bin/python tests/benchmarks/bench_provenance.py [--data DIR] [--recipe tiny|small] [--out DIR]

We have one machine type, so this measures the closest proxies of "another machine": the same
recipe, seed and code trained in separate processes that differ only in how TensorFlow computes on
the CPU: oneDNN kernels on or off (``TF_ENABLE_ONEDNN_OPTS``) and 2 or 1 intra-op threads
(``TF_NUM_INTRAOP_THREADS``, ``OMP_NUM_THREADS``). Another CPU (other vector instructions, other
core count) changes the same things: the order of floating-point sums and which kernels run.
A repeat of the reference shows what "the same machine" gives (op determinism is on in core.train).

Prints ONE JSON object: per variant, against the reference run, the largest and mean absolute
difference of P(covid) over the val + test rows of predictions.csv, the test ROC AUC of both and
its difference, the within-source AUCs, and the share of test decisions (at each run's own
validation threshold) that differ. Recipes: ``tiny`` is the test suite's tiny run (64 px, 5 images
per split and class, 2 epochs); ``small`` is 64 px, 40 images per split and class, 6 epochs.
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

RECIPES = {
    "tiny": ["--size", "64", "--limit", "5", "--epochs", "2", "--batch-size", "16", "--patience", "5", "--seed", "7"],
    "small": ["--size", "64", "--limit", "40", "--epochs", "6", "--batch-size", "16", "--patience", "6", "--seed", "7"],
}
VARIANTS = {
    "reference": {"TF_ENABLE_ONEDNN_OPTS": "1", "TF_NUM_INTRAOP_THREADS": "2", "OMP_NUM_THREADS": "2"},
    "reference_again": {"TF_ENABLE_ONEDNN_OPTS": "1", "TF_NUM_INTRAOP_THREADS": "2", "OMP_NUM_THREADS": "2"},
    "onednn_off": {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_NUM_INTRAOP_THREADS": "2", "OMP_NUM_THREADS": "2"},
    "one_thread": {"TF_ENABLE_ONEDNN_OPTS": "1", "TF_NUM_INTRAOP_THREADS": "1", "OMP_NUM_THREADS": "1"},
}


def train(data: str, runs_root: Path, recipe: str, name: str, env_extra: dict) -> tuple[Path, float]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env_extra}
    cmd = [sys.executable, "-m", "core.train", "--data", data, "--runs", str(runs_root), "--name", name,
           "--quiet", *RECIPES[recipe]]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


def compare(ref: Path, other: Path) -> dict:
    import numpy as np

    from core import runs

    a, b = runs.read_predictions(ref), runs.read_predictions(other)
    assert a["path"].tolist() == b["path"].tolist(), "the two runs predicted different images"
    d = np.abs(a["p_covid"].to_numpy(float) - b["p_covid"].to_numpy(float))
    ma, mb = runs.read_metrics(ref), runs.read_metrics(other)
    test = (a["split"] == "test").to_numpy()
    calls_a = a["p_covid"].to_numpy(float)[test] >= ma["threshold"]["value"]
    calls_b = b["p_covid"].to_numpy(float)[test] >= mb["threshold"]["value"]
    auc_a, auc_b = ma["roc_auc"]["value"], mb["roc_auc"]["value"]
    within = {s: [w["roc_auc"]["value"], (mb.get("within_source") or {}).get(s, {}).get("roc_auc", {}).get("value")]
              for s, w in (ma.get("within_source") or {}).items()}
    return {
        "max_abs_dp_covid": float(d.max()),
        "mean_abs_dp_covid": float(d.mean()),
        "n_rows": int(len(d)),
        "test_roc_auc": [auc_a, auc_b],
        "abs_d_test_roc_auc": None if auc_a is None or auc_b is None else abs(auc_a - auc_b),
        "within_source_roc_auc": within,
        "threshold": [ma["threshold"]["value"], mb["threshold"]["value"]],
        "test_decisions_differing": float(np.mean(calls_a != calls_b)),
        "source_sha256_same": runs.read_env(ref)["source_sha256"] == runs.read_env(other)["source_sha256"],
    }


def main(argv=None) -> int:
    from core import config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="data root (default: $CXR_DATA_DIR, else data/)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="tiny")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    a = p.parse_args(argv)
    data = str(config.data_dir(a.data))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        trained = {}
        for name, env in VARIANTS.items():
            print(f"training {name} ({a.recipe}) ...", file=sys.stderr, flush=True)
            trained[name] = train(data, root, a.recipe, name, env)
        ref = trained["reference"][0]
        result = {
            "recipe": a.recipe,
            "recipe_args": RECIPES[a.recipe],
            "variants": VARIANTS,
            "load_average": os.getloadavg(),
            "train_seconds": {k: round(v[1], 1) for k, v in trained.items()},
            "vs_reference": {k: compare(ref, v[0]) for k, v in trained.items() if k != "reference"},
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
