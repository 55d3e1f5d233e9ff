"""core.case: one film analysed once (shipped model, a real film and a synthetic one); maps on demand."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from core import case, images, inputs, runs, trust
from core import model as cmodel


@pytest.fixture(scope="module")
def run(shipped_run):
    return runs.open_run(shipped_run)


def real_film(root):
    return sorted((root / "nih" / "Pneumonia").glob("*.png"))[0]


def synthetic_png(size: int = 300) -> bytes:
    """A bright square on a dark frame: decodable, but no lungs and no chest."""
    img = np.full((size, size + 40), 20, np.uint8)
    img[60:240, 80:260] = 200
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_analyse_a_real_film_once_and_its_maps_on_demand(run, cxr_root):
    path = real_film(cxr_root)
    c = case.analyse(run, path)
    assert c.name == path.name and c.film_shape == images.decode(path).shape
    x, box, fell_back, _ = inputs.load(path, run.size, run.lung_crop)
    assert np.allclose(c.x, x) and c.box == box and c.fell_back == fell_back
    assert c.probs.shape == (len(run.classes),) and abs(float(c.probs.sum()) - 1) < 1e-5
    assert c.p_positive == pytest.approx(float(cmodel.probabilities(run.model(), x[None])[0, run.positive_index]))
    assert c.features.shape[0] == 1 and c.shown.dtype == np.uint8 and max(c.shown.shape) <= case.SHOWN_MAX
    assert c.lungs is not None and c.lungs.shape == c.small.shape[:2]
    assert c.maps == {}
    got = case.heatmap(run, c, "gradcam")
    assert set(got) == {"hmap", "heat", "faith"} and got["heat"].shape == c.shown.shape
    assert list(c.maps) == [("gradcam", run.positive_index, None)]
    assert case.heatmap(run, c, "gradcam", run.positive_index) is got  # computed once
    rows = case.trust_rows(run, c, "gradcam")
    assert trust.row(rows, "lungs")["mark"] in trust.MARKS and trust.row(rows, "ood")["key"] == "ood"
    assert case.analyse(run, path.read_bytes(), name=path.name).probs == pytest.approx(c.probs)


def test_analyse_a_synthetic_film(run):
    c = case.analyse(run, synthetic_png(), name="square.png")
    assert c.film_shape == (300, 340) and c.x.shape == (run.size, run.size)
    assert c.warnings  # not a frontal chest X-ray: the checks say so
    assert np.isfinite(c.probs).all() and 0.0 <= c.p_positive <= 1.0
    other = 1 - run.positive_index
    got = case.heatmap(run, c, "gradcam", other)
    assert got["hmap"].shape == c.x.shape and (("gradcam", other, None) in c.maps)


def test_a_file_that_is_no_image_is_an_image_error(run):
    with pytest.raises(images.ImageError):
        case.analyse(run, b"not an image", name="x.png")
