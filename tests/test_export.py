"""core.export: the serving SavedModel gives what core.inputs + the .keras model give, on real films.

Tolerances, measured on 200 real films of all sources: the SavedModel's boxes were identical to
core.inputs' and P(covid) within 1e-6 (cv2's INTER_AREA and tf.image.resize "area" both average
exact pixel areas; only float32 summation order differs). The tests allow P(covid) within 1e-4,
and a box within about one lung-net pixel (1.2 / 128 of the film: a probability on the 0.5
threshold could flip on another CPU), with at least 90 % of the boxes exactly equal. Known
difference, not tested: a film with one side shorter than the net's 128 px and the other longer
(cv2's INTER_AREA then interpolates the short axis linearly, TF repeats pixels).
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


def _shipped_copy(tmp_path_factory, name: str, lung_crop) -> Path:
    """A copy of the shipped run whose config.json sets ``lung_crop``; the model file and its
    recorded sha256 are unchanged (the preparation is the run's setting, not the network's)."""
    run = tmp_path_factory.mktemp("runs") / name
    shutil.copytree(config.DEFAULT_RUN, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["lung_crop"] = lung_crop
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
