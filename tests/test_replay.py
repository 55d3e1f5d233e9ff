"""The shipped run can be replayed from its own files: its metrics are what core.evaluate computes
from its predictions, its predictions are what its model says about the images, and the files
themselves are there (a missing shipped file fails, it never skips).

Everything is derived from the run folder (``assets/model``), so these tests keep holding when the
shipped model is replaced by another run; only a run whose files disagree fails them.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from core import config, evaluate, inputs, runs

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
    assert again == stored, sorted(k for k in stored if stored.get(k) != again.get(k))


def _sample(pred: pd.DataFrame) -> pd.DataFrame:
    """The first ROWS_PER_SPLIT rows of every split, in path order (deterministic)."""
    return pd.concat([g.sort_values("path").head(ROWS_PER_SPLIT) for _, g in pred.groupby("split")])


def test_shipped_predictions_are_what_its_model_says(shipped_run, cxr_root):
    """predictions.csv matches model.keras on real images, prepared as the run prepares them: test
    rows are the saved model's output; ``val`` rows of an ensemble are out-of-fold, the output of
    the member that did not train on the row's fold, through the run's calibration."""
    from core import model as cmodel
    from core import train

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
