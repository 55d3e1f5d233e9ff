"""The source probe (core.source_probe): a marker model's features give the source away, a lung model's do not."""

from __future__ import annotations

import numpy as np
import pytest
import shortcut_world as world

from core import audit, source_probe
from core import model as cxr_model


def test_macro_auc_known_values():
    codes = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(3)[codes]
    assert source_probe.macro_auc(codes, perfect) == pytest.approx(1.0)
    assert source_probe.macro_auc(codes, np.full((6, 3), 1 / 3)) == pytest.approx(0.5)
    assert source_probe.macro_auc(codes, 1 - perfect) == pytest.approx(0.0)
    rng = np.random.default_rng(2)
    probs = rng.random((6, 3))
    w = np.stack([np.ones(6), [2, 0, 1, 1, 0, 2]])  # the second: a bootstrap resample by counts
    boot = source_probe.macro_auc(codes, probs, w)
    assert boot[0] == pytest.approx(source_probe.macro_auc(codes, probs))
    idx = np.repeat(np.arange(6), [2, 0, 1, 1, 0, 2])
    assert boot[1] == pytest.approx(source_probe.macro_auc(codes[idx], probs[idx]))


def test_probe_on_pure_noise_features_is_at_chance():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(80, 16))
    src = np.array(["A", "B"] * 40)
    r = source_probe.probe(feats, src, np.arange(80).astype(str), n_boot=200)
    assert r["n"] == 80 and not r["above_chance"] and r["auc"]["ci_low"] < 0.5 < r["auc"]["ci_high"]
    small = source_probe.probe(feats[:6], ["A", "A", "A", "A", "A", "B"], list("abcdef"), n_boot=10)
    assert "reason" in small and small["left_out"] == {"B": 1}


def test_patients_never_straddle_folds():
    """Two images of one patient carry the same features: a leak across folds would score 1.0."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(40, 8))
    feats = np.repeat(base, 2, axis=0)
    src = np.repeat(np.array(["A", "B"] * 20), 2)
    groups = np.repeat(np.arange(40).astype(str), 2)
    r = source_probe.probe(feats, src, groups, n_boot=100)
    assert r["auc"]["value"] < 0.75


@pytest.fixture(scope="module")
def models():
    return {"marker": world.marker_model(), "lung": world.lung_model()}


def test_source_probe_lights_up_for_the_marker_model_only(models):
    x, covid, src = world.evaluation()
    labels = np.where(covid, "covid", "other")
    groups = np.arange(len(x)).astype(str)
    res = {name: source_probe.source_probes(cxr_model.features(m, x), src, labels, groups, n_boot=200)
           for name, m in models.items()}
    for key in ("label:covid", "label:other"):
        assert res["marker"][key]["auc"]["value"] > 0.9 and res["marker"][key]["above_chance"]
        assert res["lung"][key]["auc"]["value"] < 0.75 and not res["lung"][key]["above_chance"]
    # The floor: the same probe on a random-weights copy of the marker model's architecture.
    floor = source_probe.source_probes(cxr_model.features(audit.randomised_copy(models["marker"]), x), src, labels,
                                       groups, n_boot=50)
    assert 0.0 <= floor["label:covid"]["auc"]["value"] <= 1.0
    p = res["marker"]["label:covid"]["_p_true"]
    assert np.isfinite(p[covid]).all() and np.isnan(p[~covid]).all()
