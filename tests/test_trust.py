"""core.trust: the trust panel beside every heatmap, on maps and models with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from core import checks, trust

SIDE = 64


def lungs_mask(side: int = SIDE) -> np.ndarray:
    """Two elliptical 'lungs' covering about a quarter of the image, as on a frontal film."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    m = np.zeros((side, side), bool)
    for cx in (0.3, 0.7):
        m |= ((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
    return m


# --------------------------------------------------------------------------- the lung judgement
@pytest.mark.parametrize("kind", ["uniform", "blank"])
def test_a_uniform_or_blank_map_is_not_flagged(kind):
    """Lungs cover ~25 % of the image, so a uniform map has only ~25 % of its heat there: that is
    no sign of a shortcut (the old page warned below 50 %)."""
    mask = lungs_mask()
    heat = np.ones((SIDE, SIDE), np.float32) if kind == "uniform" else np.zeros((SIDE, SIDE), np.float32)
    row = trust.lung_row(heat, mask)
    assert row["mark"] == "amber", row
    assert trust.lung_row(heat, mask)["mark"] != "red"
    if kind == "uniform":
        assert row["value"]["in_lung_share"] < 0.5  # would have fired the old warning
        assert row["value"]["lung_ratio"] == pytest.approx(1.0)


def test_heat_outside_the_lungs_is_flagged_and_heat_inside_is_green():
    mask = lungs_mask()
    outside = (~mask).astype(np.float32)
    assert trust.lung_row(outside, mask)["mark"] == "red"
    row = trust.lung_row(outside, mask)
    assert row["mark"] == "red" and "avoids the lungs" in row["sentence"]
    inside = mask.astype(np.float32)
    assert trust.lung_row(inside, mask)["mark"] == "green"
    assert trust.lung_row(inside, mask)["mark"] != "red"


def test_lung_judgement_cutoffs_come_from_thresholds():
    mask = lungs_mask()
    area = mask.mean()

    def map_with_ratio(r):  # a map with a share r * area of its heat in the lungs
        share = r * area
        return np.where(mask, share / mask.sum(), (1 - share) / (~mask).sum()).astype(np.float32)

    lo, hi = trust.THRESHOLDS["lung_ratio_red"], trust.THRESHOLDS["lung_ratio_green"]
    assert trust.lung_row(map_with_ratio(lo - 0.05), mask)["mark"] == "red"
    assert trust.lung_row(map_with_ratio(lo + 0.05), mask)["mark"] == "amber"
    assert trust.lung_row(map_with_ratio(hi + 0.05), mask)["mark"] == "green"


def test_no_lungs_found_cannot_be_judged():
    heat = np.random.default_rng(0).random((SIDE, SIDE)).astype(np.float32)
    assert trust.lung_row(heat, None)["mark"] == "amber"
    assert trust.lung_row(heat, np.zeros((SIDE, SIDE), bool))["mark"] == "amber"


def test_border_row():
    band = trust.band_area((SIDE, SIDE))
    assert band == pytest.approx(1 - 0.8**2, abs=0.03)
    edge = np.zeros((SIDE, SIDE), np.float32)
    edge[:4] = 1.0
    centre = np.zeros((SIDE, SIDE), np.float32)
    centre[24:40, 24:40] = 1.0
    assert trust.border_row(edge)["mark"] == "red"
    assert trust.border_row(centre)["mark"] == "green"
    assert trust.border_row(np.ones((SIDE, SIDE), np.float32))["mark"] == "amber"


# --------------------------------------------------------------------------- faithfulness
def region_model(region: np.ndarray):
    """A Keras model whose P(class 0) rises with the mean brightness inside ``region`` only."""
    import keras

    side = region.shape[0]
    inp = keras.Input((side, side, 1), name="image")
    conv = keras.layers.Conv2D(1, side, padding="valid", use_bias=False, name="last_conv")
    x = conv(inp)
    x = keras.layers.Flatten(name="gap")(x)
    dense = keras.layers.Dense(2, name="logits")
    out = keras.layers.Activation("softmax", name="probs")(dense(x))
    model = keras.Model(inp, out)
    conv.set_weights([(region / region.sum()).astype(np.float32)[:, :, None, None]])
    dense.set_weights([np.array([[0.08, -0.08]], np.float32), np.array([-8.0, 8.0], np.float32)])
    return model


def bright_film(region: np.ndarray) -> np.ndarray:
    """Dark film, bright where the model reads: removing that region (set to the mean) lowers P."""
    rng = np.random.default_rng(1)
    return np.clip(np.where(region, 220.0, 40.0) + rng.normal(0, 5, region.shape), 0, 255).astype(np.float32)


def test_faithfulness_tells_a_faithful_map_from_an_unfaithful_one():
    region = np.zeros((SIDE, SIDE), bool)
    region[10:30, 8:28] = True  # 10 % of the image: what the model reads
    model = region_model(region)
    film = bright_film(region)
    good = trust.faithfulness(model, film, region.astype(np.float32))
    bad = trust.faithfulness(model, film, (~region).astype(np.float32) * np.linspace(0, 1, SIDE)[None, :])
    assert good["p"] > 0.9
    assert good["drop_top"] > 0.5 and good["score"] > good["drop_top"] - max(good["drop_random"]) - 1e-6
    assert trust.faithfulness_row(good)["mark"] == "green"
    assert bad["drop_top"] < 0.05
    assert trust.faithfulness_row(bad)["mark"] == "red"
    assert len(good["drop_random"]) == trust.THRESHOLDS["faith_random"]


def test_faithfulness_amber_when_blank_or_probability_too_low():
    region = np.zeros((SIDE, SIDE), bool)
    region[10:30, 8:28] = True
    model = region_model(region)
    blank = trust.faithfulness(model, bright_film(region), np.zeros((SIDE, SIDE), np.float32))
    assert blank["blank"] and trust.faithfulness_row(blank)["mark"] == "amber"
    dark = trust.faithfulness(model, np.zeros((SIDE, SIDE), np.float32), region.astype(np.float32))
    assert dark["p"] < trust.THRESHOLDS["faith_min_p"]
    assert trust.faithfulness_row(dark)["mark"] == "amber"


def test_random_regions_have_the_asked_size():
    regions = trust._random_regions((SIDE, SIDE), 5, 0.2, seed=3)
    assert regions.shape == (5, SIDE, SIDE)
    assert all(r.sum() == round(0.2 * SIDE * SIDE) for r in regions)
    assert not np.array_equal(regions[0], regions[1])


# --------------------------------------------------------------------------- sanity check and image checks
def test_sanity_row_reads_the_audit():
    audit = {"model_sha256": "abc", "methods": {
        "gradcam": {"sanity": {"passes": True, "spearman_mean": 0.1, "threshold": 0.5}},
        "saliency": {"sanity": {"passes": False, "spearman_mean": 0.8, "threshold": 0.5}}}}
    assert trust.sanity_row(audit, "gradcam", "abc")["mark"] == "green"
    assert trust.sanity_row(audit, "saliency", "abc")["mark"] == "red"
    assert trust.sanity_row(audit, "layercam", "abc")["mark"] == "amber"
    assert trust.sanity_row(audit, "gradcam", "other-model")["mark"] == "amber"
    assert trust.sanity_row(None, "gradcam", "abc")["mark"] == "amber"


def test_image_rows_follow_the_checks():
    rows = {r["key"]: r for r in trust.image_rows([])}
    assert [rows[k]["mark"] for k in ("frontal", "polarity", "xray")] == ["green"] * 3
    rows = {r["key"]: r for r in trust.image_rows([checks.WARN_LATERAL, checks.WARN_PHOTO])}
    assert rows["frontal"]["mark"] == "red" and rows["polarity"]["mark"] == "green"
    assert rows["xray"]["mark"] == "red" and "photograph" in rows["xray"]["sentence"]
    rows = {r["key"]: r for r in trust.image_rows([checks.WARN_INVERTED, checks.WARN_TINTED])}
    assert rows["polarity"]["mark"] == "red" and rows["xray"]["mark"] == "amber"


# --------------------------------------------------------------------------- out of distribution
def test_ood_distance_against_the_validation_films():
    rng = np.random.default_rng(0)
    train, val = rng.normal(0, 1, (400, 12)), rng.normal(0, 1, (80, 12))
    ref = trust.reference(train, val)
    ref["model_sha256"] = np.array("abc")
    assert trust.ood_row(ref, np.zeros((1, 12)), "abc")["mark"] == "green"
    assert trust.ood_row(ref, np.full((1, 12), 6.0), "abc")["mark"] == "red"
    assert trust.ood_row(ref, np.zeros((1, 12)), "another")["mark"] == "amber"
    assert trust.ood_row(None, np.zeros((1, 12)), "abc")["mark"] == "amber"
    d = trust.distance(ref, np.vstack([np.zeros(12), np.ones(12)]))
    assert d.shape == (2,) and d[0] < d[1]


def test_reference_file_is_plain_and_refused_for_another_model(tiny_run, cxr_root):
    """write_reference on a real (tiny) run: a plain NPZ; its own films are typical, an inverted one is not."""
    from core import images, inputs, runs
    from core import model as cmodel

    path = trust.write_reference(tiny_run, cxr_root, progress=False)
    assert path.name == trust.REFERENCE_FILE
    with np.load(path, allow_pickle=False) as z:
        assert {"mean", "precision", "val_distances", "model_sha256", "n_train"} <= set(z.files)
    ref = trust.load_reference(tiny_run)
    sha = runs.sha256(tiny_run / "model.keras")
    assert str(ref["model_sha256"]) == sha
    model = runs.load_model(tiny_run)
    split = runs.read_split(tiny_run)
    dev = split[split["split"] == "train"]
    assert len(ref["val_distances"]) == len(dev)  # cut-offs measured fold by fold on the development films
    film = images.decode(cxr_root / dev["path"].iloc[0])
    x, _, _ = inputs.prepare([film], cmodel.input_size(model), inputs.settings(runs.read_config(tiny_run)))
    row = trust.ood_row(ref, cmodel.features(model, x), sha)
    assert row["mark"] in ("green", "amber") and row["value"]["distance"] > 0
    assert trust.ood_row(ref, cmodel.features(model, x), "0" * 64)["mark"] == "amber"


def test_panel_has_every_row():
    mask = lungs_mask()
    heat = mask.astype(np.float32)
    faith = {"p": 0.9, "drop_top": 0.5, "drop_random": [0.0, 0.1], "score": 0.45, "blank": False}
    rows = trust.panel(heat, mask, faith, method="gradcam", audit_summary=None, model_sha256="x", warnings=[],
                       reference=None, features=None)
    assert [r["key"] for r in rows] == ["lungs", "border", "sanity", "faithfulness", "frontal", "polarity",
                                       "xray", "ood"]
    assert all(r["mark"] in trust.MARKS and r["sentence"] for r in rows)
    assert trust.overall(rows) == "amber"  # no audit, no reference
    assert trust.row(rows, "lungs")["mark"] == "green" and trust.row(rows, "ood")["mark"] == "amber"
    assert trust.row(rows, "nothing") is None
