"""Shortcut audit: trust measures, deletion/insertion, sanity check, probes and the whole-run audit."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core import audit, audit_checks, audit_maps, audit_steps, findings
from core.heat import heat_share

# ----------------------------------------------------------------------------- trust


def _lungs(size=40):
    m = np.zeros((size, size), bool)
    m[10:30, 6:16] = True
    m[10:30, 24:34] = True
    return m


def test_trust_all_heat_inside_lungs():
    m = _lungs()
    t = heat_share(m.astype(np.float32), m)
    assert t["in_lung_share"] == pytest.approx(1.0)
    assert t["lung_area_share"] == pytest.approx(m.mean())
    assert t["lung_ratio"] == pytest.approx(1.0 / m.mean())
    assert t["border_share"] == pytest.approx(0.0)


def test_trust_uniform_heat_equals_area_share():
    m = _lungs()
    t = heat_share(np.full(m.shape, 0.3, np.float32), m)
    assert t["in_lung_share"] == pytest.approx(m.mean())
    assert t["lung_ratio"] == pytest.approx(1.0)
    # Border band of 10% (4 px) on each side of 40 px: 1 - (32/40)^2 of the area.
    assert t["border_share"] == pytest.approx(1 - (32 / 40) ** 2)
    # An all-zero map counts as uniform rather than dividing by zero.
    assert heat_share(np.zeros(m.shape), m)["in_lung_share"] == pytest.approx(m.mean())


def test_trust_heat_in_top_band():
    m = _lungs()
    h = np.zeros(m.shape, np.float32)
    h[:6] = 1.0  # top 15% of 40 rows
    t = heat_share(h, m)
    assert t["top_share"] == pytest.approx(1.0)
    assert t["in_lung_share"] == 0.0
    # Rows 0-3 lie in the 4-px border band, rows 4-5 only at their 4 + 4 edge pixels.
    assert t["border_share"] == pytest.approx((4 * 40 + 2 * 8) / (6 * 40))


def test_trust_resizes_mask_to_heatmap():
    m = _lungs(40)
    h = np.kron(m.astype(np.float32), np.ones((2, 2), np.float32))  # 80x80 map, 40x40 mask
    assert heat_share(h, m)["in_lung_share"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- tiny models


def _patch_model(size=32):
    """P(class 0) rises steeply with the brightness of the bottom-right 8x8 patch (fixed weights)."""
    import keras
    from keras import layers

    inp = keras.Input((size, size, 1), name="image")
    x = layers.Cropping2D(((size - 8, 0), (size - 8, 0)), name="patch")(inp)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    dense = layers.Dense(2, name="logits")
    x = dense(x)
    out = layers.Activation("softmax", name="probs")(x)
    model = keras.Model(inp, out)
    dense.set_weights([np.array([[0.05, -0.05]], np.float32), np.array([-6.0, 6.0], np.float32)])
    return model


def test_deletion_insertion_right_vs_wrong_heatmap():
    model = _patch_model()
    img = np.full((32, 32), 40.0, np.float32)
    img[24:, 24:] = 250.0  # what the model looks at
    img[:8, :8] = 250.0  # a distractor the model ignores
    right = np.zeros((32, 32), np.float32)
    right[24:, 24:] = 1.0
    wrong = np.zeros((32, 32), np.float32)
    wrong[:8, :8] = 1.0
    kw = {"class_index": 0, "steps": 16, "insertion_baseline": "mean"}
    d_right, i_right = audit_checks.deletion_insertion(model, img, right, **kw)
    d_wrong, i_wrong = audit_checks.deletion_insertion(model, img, wrong, **kw)
    assert d_right < d_wrong - 0.2
    assert i_right > i_wrong + 0.2


def _blob_data(n, size=32, seed=0):
    """Class 0 (covid) images carry a bright blob at a random place; class 1 images do not."""
    rng = np.random.default_rng(seed)
    x = rng.normal(90, 15, (n, size, size)).astype(np.float32)
    y = np.arange(n) % 2
    yy, xx = np.mgrid[:size, :size]
    for i in np.flatnonzero(y == 0):
        cy, cx = rng.integers(6, size - 6, 2)
        x[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= 9] = 240
    return np.clip(x, 0, 255), y


@pytest.fixture(scope="module")
def blob_model():
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 1), name="image")
    x = layers.Rescaling(1 / 255.0, name="rescale")(inp)
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="last_conv")(x)
    x = layers.GlobalMaxPooling2D(name="gap")(x)
    x = layers.Dense(2, name="logits")(x)
    out = layers.Activation("softmax", name="probs")(x)
    model = keras.Model(inp, out)
    x_tr, y_tr = _blob_data(128)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x_tr[..., None], y_tr, epochs=15, batch_size=32, verbose=0)
    return model


def test_randomised_copy_changes_learned_weights_only(blob_model):
    rand = audit_checks.randomised_copy(blob_model)
    w0 = blob_model.get_layer("last_conv").get_weights()[0]
    w1 = rand.get_layer("last_conv").get_weights()[0]
    assert w0.shape == w1.shape and not np.allclose(w0, w1)
    x, _ = _blob_data(4, seed=3)
    assert blob_model(x[..., None]).shape == rand(x[..., None]).shape


def test_sanity_check_distinguishes_trained_from_random(blob_model):
    x, y = _blob_data(8, seed=5)
    imgs = x[y == 0]
    same = audit_checks.sanity_check(blob_model, imgs, "gradcam", random_model=blob_model)
    assert same["spearman_mean"] == pytest.approx(1.0) and not same["passes"]
    res = audit_checks.sanity_check(blob_model, imgs, "gradcam")
    assert res["n"] == len(imgs)
    assert res["spearman_mean"] < same["spearman_mean"] - 0.3
    assert res["passes"]


def test_probes_on_a_lung_shortcut_free_model():
    """The patch model only looks at a corner marker: blanking the 'lungs' changes nothing."""
    model = _patch_model()
    x, y = _blob_data(20, seed=2)
    y = (np.arange(20) % 2 == 0).astype(int)
    x[y == 1, 24:, 24:] = 250.0  # the shortcut: a bright corner marker on every positive
    lung = np.zeros((20, 32, 32), bool)
    lung[:, 4:20, 4:20] = True
    res = audit_checks.probes(model, x, lung, y, groups=np.arange(20).astype(str), n_boot=50, fill="zero")
    assert res["auc"]["original"]["value"] == pytest.approx(1.0)
    assert res["auc"]["lungs_blanked"]["value"] == pytest.approx(1.0)
    assert res["auc"]["lungs_only"]["value"] < 0.75
    assert "shortcut" in res["verdict"]


# ----------------------------------------------------------------------------- whole run


@pytest.fixture(scope="module")
def tiny_audit_run(tmp_path_factory, blob_model):
    """A run folder written by hand (model.keras, config.json, predictions.csv) over synthetic PNGs."""
    import cv2

    from core import runs

    root = tmp_path_factory.mktemp("data")
    run = tmp_path_factory.mktemp("run")
    x, y = _blob_data(12, seed=9)
    rows = []
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        rel = f"src{i % 2}/img{i}.png"
        (root / rel).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(root / rel), img.astype(np.uint8))
        p = float(blob_model(img[None, ..., None])[0, 0])
        rows.append({"path": rel, "source": f"src{i % 2}", "patient_id": f"p{i // 2}",
                     "label": "covid" if label == 0 else "normal", "class": "covid" if label == 0 else "other",
                     "split": "test", "p_covid": p, "p_other": 1 - p})
    blob_model.save(run / "model.keras")
    runs.write_json(run / "config.json", {"task": "binary", "classes": ["covid", "other"], "size": 32})
    runs.write_csv(run / "predictions.csv", pd.DataFrame(rows))
    return run, root


def test_run_audit_on_tiny_run(tiny_audit_run):
    from core import lungs

    run, root = tiny_audit_run
    lung_net = lungs.build_unet(base=4)
    s = audit.run_audit(run, root, methods=["gradcam"], limit=10, di_methods=["gradcam"], sanity_n=2, n_boot=50,
                        progress=False, lung_model=lung_net)
    assert s["n_images"] == 10
    table = pd.read_csv(run / "audit.csv")
    assert len(table) == 10 and set(table["method"]) == {"gradcam"}
    assert {"in_lung_share", "border_share", "top_share", "deletion_auc", "insertion_auc", "road_combined",
            "road_combined_random", "road_combined_lungs", "lungs_hit", "source_p_all"} <= set(table.columns)
    data = json.loads((run / "audit.json").read_text())
    g = data["methods"]["gradcam"]["groups"]
    assert {"all", "covid", "other"} <= set(g)
    assert {"value", "ci_low", "ci_high"} <= set(g["all"]["in_lung_share"])
    assert data["methods"]["gradcam"]["sanity"]["n"] == 2
    assert set(data["probes"]["auc"]) == {"original", "lungs_blanked", "lungs_only"}
    assert isinstance(data["verdict"], str) and "AUC" in data["verdict"]
    assert data["p_consistency_max_abs_diff"] < 1e-4
    assert (run / "audit_maps" / "heat__gradcam__class-covid.npy").exists()
    assert np.load(run / "audit_maps" / "heat__gradcam__source-src0.npy").shape == (32, 32)
    # The new blocks: source probe (trained and random floor), ROAD, pointing game, slices, findings.
    assert {"source_probe", "road", "pointing_game", "slices", "findings"} <= set(data)
    assert data["source_probe"]["n_features"] == 16 and "auc" in data["source_probe"]["model"]["all"]
    assert "auc" in data["source_probe"]["random"]["all"]
    assert set(data["road"]["maps"]) == {"gradcam", "random", "lungs"}
    assert {"value", "ci_low", "ci_high"} <= set(data["road"]["maps"]["gradcam"]["combined"]["all"])
    assert data["pointing_game"]["lungs"]["n"] == 10 and "gradcam" in data["pointing_game"]["lungs"]["methods"]
    assert data["road"]["n"] == data["road"]["n_of"] == 10 and data["road"]["films"] == "all"  # a tiny net: all films
    assert all(data["timing"][f"{k}_peak_mb"] > 0 for k in ("explain", "sanity", "road", "source_probe"))
    assert data["slices"]["slices"] and "rule" in data["slices"]
    cards = data["findings"]
    assert cards and all({"severity", "claim", "paths", "id"} <= set(c) for c in cards)
    order = [findings.SEVERITIES.index(c["severity"]) for c in cards]
    assert order == sorted(order)
    assert all(p in set(table["path"]) for c in cards for p in c["paths"])
    # Comparing a run with itself: every figure and card is there, nothing changed.
    figs, cmp_cards = findings.compare_runs(run, run)
    assert len(figs) == len(findings.figures(data)) and np.nanmax(np.abs(figs["difference"])) == 0
    assert set(cmp_cards["change"]) == {"same"}
    table_md = findings.compare_markdown({"before": run, "after": run})
    assert "AUC with the lungs blanked" in table_md and table_md.count("Grad-CAM: in-lung share of heat |") == 1


def test_audit_cli_json(tiny_audit_run, capsys, monkeypatch, tmp_path):
    from core import lungs

    run, root = tiny_audit_run
    monkeypatch.setattr(lungs, "lung_model", lambda path=None: lungs.build_unet(base=4))
    md = tmp_path / "AUDIT.md"
    md.write_text("# Audit\n\nProse that stays.\n")
    rc = audit.main(["--run", str(run), "--data", str(root), "--methods", "gradcam", "--limit", "4",
                     "--sanity-n", "0", "--json", "--markdown", str(md)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_images"] == 4 and "verdict" in out
    saved = json.loads((run / "audit.json").read_text())
    assert [f["claim"] for f in out["findings"]] == [f["claim"] for f in saved["findings"]]
    assert (run / "audit_maps.png").exists() or not any(v >= audit_maps.MIN_MEAN_N for v in saved["map_counts"].values())
    text = md.read_text()
    assert "Prose that stays." in text and text.count(findings.BEGIN) == 1
    assert saved["findings"][0]["claim"] in text
    findings.update_markdown(md, saved)  # rewriting replaces the block, never appends a second
    assert md.read_text().count(findings.BEGIN) == 1


def test_run_audit_with_a_lung_crop(tiny_audit_run, tmp_path):
    """A run whose network sees a lung crop: every step runs on what the network sees."""
    import shutil

    from core import lungs, runs

    run, root = tiny_audit_run
    crop_run = tmp_path / "crop_run"
    shutil.copytree(run, crop_run, ignore=shutil.ignore_patterns("audit*"))
    cfg = runs.read_config(crop_run)
    runs.write_json(crop_run / "config.json", {**cfg, "lung_crop": {}})
    s = audit.run_audit(crop_run, root, methods=["gradcam"], limit=6, sanity_n=0, n_boot=20, progress=False,
                        lung_model=lungs.build_unet(base=4))
    assert s["lung_crop"] is not None and s["n_images"] == 6
    assert 0 <= s["n_fell_back"] <= 6
    assert {"source_probe", "road", "pointing_game", "slices", "findings"} <= set(s)


def _ensemble(model_a, model_b):
    """Two copies of a network as the members of one ensemble (the project's contract)."""
    import keras
    from keras import layers

    inp = keras.Input((32, 32, 1), name="image")
    logits = []
    for k, m in enumerate((model_a, model_b)):
        member = keras.Model(m.input, m.get_layer("logits").output, name=f"member_{k}")
        logits.append(member(inp))
    x = layers.Average(name="logits")(logits)
    return keras.Model(inp, layers.Activation("softmax", name="probs")(x))


def test_source_probe_and_road_on_an_ensemble(blob_model):
    from core import model as cxr_model
    from core import road

    ens = _ensemble(blob_model, audit_checks.randomised_copy(blob_model, seed=3))
    assert len(cxr_model.members(ens)) == 2
    x, y = _blob_data(24, seed=11)
    test = pd.DataFrame({"path": [f"i{i}" for i in range(24)], "source": np.where(np.arange(24) % 4 < 2, "A", "B"),
                         "label": np.where(y == 0, "covid", "normal"), "group": [str(i) for i in range(24)]})
    res, p_true = audit_steps.source_probe_step(ens, audit_checks.randomised_copy(ens), x, test, None, n_boot=20)
    assert res["n_features"] == 32  # the members' features side by side
    assert "auc" in res["model"]["all"] and len(p_true["model"]["all"]) == 24
    maps = {"gradcam": np.stack([np.zeros((32, 32), np.float32)] * 24)}
    r = road.road(ens, x, maps, fractions=(0.5,))
    assert r["gradcam"]["combined"].shape == (24,)


@pytest.mark.slow
def test_run_audit_on_real_tiny_run(tiny_run, cxr_root):
    """The audit on a tiny trained run over real images (with the shipped lung net when present)."""
    from core import lungs

    net = None if lungs.MODEL_PATH.exists() else lungs.build_unet(base=4)
    s = audit.run_audit(tiny_run, cxr_root, methods=["gradcam"], limit=6, sanity_n=2, n_boot=50,
                        progress=False, lung_model=net)
    assert s["n_images"] == 6
    assert (tiny_run / "audit.csv").exists() and (tiny_run / "audit.json").exists()
    assert s["p_consistency_max_abs_diff"] < 1e-3
    share = s["methods"]["gradcam"]["groups"]["all"]["in_lung_share"]["value"]
    assert 0.0 <= share <= 1.0


# ----------------------------------------------------------------------------- cost of the audit
def test_explain_shared_equals_one_method_at_a_time(blob_model):
    """Grad-CAM, Grad-CAM++ and LayerCAM from one shared pass, and Faster Score-CAM batched over
    images, give the maps each method gives alone."""
    from core import explain

    x, _ = _blob_data(7, seed=21)
    methods = ["gradcam", "gradcam_pp", "layercam", "scorecam_fast", "saliency"]
    shared = explain.explain_shared(blob_model, x, methods, 0, batch_size=4)
    assert list(shared) == methods
    for m in ("gradcam", "gradcam_pp", "layercam", "saliency"):
        assert np.abs(shared[m] - explain.explain_many(blob_model, x, m, 0)).max() < 1e-5, m
    one = np.stack([explain.explain(blob_model, im, "scorecam_fast", class_index=0) for im in x])
    assert shared["scorecam_fast"].shape == (7, 32, 32) and np.abs(shared["scorecam_fast"] - one).max() < 1e-4


def test_sanity_checks_reuse_the_trained_maps(blob_model):
    from core import explain

    x, _ = _blob_data(6, seed=22)
    rand = audit_checks.randomised_copy(blob_model)
    maps = explain.explain_shared(blob_model, x, ["gradcam", "saliency"], 0)
    res = audit_steps.sanity_checks(blob_model, x, ["gradcam", "saliency"], 3, rand, maps=maps, class_index=0)
    for m, r in res.items():
        alone = audit_checks.sanity_check(blob_model, x[r["_pick"]], m, random_model=rand)
        assert r["n"] == 3 and r["spearman_mean"] == pytest.approx(alone["spearman_mean"], abs=1e-3)


def test_forward_gmacs_and_the_road_budget(blob_model, monkeypatch):
    # conv1: 32x32 outputs x 3x3x1x8; last_conv: 16x16 x 3x3x8x16; logits: 16x2
    assert audit_steps.forward_gmacs(blob_model) == pytest.approx((32 * 32 * 72 + 16 * 16 * 1152 + 32) / 1e9)
    gm = audit_steps.forward_gmacs(blob_model)
    assert audit_steps.road_n_auto(blob_model, 6) == int(audit_steps.ROAD_BUDGET_GMAC / (60 * gm))
    monkeypatch.setattr(audit_steps, "ROAD_BUDGET_GMAC", 1e-6)  # a very costly model: the floor
    assert audit_steps.road_n_auto(blob_model, 6) == audit_steps.ROAD_MIN_FILMS


def test_road_on_a_film_sample_says_how_many(blob_model):
    x, y = _blob_data(10, seed=23)
    test = pd.DataFrame({"path": [f"i{i}" for i in range(10)], "source": "A", "group": [str(i) for i in range(10)],
                         "class": np.where(y == 0, "covid", "other")})
    pick = audit_steps.road_films(test, 4, seed=1)
    assert len(pick) == 4 and list(pick) == sorted(set(pick)) and set(test["class"][pick]) == {"covid", "other"}
    assert len(audit_steps.road_films(test, None)) == len(audit_steps.road_films(test, 99)) == 10
    maps = {"gradcam": np.random.default_rng(0).random((10, 32, 32)).astype(np.float32)}
    lung = np.zeros((10, 32, 32), bool)
    lung[:, 8:24, 8:24] = True
    summary, cols = audit_steps.road_step(blob_model, test, x, lung, maps, ["covid", "other"], (0.5,), n_boot=20,
                                          progress=False, class_index=0, n_films=4)
    assert summary["n"] == 4 and summary["n_of"] == 10 and "sample of 4 of 10" in summary["films"]
    assert summary["maps"]["gradcam"]["combined"]["all"]["n"] == 4
    assert set(cols) == {"gradcam", "random", "lungs"}
    sample = audit_steps.road_films(test, 4).tolist()  # road_step's sample (its default seed)
    assert all(np.flatnonzero(np.isfinite(v)).tolist() == sample for v in cols.values())
    # the ROAD finding cards say the figure comes from a sample
    assert "sample of 4 of the 10 films" in findings._road_sample({"road": summary})
    assert findings._road_sample({"road": {**summary, "n": 10}}) == ""
