"""core.export: the serving SavedModel gives what core.inputs + the .keras model give, on real films.

Tolerances, measured on 200 real films of all sources: the SavedModel's boxes were identical to
core.inputs' and P(covid) within 1e-6 (cv2's INTER_AREA and tf.image.resize "area" both average
exact pixel areas; only float32 summation order differs). The tests allow P(covid) within 1e-4,
and a box within about one lung-net pixel (1.2 / 128 of the film: a probability on the 0.5
threshold could flip on another CPU), with at least 90 % of the boxes exactly equal. Known
difference, not tested: a film with one side shorter than the net's 128 px and the other longer
(cv2's INTER_AREA then interpolates the short axis linearly, TF repeats pixels).

CLAHE (run option ``clahe``): the export's TF CLAHE gave exactly what ``core.inputs.clahe``
(OpenCV) gives on the same input, on every synthetic and real input tried (300 random inputs of
sizes 16 to 256, and real prepared films). The exported CLAHE run, on the same 200 films: boxes
identical; P(covid) identical on 91 % of films; on the other 9 %, 1 to 6 of the resized pixels lay
within float32 noise (resize <= 6e-5 apart) of a grey level's k + 0.5 and were quantised to the
neighbouring level, which moved up to 139 CLAHE outputs by up to 3 levels and P(covid) by up to
7.6e-4 (97.5 % of films within 1e-4). The test allows 1e-3, with at least 80 % within 1e-4.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core import config, export, images, inputs, runs
from core import model as model_lib

N_FILMS = 14


@pytest.fixture(scope="module")
def films(cxr_root):
    from test_load import pool_files

    return [(f.name, images.decode(f)) for f in pool_files(cxr_root, N_FILMS)]


def _shipped_copy(tmp_path_factory, name: str, lung_crop, clahe: bool = False) -> Path:
    """A copy of the shipped run whose config.json sets ``lung_crop`` and ``clahe`` (whatever the
    shipped config says); the model file and its recorded sha256 are unchanged (the preparation is
    the run's setting, not the network's)."""
    run = tmp_path_factory.mktemp("runs") / name
    shutil.copytree(config.DEFAULT_RUN, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["lung_crop"], cfg["clahe"] = lung_crop, clahe
    (run / "config.json").write_text(json.dumps(cfg, indent=2))
    assert runs.sha256(run / "model.keras") == cfg["model_sha256"]
    return run


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory):
    """The shipped network with the lung crop (default settings)."""
    return _shipped_copy(tmp_path_factory, "lung-crop", {})


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """The shipped network on the whole film (no lung crop)."""
    return _shipped_copy(tmp_path_factory, "whole-film", None)


@pytest.fixture(scope="module")
def clahe_run(tmp_path_factory):
    """The shipped network with the lung crop and CLAHE on each prepared input."""
    return _shipped_copy(tmp_path_factory, "lung-crop-clahe", {}, clahe=True)


def serve(out):
    import tensorflow as tf

    fn = tf.saved_model.load(str(out)).signatures[export.SIGNATURE]
    return lambda batch: {k: v.numpy() for k, v in fn(image=tf.constant(batch, tf.float32)).items()}


def reference(run, batch_films):
    """What the project's own path gives: core.inputs.prepare, then the .keras model."""
    model = runs.load_model(run)
    crop = inputs.settings(runs.read_config(run))
    x, boxes, fell_back = inputs.prepare(batch_films, model_lib.input_size(model), crop)
    return model_lib.probabilities(model, x)[:, config.COVID_INDEX], boxes, fell_back


def compare(run, out, films):
    fn = serve(out)
    got_p, got_box, got_fb, ref_p, ref_box, ref_fb = [], [], [], [], [], []
    for _, film in films:  # one film per call: each has its own size
        o = fn(film[None, ..., None])
        p, box, fb = reference(run, [film])
        got_p.append(o["p_covid"][0]), got_box.append(o["box"][0]), got_fb.append(o["fell_back"][0])
        ref_p.append(p[0]), ref_box.append(box[0]), ref_fb.append(fb[0])
        np.testing.assert_allclose(o["probs"].sum(axis=1), 1.0, atol=1e-5)
    return tuple(np.asarray(v) for v in (got_p, got_box, got_fb, ref_p, ref_box, ref_fb))


def test_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(runs.RunError, match="not empty"):
        export.export(config.DEFAULT_RUN, tmp_path)


@pytest.mark.slow
def test_whole_film_export_matches_the_keras_model(films, whole_run, tmp_path):
    out = tmp_path / "cxr" / "1"
    rec = export.export(whole_run, out)
    assert rec["model_sha256"] == runs.read_config(config.DEFAULT_RUN)["model_sha256"]
    assert rec["lung_crop"] is None and json.loads((out / "export.json").read_text()) == rec
    got_p, got_box, got_fb, ref_p, ref_box, ref_fb = compare(whole_run, out, films)
    np.testing.assert_allclose(got_p, ref_p, atol=1e-4)
    assert (got_box == np.asarray(inputs.FULL_BOX)).all() and not got_fb.any()
    assert got_p.std() > 0.01  # distinct films, distinct answers: not a constant output
    # A batch of films of one size (as TF Serving batches requests) gives the same as one by one.
    import cv2

    same = [cv2.resize(f, (700, 600), interpolation=cv2.INTER_AREA) for _, f in films[:5]]
    o = serve(out)(np.stack(same)[..., None])
    np.testing.assert_allclose(o["p_covid"], reference(whole_run, same)[0], atol=1e-4)


