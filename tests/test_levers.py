"""Run options ``clahe`` (CLAHE on every prepared film) and ``mixup`` (pairs of training films mixed)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from core import augment, export, inputs, runs, train
from core import model as cmodel
from core.image_cache import prepare_images

CROP_CLAHE = inputs.settings({"lung_crop": True, "clahe": True})


def test_mixup_mixes_films_labels_and_weights_alike():
    rng = np.random.RandomState(0)
    x = rng.uniform(0, 255, (16, 16, 16)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[np.arange(16) % 2]
    plain = next(iter(augment.make_dataset(x, y, np.ones(16), 16, 3, "none")))
    bx, by, bw = (np.asarray(v) for v in next(iter(augment.make_dataset(x, y, np.ones(16), 16, 3, "none", mixup=1.0))))
    px, py = np.asarray(plain[0]), np.asarray(plain[1])  # the same shuffled batch before mixing
    other = py[:, 0] != py[::-1, 0]
    assert other.any() and ((by[other, 0] > 0.01) & (by[other, 0] < 0.99)).any()  # soft labels
    np.testing.assert_allclose(by.sum(axis=1), 1.0, atol=1e-6)
    lam = np.where(py[:, 0] == 1, by[:, 0], 1 - by[:, 0])  # share of the film itself (partner of other label)
    assert (lam[other] >= 0.5 - 1e-6).all()  # folded: the film itself dominates
    i = int(np.flatnonzero(other)[0])
    np.testing.assert_allclose(bx[i], lam[i] * px[i] + (1 - lam[i]) * px[::-1][i], atol=1e-3)
    np.testing.assert_allclose(bw, 1.0, atol=1e-6)


def test_mixup_mixes_every_head():
    y = {"probs": np.eye(2, dtype=np.float32)[[0, 1] * 4], "source": np.eye(2, dtype=np.float32)[[0, 1] * 4]}
    w = {"probs": np.ones(8), "source": np.ones(8)}
    _, by, _ = next(iter(augment.make_dataset(np.zeros((8, 8, 8)), y, w, 8, 1, "none", mixup=1.0)))
    np.testing.assert_allclose(np.asarray(by["probs"]), np.asarray(by["source"]), atol=1e-6)


def low_contrast_film() -> np.ndarray:
    yy, xx = np.mgrid[0:256, 0:256]
    return (110 + 10 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.float32)  # grey levels 100-120


def test_clahe_spreads_a_low_contrast_films_histogram():
    film = low_contrast_film()
    off, _, _ = inputs.prepare([film], 64, inputs.settings({"lung_crop": True}))
    on, _, _ = inputs.prepare([film], 64, CROP_CLAHE)
    assert np.ptp(off[0]) < 25
    assert np.ptp(on[0]) > 2 * np.ptp(off[0])
    assert not np.allclose(on, off)


def test_clahe_is_a_run_setting_and_needs_the_crop():
    assert CROP_CLAHE["clahe"] and inputs.settings({"lung_crop": True}).get("clahe") is None
    with pytest.raises(ValueError, match="clahe"):
        inputs.settings({"lung_crop": False, "clahe": True})
    assert runs._lung_crop("run", {"lung_crop": CROP_CLAHE}) == CROP_CLAHE  # a saved run opens with it


def test_the_recipe_has_clahe_on_the_crop_and_none_on_the_whole_film():
    assert train.resolve(dict(train.DEFAULTS))["clahe"] is True  # the shipped recipe (the lever screen's winner)
    assert train.resolve({**train.DEFAULTS, "lung_crop": False})["clahe"] is False
    assert train.resolve({**train.DEFAULTS, "clahe": False})["clahe"] is False
    parse = train._parser().parse_args
    assert "clahe" not in train.recipe_from_args(parse([]))  # not given: the default decides
    assert train.recipe_from_args(parse(["--no-clahe"]))["clahe"] is False
    with pytest.raises(ValueError, match="clahe"):  # asked for explicitly without the crop it has nothing to act on
        inputs.settings(train.resolve({**train.DEFAULTS, "lung_crop": False, "clahe": True}))


def test_clahe_is_identical_in_training_and_prediction(cxr_root):
    rel = sorted(p.relative_to(cxr_root) for p in (cxr_root / "nih" / "Pneumonia").glob("*.png"))[0]
    trained, _, _, kept, _ = prepare_images(cxr_root, [str(rel)], 64, CROP_CLAHE, None, progress=False)
    predicted, _, _, _ = inputs.load(cxr_root / rel, 64, CROP_CLAHE)
    np.testing.assert_array_equal(trained[0], predicted)
    plain, _, _, _ = inputs.load(cxr_root / rel, 64, inputs.settings({"lung_crop": True}))
    assert not np.array_equal(predicted, plain)


@pytest.mark.slow
def test_a_tiny_run_with_clahe_and_mixup_predicts_as_it_trained(cxr_root, tmp_path):
    run = train.train(data=str(cxr_root), runs=str(tmp_path), verbose=0, size=64, limit=5, epochs=1, batch_size=16,
                      name="levers", seed=7, folds=2, members=1, clahe=True, mixup=0.2)
    r = runs.open_run(run)
    assert r.config["clahe"] and r.config["mixup"] == 0.2 and r.lung_crop["clahe"]
    row = r.predictions().query("split == 'test'").iloc[0]
    x, _, _, film = inputs.load(cxr_root / row["path"], r.config["size"], r.lung_crop)
    p = cmodel.probabilities(r.model(), x)[0, 0]
    assert p == pytest.approx(row["p_covid"], abs=1e-4)
    # the serving export holds the CLAHE too (core.export.clahe: OpenCV's, in TF ops)
    assert export.export(run, tmp_path / "export")["lung_crop"]["clahe"]
    served = tf.saved_model.load(str(tmp_path / "export")).signatures[export.SIGNATURE]
    assert float(served(image=tf.constant(film[None, ..., None]))["p_covid"][0]) == pytest.approx(p, abs=1e-3)
