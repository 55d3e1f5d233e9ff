"""Benchmark of the lung net and the shortcut audit; prints one JSON object.

    python tests/benchmarks/bench_audit.py [--data ../shared/cxr] [--run assets/model] [--no-audit]

Figures: held-out Dice of the shipped lung net (ieee8023 lungVAE masks, patients held out at
training), mask time per image (warm, single image at 224 px and batched), and the wall time of
the whole audit of the shipped model's test split (default methods). The audit run writes its
results into the run, as ``python -m core.audit`` does.
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
    args = ap.parse_args()
    root = config.data_dir(args.data)
    out = {"cpu_count": os.cpu_count()}

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

    if not args.no_audit:
        from core import audit

        methods = args.methods.split(",") if args.methods else audit.DEFAULT_METHODS
        t0 = time.perf_counter()
        s = audit.run_audit(args.run, args.data, methods=methods, progress=False)
        out["audit"] = {"run": s["run"], "n_images": s["n_images"], "methods": list(methods),
                        "wall_s": round(time.perf_counter() - t0, 1), "timing": s["timing"]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
