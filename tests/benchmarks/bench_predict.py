"""Benchmark batch prediction (``core.predict``): films per second, decoding included.

    python tests/benchmarks/bench_predict.py [--data DIR] [--run RUN] [--n 600] [--batch-size 32]
                                             [--workers 1,2,4]

Reads ``--n`` real X-rays of every source (PNG and JPEG, as stored, mostly ~1000 px), then times
:func:`core.predict.predict_paths` on them for each ``--workers`` value (threads that decode and
prepare films through ``core.inputs`` while the network scores the previous batch), after one
warm-up batch. Also times the two halves alone: decoding (at the needed size,
``core.inputs.needed_side``) + preparing every film in one thread (the lung U-Net a batch at a
time, as core.predict does), decoding alone, the network on the prepared batch and, for a
lung-crop run, the lung U-Net alone on the same films (``networks_only_cpu_bound_films_per_s``:
what the two networks allow on every core if decoding and checks cost nothing). Prints one
JSON object: films/s (wall), the CPU time per film of the whole process (all threads) and what it allows when every core works for this job
(``cpu_bound_films_per_s`` = cores / CPU seconds per film: an upper bound, robust to other jobs
on a shared machine), and the load average before and after.
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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from core import config, images, inputs, lungs, predict, runs  # noqa: E402
from core import model as model_lib  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--run", default=None, help="run folder (default: the shipped model)")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", default="1,2,4", help="comma-separated thread counts to time")
    a = ap.parse_args(argv)
    from test_load import pool_files

    data = Path(a.data or os.environ.get("CXR_DATA_DIR") or config.REPO_ROOT.parent / "shared" / "cxr")
    run = runs.resolve_run(a.run)
    cfg = runs.read_config(run)
    crop = inputs.settings(cfg)
    model = runs.load_model(run)
    size = model_lib.input_size(model)
    files = pool_files(data, a.n)
    for f in files[:256]:  # the page cache holds the files: time decoding, not the disk
        f.read_bytes()
    out = {"run": str(run), "lung_crop": crop, "n": len(files), "cpu_count": os.cpu_count(),
           "mean_file_kib": round(float(np.mean([f.stat().st_size for f in files])) / 1024, 1),
           "load_avg_before": os.getloadavg()}
    predict.predict_paths(model, files[: a.batch_size], size, batch_size=a.batch_size, lung_crop=crop)  # warm-up

    t = time.perf_counter()
    need = inputs.needed_side(size, crop)
    films = [images.decode(f, need=need) for f in files]
    decode_only_s = time.perf_counter() - t
    x = np.concatenate([inputs.prepare(films[i:i + a.batch_size], size, crop)[0]
                        for i in range(0, len(films), a.batch_size)])
    decode_s = time.perf_counter() - t
    out["decode_only_one_thread_films_per_s"] = round(len(files) / decode_only_s, 1)
    t, c = time.perf_counter(), time.process_time()
    model_lib.probabilities(model, x, batch_size=a.batch_size)
    model_s, model_cpu = time.perf_counter() - t, time.process_time() - c
    out["decode_prepare_one_thread_films_per_s"] = round(len(files) / decode_s, 1)
    out["network_only_films_per_s"] = round(len(files) / model_s, 1)
    if crop is not None:
        # the lung U-Net alone, a batch at a time on the films it reads: with the network, what a
        # film costs however cheap its decoding gets
        net = lungs.net_size()
        small = np.stack([images.resize(f, net) for f in films])
        lung_model = lungs.lung_model()
        t, c = time.perf_counter(), time.process_time()
        for i in range(0, len(small), a.batch_size):
            lungs.probabilities(small[i:i + a.batch_size], model=lung_model, size=net)
        lung_s, lung_cpu = time.perf_counter() - t, time.process_time() - c
        out["lung_unet_only_films_per_s"] = round(len(files) / lung_s, 1)
        out["networks_only_cpu_bound_films_per_s"] = round(os.cpu_count() * len(files) / (model_cpu + lung_cpu), 1)

    for w in [int(v) for v in a.workers.split(",")]:
        t, c = time.perf_counter(), time.process_time()
        df, errors = predict.predict_paths(model, files, size, batch_size=a.batch_size, lung_crop=crop, workers=w)
        s, cpu = time.perf_counter() - t, time.process_time() - c
        out[f"workers_{w}"] = {"films_per_s": round(len(files) / s, 1), "seconds": round(s, 2),
                               "cpu_ms_per_film": round(1000 * cpu / len(files), 2),
                               "cpu_bound_films_per_s": round(os.cpu_count() * len(files) / cpu, 1),
                               "rows": len(df), "errors": len(errors)}
    out["load_avg_after"] = os.getloadavg()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
