"""Decoding at the needed size against decoding in full, on every film of a data root.

    python tests/benchmarks/bench_decode.py [--data DIR] [--run RUN] [--limit N] [--json]

Each film is decoded twice through :func:`core.images.decode_sized`: in full (``need=None``, and
the lung U-Net at its training side: the old path) and at the size the run's network needs (:func:`core.inputs.needed_side`: JPEGs read
at 1/2, 1/4 or 1/8 scale by libjpeg, other formats reduced once by area averaging), prepared by
:func:`core.inputs.prepare` (the run's lung crop; the new path's lung U-Net at
:func:`core.lungs.infer_size`) and scored by the run's model. Reports the
largest and the 99th percentile of |dP(positive class)|, the decisions that flip at the run's
threshold, how often the lung crop's fallback changes, the largest change of a crop box (fraction
of the film), and the decode time per film both ways, per format. One JSON object on stdout.
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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from core import config, images, inputs, lungs, predict, runs  # noqa: E402
from core import model as model_lib  # noqa: E402

FOLDERS = ("ieee8023/images", "kermany", "nih", "hannover/png")


def film_files(root: Path, limit: int | None = None) -> list[Path]:
    """Every image file under the collections' folders, sorted (optionally every k-th, to ``limit``)."""
    files = predict.expand([root / f for f in FOLDERS if (root / f).is_dir()])
    if limit and len(files) > limit:
        files = files[:: -(-len(files) // limit)]
    return files


def _decode_both(files: list[Path], need: int):
    """Full and reduced films, the seconds each decode took, and the files' formats."""
    full, small, t_full, t_small, kinds, kept = [], [], [], [], [], []
    for f in tqdm(files, desc="decoding", unit="film", file=sys.stderr, mininterval=5):
        data = f.read_bytes()
        try:
            t = time.perf_counter()
            a, _ = images.decode_sized(data, str(f))
            t_full.append(time.perf_counter() - t)
            t = time.perf_counter()
            b, _ = images.decode_sized(data, str(f), need=need)
            t_small.append(time.perf_counter() - t)
        except images.ImageError:
            continue
        full.append(a)
        small.append(b)
        kinds.append("dicom" if images.is_dicom(data, f.name) else f.suffix.lower().lstrip(".").replace("jpg", "jpeg"))
        kept.append(f)
    return full, small, np.array(t_full), np.array(t_small), kinds, kept


def _score(run, films, lung_side=None, batch: int = 64):
    """(probabilities, boxes, fell_back) of decoded films through the run's preparation."""
    model = run.model()
    probs, boxes, fell = [], [], []
    for i in range(0, len(films), batch):
        x, b, fb = inputs.prepare(films[i:i + batch], run.size, run.lung_crop, lung_side=lung_side)
        probs.append(model_lib.probabilities(model, x, batch_size=batch))
        boxes.append(b)
        fell.append(fb)
    return np.concatenate(probs), np.concatenate(boxes), np.concatenate(fell)


def compare(run, files: list[Path], need: int | None = None) -> dict:
    """The figures of the module docstring for ``files`` (``need``: instead of the run's needed side)."""
    need = need or inputs.needed_side(run.size, run.lung_crop)
    full, small, t_full, t_small, kinds, kept = _decode_both(files, need)
    p_full, box_full, fb_full = _score(run, full, lungs.net_size())  # the old path: lung net at 128
    p_small, box_small, fb_small = _score(run, small)
    pos = run.positive_index
    dp = np.abs(p_full[:, pos] - p_small[:, pos])
    thr = run.threshold if run.threshold is not None else 0.5
    flips = (p_full[:, pos] >= thr) != (p_small[:, pos] >= thr)
    both = ~fb_full & ~fb_small
    out = {"run": str(run.path), "need": need, "n": len(kept), "threshold": thr,
           "max_abs_dp": round(float(dp.max()), 5), "p99_abs_dp": round(float(np.percentile(dp, 99)), 5),
           "mean_abs_dp": round(float(dp.mean()), 5), "flipped": int(flips.sum()),
           "flipped_files": [str(kept[i]) for i in np.flatnonzero(flips)],
           "fallback_changed": int((fb_full != fb_small).sum()),
           "box_max_abs_change": round(float(np.abs(box_full - box_small)[both].max()), 4) if both.any() else None,
           "worst_file": str(kept[int(dp.argmax())]), "formats": {}}
    for kind in sorted(set(kinds)):
        sel = np.array([k == kind for k in kinds])
        out["formats"][kind] = {"n": int(sel.sum()), "max_abs_dp": round(float(dp[sel].max()), 5),
                                "flipped": int(flips[sel].sum()),
                                "decode_ms_full": round(1000 * float(t_full[sel].mean()), 2),
                                "decode_ms_needed": round(1000 * float(t_small[sel].mean()), 2)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="data root (default: $CXR_DATA_DIR or ../shared/cxr)")
    ap.add_argument("--run", default=None, help="run folder (default: the shipped model)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many films (evenly spread)")
    ap.add_argument("--need", type=int, default=None, help="shorter side to decode at (default: the run's "
                    "core.inputs.needed_side)")
    ap.add_argument("--json", action="store_true", help="(always JSON; accepted for symmetry)")
    a = ap.parse_args(argv)
    root = Path(a.data or os.environ.get("CXR_DATA_DIR") or config.REPO_ROOT.parent / "shared" / "cxr")
    print(json.dumps(compare(runs.open_run(a.run), film_files(root, a.limit), a.need)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
