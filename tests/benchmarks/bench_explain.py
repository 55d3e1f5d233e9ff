"""Warm per-image timings of every explanation method on the shipped model; prints one JSON object.

    .venv/bin/python tests/benchmarks/bench_explain.py [--run R] [--repeats 5] [--image PATH]

Uses assets/model (core.runs.load_model); if no model is shipped yet it falls back to
core.model.build("default") with random weights and says so ("shipped": false). The image is a
real chest X-ray from the data root when one is found, else a synthetic one. Each method is run
once to warm up (tracing, caches), then ``--repeats`` times; the median is reported.
Targets (issue 4): Grad-CAM <= 100 ms, Score-CAM fast <= 0.5 s, SmoothGrad (20) <= 1.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from core import config, images  # noqa: E402
from core import explain as E  # noqa: E402

TARGETS_S = {"gradcam": 0.100, "scorecam_fast": 0.5, "smoothgrad": 1.5}


def _model(run):
    try:
        from core import runs

        path = runs.resolve_run(run)
        return runs.load_model(path), str(path), True
    except Exception as exc:  # noqa: BLE001 - any reason the shipped model is unusable
        from core import model as M

        print(f"no usable model at {run or config.DEFAULT_RUN} ({exc}); using random default preset", file=sys.stderr)
        return M.build("default"), "core.model.build('default') random weights", False


def _image(path, size):
    if path:
        return images.load(path, size=size), str(path)
    roots = [config.data_dir(None), config.REPO_ROOT.parent / "shared" / "cxr"]
    for root in roots:
        for sub in ("kermany/NORMAL", "nih/No_findings", "ieee8023/images"):
            d = root / sub
            if d.is_dir():
                for f in sorted(d.iterdir()):
                    try:
                        return images.load(f, size=size), str(f)
                    except images.ImageError:
                        continue
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (size, size)).astype(np.float32), "synthetic noise"


def _time(fn, repeats):
    fn()  # warm: traces the compiled functions, builds the cached linear model
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), float(np.min(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="run folder (default: shipped assets/model)")
    p.add_argument("--image", default=None, help="image to explain (default: first real CXR found)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-tkv", action="store_true", help="skip the tf-keras-vis engine timings")
    p.add_argument("--full-scorecam", action="store_true", help="also time Score-CAM over all channels")
    args = p.parse_args(argv)

    model, model_desc, shipped = _model(args.run)
    size = E.input_hw(model)[0]
    img, img_desc = _image(args.image, size)
    layer = E.default_layer(model)
    channels = int(E.target(model, layer)[0].output.shape[-1])

    methods = ["gradcam", "gradcam_pp", "layercam", "saliency", "smoothgrad", "scorecam_fast"]
    if args.full_scorecam:
        methods.append("scorecam")
    engines = ["tape"] if args.no_tkv else list(E.ENGINES)
    timings = {}
    for engine in engines:
        for m in methods:
            med, best = _time(lambda m=m, engine=engine: E.explain(model, img, m, engine=engine), args.repeats)
            timings[f"{m}[{engine}]"] = {"median_s": round(med, 4), "min_s": round(best, 4)}
            print(f"{m:>14} [{engine}]: median {med * 1000:8.1f} ms  min {best * 1000:8.1f} ms", file=sys.stderr)
    t = time.perf_counter()
    np.asarray(model(img[None, :, :, None], training=False))
    predict_s = time.perf_counter() - t

    result = {
        "model": model_desc,
        "shipped": shipped,
        "size": size,
        "layer": layer,
        "layer_channels": channels,
        "scorecam_fast_channels": min(E.SCORECAM_FAST_N, channels),
        "smoothgrad_samples": E.SMOOTHGRAD_SAMPLES,
        "image": img_desc,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "default_engine": E.DEFAULT_ENGINE,
        "eager_predict_s": round(predict_s, 4),
        "timings": timings,
        "targets_s": TARGETS_S,
        "targets_met": {
            k: timings[f"{k}[{E.DEFAULT_ENGINE}]"]["median_s"] <= v for k, v in TARGETS_S.items()
        },
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
