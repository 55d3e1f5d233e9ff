"""Benchmark of core.uncertainty: does test-time augmentation move the leave-one-source-out AUCs,
and does the range tell wrong calls from right ones?

    python tests/benchmarks/bench_uncertainty.py --data ../shared/cxr [--run assets/model] \
        [--loso /work/out/w19a/loso_m1] [--copies 8] [--cache DIR] [--json]

(a) ``--loso``: for each fold run of a ``core.crossval`` folder (crossval.json), P(covid) of its
    external (held-out source) and test rows from the film alone and averaged over the
    ``--copies`` test-time copies; AUC of each as core.crossval/ablation define it.
(b) On the out-of-fold rows of ``--run`` (split ``val`` of predictions.csv, films from the data
    root): each row is called by the member that did not train on it, so the honest range is
    that member's over the copies (``range_oof``); the range over copies x every member is also
    given (``range_all``: two of the three members trained on the row). For each, the AUC of the
    range's width, of "the range crosses the threshold" and of the share of samples on the other
    side of the threshold, for "the call at the run's threshold is wrong"; next to it, the AUC of
    the plain closeness to the threshold (``-|p - threshold|``), which needs no range at all.
    The same on the external rows of the fold runs (a held-out collection: many wrong calls).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import external_auc  # noqa: E402

from core import config, runs, uncertainty  # noqa: E402
from core.image_cache import prepare_images  # noqa: E402


def samples_of(run: runs.Run, root: Path, table: pd.DataFrame, copies: int, cache) -> tuple[np.ndarray, np.ndarray]:
    """(kept row indices, P(covid) (n, copies, members)) of the films of ``table``."""
    model = run.model()
    x, _, _, kept, _ = prepare_images(root, table["path"].tolist(), int(run.config["size"]), run.lung_crop,
                                      cache, progress=False)
    out = []
    for i in range(0, len(x), 16):  # 16 films x copies per batch
        batch = np.concatenate([uncertainty.copies(f, copies) for f in x[i : i + 16]])
        p = uncertainty.member_probabilities(model, batch, run.positive_index)
        out.append(p.reshape(-1, copies, p.shape[1]))
    return np.asarray(kept), np.concatenate(out)


def _auc(y, s) -> float:
    y = np.asarray(y)
    return float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else float("nan")


def wrong_call_aucs(s: np.ndarray, p: np.ndarray, y: np.ndarray, thr: float) -> dict:
    """AUCs for "the call is wrong" of each score; ``s`` (n, k) samples, ``p`` the call's P(covid)."""
    wrong = (p >= thr) != (y == 1)
    lo, hi = np.percentile(s, uncertainty.PERCENTILES, axis=1)
    other_side = np.mean((s >= thr) != (p >= thr)[:, None], axis=1)
    return {"n": int(len(p)), "n_wrong": int(wrong.sum()),
            "auc_width": _auc(wrong, hi - lo), "auc_crosses": _auc(wrong, (lo < thr) & (thr <= hi)),
            "auc_other_side_share": _auc(wrong, other_side), "auc_closeness": _auc(wrong, -np.abs(p - thr)),
            "width_wrong": float(np.mean((hi - lo)[wrong])) if wrong.any() else float("nan"),
            "width_right": float(np.mean((hi - lo)[~wrong])) if (~wrong).any() else float("nan"),
            "crosses_share": float(np.mean((lo < thr) & (thr <= hi)))}


def oof_part(run: runs.Run, root: Path, copies: int, cache) -> dict:
    """(b) on the run's out-of-fold rows: the honest range (the member that left the row out) and all members."""
    pred = run.predictions()
    val = pred[pred["split"] == "val"].reset_index(drop=True)
    kept, s = samples_of(run, root, val, copies, cache)
    val = val.iloc[kept].reset_index(drop=True)
    fold = val["fold"].astype(int).to_numpy()
    own = s[np.arange(len(val)), :, np.clip(fold, 0, s.shape[2] - 1)]  # (n, copies): the out-of-fold member
    y = (val["label"] == "covid").astype(int).to_numpy()
    p = val["p_covid"].to_numpy()
    thr = float(run.threshold)
    return {"threshold": thr, "copy0_vs_csv_max_abs": float(np.max(np.abs(own[:, 0] - p))),
            "range_oof": wrong_call_aucs(own, p, y, thr),
            "range_all": wrong_call_aucs(s.reshape(len(s), -1), p, y, thr)}


def loso_part(folder: Path, root: Path, copies: int, cache) -> dict:
    """(a) AUC per held-out source without and with test-time averaging, and (b) on the external rows."""
    cv = json.loads((folder / "crossval.json").read_text())
    out = {}
    for source, f in cv["folds"].items():
        run = runs.open_run(f["run"])
        pred = run.predictions()
        pred = pred[pred["split"].isin(["external", "test"])].reset_index(drop=True)
        kept, s = samples_of(run, root, pred, copies, cache)
        pred = pred.iloc[kept].reset_index(drop=True)
        plain, tta = s[:, 0, :].mean(axis=1), s.reshape(len(s), -1).mean(axis=1)
        a = pred.assign(p_plain=plain, p_tta=tta)
        ext = a["split"] == "external"
        y = (a["label"] == "covid").astype(int).to_numpy()
        out[source] = {"auc_csv": external_auc(a), "auc_plain": external_auc(a, "p_plain"),
                       "auc_tta": external_auc(a, "p_tta"), "crossval_auc": f["roc_auc"]["value"],
                       "wrong_calls_external": wrong_call_aucs(s[ext.to_numpy()].reshape(int(ext.sum()), -1),
                                                               plain[ext.to_numpy()], y[ext.to_numpy()],
                                                               float(run.threshold))}
    for k in ("auc_plain", "auc_tta"):
        out[f"mean_{k}"] = float(np.mean([v[k] for v in out.values() if isinstance(v, dict)]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="data root (the runs' films)")
    p.add_argument("--run", default=str(config.DEFAULT_RUN), help="run for (b) (default: the shipped model)")
    p.add_argument("--loso", help="a core.crossval output folder (crossval.json) for (a)")
    p.add_argument("--copies", type=int, default=uncertainty.COPIES)
    p.add_argument("--cache", help="prepared-films cache folder (default: none)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    root = config.data_dir(a.data)
    t0 = time.time()
    res = {"copies": a.copies, "oof": oof_part(runs.open_run(a.run), root, a.copies, a.cache)}
    if a.loso:
        res["loso"] = loso_part(Path(a.loso), root, a.copies, a.cache)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=None if a.json else 1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
