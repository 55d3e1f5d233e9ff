"""The shipped run can be replayed from its own files: its metrics are what core.evaluate computes
from its predictions, its predictions are what its model says about the images, and the files
themselves are there (a missing shipped file fails, it never skips).

Everything is derived from the run folder (``assets/model``), so these tests keep holding when the
shipped model is replaced by another run; only a run whose files disagree fails them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from core import config, evaluate, inputs, runs, train
from core import model as cmodel

ROWS_PER_SPLIT = 3  # predictions re-computed per split: enough to catch a stale file, fast


def test_shipped_assets_are_present(shipped_run, shipped_lungs):
    """The model, its run files and the lung net are part of the repository: the fixtures fail
    (never skip) when a file is missing, so this test fails then."""
    assert shipped_run == config.DEFAULT_RUN and shipped_lungs == config.ASSETS_DIR / "lungs"


def test_shipped_metrics_are_what_core_evaluate_computes(shipped_run):
    """metrics.json is exactly core.evaluate on predictions.csv, with the settings metrics.json names."""
    stored = json.loads((shipped_run / "metrics.json").read_text(encoding="utf-8"))
    again = evaluate.evaluate_run(shipped_run, n_boot=stored["n_boot"], seed=stored["seed"], write=False,
                                  target_sensitivity=stored["threshold"]["target_value"], progress=False)
    again = json.loads(json.dumps(evaluate.jsonable(again)))
    stored.pop("run"), again.pop("run")  # where the folder lay when it was evaluated
    # metrics.json was written on another machine: sums over thousands of bootstrap draws may be
    # added in another order there (other CPU, other BLAS), so floats agree to ~1e-15, not bit for bit.
    diffs = _differences(stored, again, rel=1e-9, abs_=1e-12)
    assert not diffs, diffs[:20]


def _differences(a, b, rel: float, abs_: float, where: str = "") -> list[str]:
    """Where two JSON values differ: floats compared within ``rel``/``abs_``, everything else exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a.keys() ^ b.keys())}"]
        return [d for k in a for d in _differences(a[k], b[k], rel, abs_, f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, rel, abs_, f"{where}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        ok = both_nan or (isinstance(a, int | float) and isinstance(b, int | float)
                          and math.isclose(a, b, rel_tol=rel, abs_tol=abs_))
        return [] if ok else [f"{where}: {a!r} != {b!r}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def test_differences_allow_only_round_off():
    """The comparison above: round-off passes, a real change or a changed structure does not."""
    a = {"brier": 0.1234567890123456, "n": 3, "ci": [0.1, None, "x"], "nan": float("nan")}
    assert _differences(a, {**a, "brier": 0.1234567890123457}, 1e-9, 1e-12) == []
    assert _differences(a, {**a, "brier": 0.1235}, 1e-9, 1e-12) == [".brier: 0.1234567890123456 != 0.1235"]
    assert _differences(a, {**a, "n": 4}, 1e-9, 1e-12) and _differences(a, {**a, "ci": [0.1, None]}, 1e-9, 1e-12)
    assert _differences(a, {**a, "ci": [0.1, 0.0, "x"]}, 1e-9, 1e-12)


def _sample(pred: pd.DataFrame) -> pd.DataFrame:
    """The first ROWS_PER_SPLIT rows of every split, in path order (deterministic)."""
    return pd.concat([g.sort_values("path").head(ROWS_PER_SPLIT) for _, g in pred.groupby("split")])


def test_shipped_predictions_are_what_its_model_says(shipped_run, cxr_root):
    """predictions.csv matches model.keras on real images, prepared as the run prepares them: test
    rows are the saved model's output; ``val`` rows of an ensemble are out-of-fold, the output of
    the member that did not train on the row's fold, through the run's calibration."""
    cfg = runs.read_config(shipped_run)
    model = runs.load_model(shipped_run)
    classes = list(cfg.get("classes") or config.classes(cfg.get("task", "binary")))
    rows = _sample(runs.read_predictions(shipped_run))
    assert set(rows["split"]) >= {"val", "test"}
    size, crop = cmodel.input_size(model), inputs.settings(cfg)
    x = np.stack([inputs.load(cxr_root / rel, size, crop)[0] for rel in rows["path"]])
    probs = cmodel.probabilities(model, x)
    members = cmodel.members(model)
    for i, (split, fold) in enumerate(zip(rows["split"], rows.get("fold", [0] * len(rows)), strict=True)):
        if split == "val" and members:
            logits = cmodel.probabilities(members[int(fold)], x[i : i + 1])
            probs[i] = train.apply_calibration(logits, cfg["calibration"])[0]
    expected = rows[[f"p_{c}" for c in classes]].to_numpy(float)
    assert np.abs(probs - expected).max() <= 1e-4, np.c_[expected[:, 0], probs[:, 0]]
