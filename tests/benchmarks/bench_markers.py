"""Burned-in text and marker detectors against the hand-labelled films of ``tests/data/markers.csv``.

    .venv/bin/python tests/benchmarks/bench_markers.py [--data ../shared/cxr] [--detector image|ocr|both] [--json]

Per detector: film-level precision and recall of ``has_marker`` (a film is called marked when the
detector returns at least one box), box-level recall (share of labelled boxes that some detected
box touches, with a tolerance of 0.02 of each side since the labels are rough) and box-level
precision (share of detected boxes that touch a labelled one), per collection, and the time per
film (median and 95th percentile, the detector alone, not the decoding). Targets: precision >= 0.90,
recall >= 0.80 (film level).

``image`` is :func:`core.markers.detect`. ``ocr`` is rapidocr-onnxruntime's text detector (DBNet,
models in its wheel; ``use_det`` only) on the film with its longer side at 640 px; it is not a
dependency of the project, so it runs only where it is installed (else it is reported as skipped).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from core import images, markers  # noqa: E402

LABELS = REPO / "tests" / "data" / "markers.csv"
TOL = 0.02  # labelled boxes are rough: a detected box within 2 % of a side still touches one
TARGETS = {"precision": 0.90, "recall": 0.80}


def load_labels(path=LABELS) -> pd.DataFrame:
    """The labelled list: path, collection, has_marker, boxes (list of [x0, y0, x1, y1]), kinds (list)."""
    df = pd.read_csv(path, comment="#", dtype={"boxes": str, "kinds": str}, keep_default_na=False)
    df["boxes"] = [[[float(v) for v in b.split()] for b in s.split(";")] if s.strip() else [] for s in df["boxes"]]
    df["kinds"] = [s.split(";") if s.strip() else [] for s in df["kinds"]]
    return df


def touches(a, b, tol: float = TOL) -> bool:
    """Do two normalised boxes (x0, y0, x1, y1) overlap, allowing ``tol`` of slack?"""
    return not (a[2] < b[0] - tol or b[2] < a[0] - tol or a[3] < b[1] - tol or b[3] < a[1] - tol)


def score(labels: pd.DataFrame, found: dict) -> dict:
    """Film- and box-level precision/recall of ``found`` (path -> list of boxes) against ``labels``."""
    called = np.array([len(found[p]) > 0 for p in labels["path"]])
    truth = labels["has_marker"].to_numpy(bool)
    tp, fp, fn = int((called & truth).sum()), int((called & ~truth).sum()), int((~called & truth).sum())
    pairs = list(zip(labels["path"], labels["boxes"], strict=True))
    lab_hit = [any(touches(lb, g) for g in found[p]) for p, bs in pairs for lb in bs]
    det_hit = [any(touches(lb, g) for lb in bs) for p, bs in pairs for g in found[p]]
    return {"n": int(len(labels)), "n_marked": int(truth.sum()), "tp": tp, "fp": fp, "fn": fn,
            "tn": int((~called & ~truth).sum()), "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
            "box_recall": float(np.mean(lab_hit)) if lab_hit else float("nan"),
            "box_precision": float(np.mean(det_hit)) if det_hit else float("nan"), "n_boxes_found": len(det_hit),
            "missed": labels.loc[truth & ~called, "path"].tolist(),
            "false_alarms": labels.loc[~truth & called, "path"].tolist()}


def _ocr():
    """rapidocr's text detector as a function film -> boxes, or None where it is not installed."""
    try:
        from rapidocr_onnxruntime import RapidOCR  # lazy: optional, compared here only
    except ImportError:
        return None
    engine = RapidOCR()

    def detect(film):
        g = np.clip(film, 0, 255).astype(np.uint8)
        h, w = g.shape
        s = 640 / max(h, w)
        g = cv2.resize(g, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        res, _ = engine(g, use_det=True, use_cls=False, use_rec=False)
        H, W = g.shape
        return [[p[:, 0].min() / W, p[:, 1].min() / H, p[:, 0].max() / W, p[:, 1].max() / H]
                for p in (np.asarray(q) for q in (res or []))]
    return detect


def run(detector, labels: pd.DataFrame, root: Path, name: str) -> dict:
    """Run one detector over the labelled films; its score overall and per collection, and ms per film."""
    found, ms = {}, []
    for p in tqdm(labels["path"], desc=name, file=sys.stderr):
        film = images.decode(root / p, p)
        t0 = time.perf_counter()
        found[p] = [list(map(float, b)) for b in detector(film)]
        ms.append(1000 * (time.perf_counter() - t0))
    out = score(labels, found)
    out["ms_median"], out["ms_p95"] = float(np.median(ms)), float(np.percentile(ms, 95))
    out["by_collection"] = {c: {k: v for k, v in score(sub, found).items() if k not in ("missed", "false_alarms")}
                            for c, sub in labels.groupby("collection")}
    out["meets_targets"] = bool(out["precision"] >= TARGETS["precision"] and out["recall"] >= TARGETS["recall"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "cxr"), help="data root (default ../shared/cxr)")
    p.add_argument("--detector", choices=("image", "ocr", "both"), default="both")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    labels, root = load_labels(), Path(args.data)
    res = {"n_films": int(len(labels)), "n_marked": int(labels["has_marker"].sum()), "targets": TARGETS}
    if args.detector in ("image", "both"):
        res["image"] = run(lambda f: markers.detect(f)[1], labels, root, "image")
    if args.detector in ("ocr", "both"):
        ocr = _ocr()
        res["ocr"] = run(ocr, labels, root, "ocr") if ocr else {"skipped": "rapidocr_onnxruntime is not installed"}
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    for name in ("image", "ocr"):
        r = res.get(name)
        if not r or "skipped" in r:
            print(f"{name}: {r['skipped'] if r else 'not run'}")
            continue
        print(f"{name}: precision {r['precision']:.3f} recall {r['recall']:.3f} (tp {r['tp']} fp {r['fp']} "
              f"fn {r['fn']} tn {r['tn']}); boxes: recall {r['box_recall']:.3f} precision {r['box_precision']:.3f}; "
              f"{r['ms_median']:.1f} ms/film median, {r['ms_p95']:.1f} p95")
        for c, s in r["by_collection"].items():
            print(f"   {c:9s} n={s['n']:3d} precision {s['precision']:.2f} recall {s['recall']:.2f} "
                  f"box recall {s['box_recall']:.2f} box precision {s['box_precision']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
