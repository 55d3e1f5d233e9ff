"""Decoding at the needed size against decoding in full, on every film of a data root.

    python tests/benchmarks/bench_decode.py [--data DIR] [--run RUN] [--limit N] [--json]

Each film is decoded twice through :func:`core.images.decode_sized`: in full (``need=None``, and
the lung U-Net at its training side: the old path) and at the size the run's network needs (:func:`core.inputs.needed_side`: JPEGs read
at 1/2, 1/4 or 1/8 scale by libjpeg, other formats reduced once by area averaging), prepared by
:func:`core.inputs.prepare` (the run's lung crop; the new path's lung U-Net at
:func:`core.lungs.net_size`) and scored by the run's model. Reports the
largest and the 99th percentile of |dP(positive class)|, the decisions that flip at the run's
threshold, how often the lung crop's fallback changes, the same for the full-size path on the films
shifted by one native pixel (``floor_one_pixel_shift``: how much the model moves on a change nobody
would call a different film), the largest change of a crop box (fraction
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
    """Full and reduced films of ``files``, the seconds each decode took, and the files' formats."""
    full, small, t_full, t_small, kinds, kept = [], [], [], [], [], []
    for f in files:
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
    return full, small, t_full, t_small, kinds, kept


def _score(run, films, lung_side=None):
    """(probabilities of the positive class, boxes, fell_back) of decoded films through the run's preparation."""
    x, boxes, fell_back = inputs.prepare(films, run.size, run.lung_crop, lung_side=lung_side)
    return model_lib.probabilities(run.model(), x, batch_size=len(films))[:, run.positive_index], boxes, fell_back


def measure(run, files: list[Path], need: int, chunk: int = 64) -> dict[str, np.ndarray | list]:
    """Per film: P both ways and on the one-pixel shift, boxes, fallbacks, decode seconds, formats
    (``chunk`` films in memory at a time: full-size films are 4 MB each as float32)."""
    cols: dict[str, list] = {k: [] for k in ("p_full", "p_small", "p_shift", "box_full", "box_small", "fb_full",
                                             "fb_small", "t_full", "t_small", "kinds", "kept")}
    for i in tqdm(range(0, len(files), chunk), desc="films", unit="chunk", file=sys.stderr):
        full, small, t_full, t_small, kinds, kept = _decode_both(files[i:i + chunk], need)
        if not kept:
            continue
        p_full, box_full, fb_full = _score(run, full, lungs.net_size())  # the old path: lung net at 128
        p_small, box_small, fb_small = _score(run, small)
        # noise floor: the full-size path on the same films less their first row and column (a shift
        # of one native pixel, as a re-scan or a viewer's crop would give)
        p_shift, _, _ = _score(run, [f[1:, 1:] for f in full], lungs.net_size())
        for k, v in dict(p_full=p_full, p_small=p_small, p_shift=p_shift, box_full=box_full, box_small=box_small,
                         fb_full=fb_full, fb_small=fb_small, t_full=t_full, t_small=t_small, kinds=kinds,
                         kept=kept).items():
            cols[k].extend(list(v))
    return {k: (v if k in ("kinds", "kept") else np.asarray(v)) for k, v in cols.items()}


def _dp(a: np.ndarray, b: np.ndarray, thr: float) -> dict:
    d = np.abs(a - b)
    return {"max_abs_dp": round(float(d.max()), 5), "p99_abs_dp": round(float(np.percentile(d, 99)), 5),
            "mean_abs_dp": round(float(d.mean()), 5), "flipped": int(((a >= thr) != (b >= thr)).sum())}


def compare(run, files: list[Path], need: int | None = None) -> dict:
    """The figures of the module docstring for ``files`` (``need``: instead of the run's needed side)."""
    need = need or inputs.needed_side(run.size, run.lung_crop)
    m = measure(run, files, need)
    thr = run.threshold if run.threshold is not None else 0.5
    flips = (m["p_full"] >= thr) != (m["p_small"] >= thr)
    both = ~m["fb_full"] & ~m["fb_small"]
    dp = np.abs(m["p_full"] - m["p_small"])
    out = {"run": str(run.path), "need": need, "lung_side": lungs.net_size(), "n": len(m["kept"]),
           "threshold": thr, **_dp(m["p_full"], m["p_small"], thr),
           "flipped_files": [str(m["kept"][i]) for i in np.flatnonzero(flips)],
           "fallback_changed": int((m["fb_full"] != m["fb_small"]).sum()),
           "box_max_abs_change": round(float(np.abs(m["box_full"] - m["box_small"])[both].max()), 4)
           if both.any() else None,
           "worst_file": str(m["kept"][int(dp.argmax())]),
           "floor_one_pixel_shift": _dp(m["p_full"], m["p_shift"], thr), "formats": {}}
    for kind in sorted(set(m["kinds"])):
        sel = np.array([k == kind for k in m["kinds"]])
        out["formats"][kind] = {"n": int(sel.sum()), **_dp(m["p_full"][sel], m["p_small"][sel], thr),
                                "decode_ms_full": round(1000 * float(m["t_full"][sel].mean()), 2),
                                "decode_ms_needed": round(1000 * float(m["t_small"][sel].mean()), 2)}
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