@pytest.mark.slow
def test_lung_crop_export_matches_core_inputs(films, crop_run, tmp_path):
    out = tmp_path / "crop" / "1"
    rec = export.export(crop_run, out)
    assert rec["lung_crop"] == inputs.LUNG_CROP
    blank = np.full((300, 260), 128.0, np.float32)  # no lungs on it: both paths fall back
    got_p, got_box, got_fb, ref_p, ref_box, ref_fb = compare(crop_run, out, films + [("blank", blank)])
    assert ref_fb[-1] and got_fb[-1]
    np.testing.assert_array_equal(got_fb, ref_fb)
    assert (ref_box[:-1] != np.asarray(inputs.FULL_BOX)).any(axis=1).mean() > 0.8  # the crop is real
    diff = np.abs(got_box - ref_box).max(axis=1)
    assert diff.max() <= 1.2 / 128, diff
    same = diff == 0
    assert same.mean() >= 0.9, diff
    np.testing.assert_allclose(got_p[same], ref_p[same], atol=1e-4)
    # TF Serving reads the signature as it is: saved_model_cli shows its input and outputs.
    cli = shutil.which("saved_model_cli", path=str(config.REPO_ROOT / ".venv" / "bin")) or shutil.which("saved_model_cli")
    if cli is None:  # the tensorflow package installs it beside python
        cli = str(sys.executable).rsplit("/", 1)[0] + "/saved_model_cli"
    shown = subprocess.run([cli, "show", "--dir", str(out), "--tag_set", "serve", "--signature_def", export.SIGNATURE],
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    for word in ("inputs['image']", "(-1, -1, -1, 1)", "outputs['p_covid']", "outputs['box']", "outputs['fell_back']"):
        assert word in shown.stdout, shown.stdout


def _clahe_agreement(prepared) -> tuple[float, float]:
    """Largest |TF CLAHE - core.inputs.clahe| over inputs (size, size), and the share of equal pixels."""
    import tensorflow as tf

    got = export.clahe(tf.constant(np.stack(prepared)[..., None], tf.float32)).numpy()[..., 0]
    ref = np.stack([inputs.clahe(x) for x in prepared])
    diff = np.abs(got - ref)
    return float(diff.max()), float((diff == 0).mean())


@pytest.mark.parametrize("size", [128, 64])
def test_tf_clahe_is_opencvs_on_synthetic_inputs(size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    prepared = [
        np.random.RandomState(size).uniform(-10, 270, (size, size)),  # out of range too: clipped as uint8
        np.full((size, size), 97.3),  # constant: one bin, the clip limit's residual spread
        xx * 255.0 / (size - 1),  # gradient
        40 + 200 * np.exp(-((yy - size / 3) ** 2 + (xx - size / 2) ** 2) / (2 * (size / 10) ** 2)),  # bright blob
    ]
    worst, same = _clahe_agreement([p.astype(np.float32) for p in prepared])
    assert worst <= 1 and same >= 0.99, (worst, same)  # measured: identical (0, 100 %)


def test_tf_clahe_is_opencvs_on_real_prepared_films(cxr_root):
    from test_load import pool_files

    crop = inputs.settings({"lung_crop": True})  # the input CLAHE is applied to: crop and resize
    prepared = [inputs.load(f, 128, crop)[0] for f in pool_files(cxr_root, 6)]
    worst, same = _clahe_agreement(prepared)
    assert worst <= 1 and same >= 0.99, (worst, same)  # measured: identical (0, 100 %)


@pytest.mark.slow
def test_clahe_export_matches_core_inputs(films, clahe_run, crop_run, tmp_path):
    out = tmp_path / "clahe" / "1"
    rec = export.export(clahe_run, out)
    assert rec["lung_crop"] == {**inputs.LUNG_CROP, "clahe": 1}
    got_p, got_box, got_fb, ref_p, ref_box, ref_fb = compare(clahe_run, out, films)
    np.testing.assert_array_equal(got_fb, ref_fb)
    diff = np.abs(got_box - ref_box).max(axis=1)
    assert diff.max() <= 1.2 / 128, diff
    same = diff == 0
    assert same.mean() >= 0.9, diff
    # The CLAHE reads whole grey levels: a resized pixel within float32 noise of k + 0.5 can land on
    # the other level (both CLAHEs are identical on one input), so a few films move a little more.
    np.testing.assert_allclose(got_p[same], ref_p[same], atol=1e-3)
    assert (np.abs(got_p - ref_p)[same] <= 1e-4).mean() >= 0.8
    plain = reference(crop_run, [f for _, f in films])[0]
    assert np.abs(plain - ref_p).max() > 1e-3  # CLAHE changes what the network answers: it ran in both paths


def test_clahe_run_of_a_size_not_a_multiple_of_8_is_refused(tmp_path_factory, tmp_path):
    run = _shipped_copy(tmp_path_factory, "clahe-60", {}, clahe=True)
    cfg = runs.read_config(run)
    runs.atomic_save_model(model_lib.build("default", "binary", 60), run / "model.keras")
    cfg["size"], cfg["model_sha256"] = 60, runs.sha256(run / "model.keras")
    runs.write_json(run / "config.json", cfg)
    with pytest.raises(runs.RunError, match="multiple of 8"):
        export.export(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
