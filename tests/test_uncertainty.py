"""core.uncertainty: test-time copies x ensemble members -> a range on P(COVID-19) and its sentence."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from core import case, report, runs, uncertainty
from core import model as cmodel


def centre_net(size: int = 32, weight: float = 0.2, name: str = "centre") -> keras.Model:
    """A network with a known answer: logit(covid) = weight x (mean of the central 8 x 8 pixels - 128) / 16."""
    x = keras.Input((size, size, 1), name="image")
    c = (size - 8) // 2
    h = keras.layers.Cropping2D(((c, size - 8 - c), (c, size - 8 - c)))(x)
    h = keras.layers.GlobalAveragePooling2D()(h)
    logits = keras.layers.Dense(2, name="logits")(h)
    net = keras.Model(x, keras.layers.Activation("softmax", name="probs")(logits), name=name)
    net.get_layer("logits").set_weights([np.array([[weight / 16, 0.0]], np.float32),
                                         np.array([-128 * weight / 16, 0.0], np.float32)])
    return net


def test_copies_are_the_film_then_small_changes():
    x = np.tile(np.linspace(0, 255, 32, dtype=np.float32), (32, 1))
    c = uncertainty.copies(x, 8)
    assert c.shape == (8, 32, 32)
    np.testing.assert_array_equal(c[0], x)
    assert all(np.abs(c[i] - x).mean() > 0.1 for i in range(1, 8))  # every copy is changed
    assert np.abs(c[1:] - x).mean() < 40  # ... a little (no flip: a flipped ramp would differ by ~128)
    np.testing.assert_array_equal(uncertainty.copies(x, 8), c)  # the same copies every time


def test_a_film_whose_copies_disagree_gets_a_wider_range():
    net = centre_net()
    flat = np.full((32, 32), 128.0, np.float32)
    flat += np.linspace(-20, 20, 32, dtype=np.float32)[None, :]  # smooth: shifts barely change the centre
    spot = flat.copy()
    spot[10:14, 10:14] = 255.0  # a bright spot on the window's corner: shifts and zooms move it in and out
    calm, edgy = uncertainty.film_spread(net, flat), uncertainty.film_spread(net, spot)
    assert calm.samples.shape == (uncertainty.COPIES, 1)  # one network: one column
    assert edgy.width > 3 * calm.width  # about 0.27 against 0.04
    assert edgy.low <= edgy.median <= edgy.high


def test_members_spread_is_each_members_own_calibrated_output():
    nets = [centre_net(weight=w, name=f"n{k}") for k, w in enumerate((0.1, 0.3, 0.6))]
    ens = cmodel.ensemble(nets)
    x = np.full((2, 32, 32), 200.0, np.float32)
    p = uncertainty.member_probabilities(ens, x)
    assert p.shape == (2, 3)
    for k, net in enumerate(nets):
        np.testing.assert_allclose(p[:, k], cmodel.probabilities(net, x)[:, 0], atol=1e-5)
    assert p[0, 0] < p[0, 1] < p[0, 2]  # the steeper member is surer


def test_the_shipped_members_spread_is_real(shipped_run, cxr_root):
    """Copy 0 of each member equals that member's own P(covid) that training wrote for the film."""
    run = runs.open_run(shipped_run)
    row = run.predictions().query("split == 'test'").iloc[0]
    c = case.analyse(run, cxr_root / row["path"], colour_check=False)
    assert c.spread.samples.shape == (uncertainty.COPIES, 3)
    want = [row[f"p_covid_member{k}"] for k in range(3)]
    np.testing.assert_allclose(c.spread.samples[0], want, atol=2e-3)
    assert c.spread.width > 0


def test_range_crossing_the_threshold_says_so():
    across = uncertainty.summarise(np.array([[0.2, 0.3], [0.45, 0.6], [0.7, 0.35]]))
    above = uncertainty.summarise(np.array([[0.8, 0.9], [0.85, 0.95]]))
    assert uncertainty.crosses(across, 0.5) and not uncertainty.crosses(above, 0.5)
    assert not uncertainty.crosses(across, None)
    assert "crosses the threshold 0.50" in uncertainty.sentence(across, 0.5)
    assert "uncertain" in uncertainty.sentence(across, 0.5)
    assert "lies above the threshold" in uncertainty.sentence(above, 0.5)
    assert "x 2 networks" in uncertainty.sentence(above, 0.5)


def test_case_report_carries_the_range():
    spread = uncertainty.summarise(np.array([[0.2, 0.3], [0.45, 0.6], [0.7, 0.35]]))
    img = np.zeros((32, 32), np.float32)
    html = report.case_report_html(img, None, {"covid": 0.4, "other": 0.6}, 0.5, run_id="r", uncertainty=spread)
    assert "range of P(covid)" in html and "crosses the threshold" in html
    pdf = report.case_report_pdf(img, None, {"covid": 0.4, "other": 0.6}, 0.5, run_id="r", uncertainty=spread)
    assert b"range of P" in pdf  # PDF strings escape the brackets
    # a withheld answer (any warning not in checks.FLAG_ONLY) gets no range either
    withheld = report.case_report_html(img, None, {"covid": 0.4, "other": 0.6}, 0.5, run_id="r",
                                       uncertainty=spread, warnings=["This does not look like a chest X-ray."])
    assert "range of P(covid)" not in withheld


@pytest.mark.slow
def test_cli_prints_a_range(shipped_run, cxr_root, capsys):
    film = sorted((cxr_root / "nih" / "Pneumonia").glob("*.png"))[0]
    assert uncertainty.main([str(film), "--run", str(shipped_run), "--json"]) == 0
    assert '"low"' in capsys.readouterr().out
