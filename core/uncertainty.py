"""How unsure the model is about one film: a range on P(COVID-19) over small changes and the ensemble.

The prepared film (:func:`core.inputs.prepare`) is copied :data:`COPIES` times: the film itself
and copies shifted, rotated, zoomed and re-exposed a little (:data:`TTA`, a subset of the
training augmentations of :mod:`core.augment` that keep the anatomy: no flips, no cut-out, no
blur). Every copy goes through every member network of the run's ensemble (the nested
``member_<k>`` models of :func:`core.model.ensemble`, with the run's calibration) in ONE batched
forward pass. The 10th to 90th percentile of those P(COVID-19)s is the film's range
(:class:`Spread`); when the threshold falls inside it the call is unsure, and :func:`sentence`
says so in plain words. A network whose members or logits cannot be reached (an adopted
SavedModel) gets the augmentation part alone.

``python -m core.uncertainty --run RUN FILM...`` prints each film's range.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from core import model as cmodel
from core import operating
from core.augment import augment_fn
from core.calibration import apply_calibration

# Anatomy-keeping test-time changes: rotation (degrees), zoom (share of the side kept), shift
# (share of the side), gamma and intensity window (as in core.augment.AUGMENT["light"]).
TTA = dict(rot=5.0, scale=(0.9, 1.0), shift=0.03, gamma=0.1, window=0.05)
COPIES = 8  # the film itself and 7 changed copies: one batch of 8 x members
PERCENTILES = (10, 90)
SEED = 2024  # fixed: the same film always gets the same copies and so the same range


@dataclass
class Spread:
    """P(positive) of every (copy, member) pair of one film, and the range that summarises them."""

    samples: np.ndarray  # (copies, members) P(positive); copy 0 is the film itself
    low: float  # PERCENTILES[0] of the samples
    median: float
    high: float  # PERCENTILES[1] of the samples

    @property
    def width(self) -> float:
        """``high - low``: the figure that ranks films by how unsure the model is."""
        return self.high - self.low


def copies(x: np.ndarray, n: int = COPIES, seed: int = SEED) -> np.ndarray:
    """``n`` versions (n, size, size) of a prepared film (size, size): itself first, then changed copies."""
    x = np.asarray(x, np.float32)
    if n <= 1:
        return x[None]
    batch = tf.constant(np.repeat(x[None, ..., None], n - 1, axis=0))
    out = _copier(x.shape[0], n, seed)(batch)
    return np.concatenate([x[None], np.asarray(out)[..., 0]])


@functools.lru_cache(maxsize=8)
def _copier(size: int, n: int, seed: int):
    """The :data:`TTA` copies as one traced function (about half the eager time, on the page's path)."""
    fn = augment_fn(TTA, size, False, seed)
    zeros = tf.zeros([n - 1])
    spec = tf.TensorSpec([n - 1, size, size, 1], tf.float32)
    return tf.function(lambda b: fn(0, b, zeros, zeros)[0], input_signature=[spec])


def _members_fn(model: keras.Model):
    """Traced ``x -> [logits of each member]`` (built once per model); None when they cannot be reached."""
    try:
        # the members' outputs in the ensemble's own graph are the inputs of its averaging ``logits``
        logits = model.get_layer("logits")
        outs = logits.input if cmodel.members(model) else logits.output
        net = keras.Model(model.input, list(outs) if isinstance(outs, (list, tuple)) else [outs])
    except (ValueError, AttributeError):
        return None
    spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)
    return tf.function(lambda x: net(x, training=False), input_signature=[spec])


def _calibration(model: keras.Model) -> dict:
    """The run's calibration as core.calibration params, read from the model's ``calibration`` layer."""
    try:
        kernel, bias = model.get_layer("calibration").get_weights()
    except ValueError:
        return {"method": "none"}
    return {"method": "platt", "kernel": kernel, "bias": bias}


def member_probabilities(model: keras.Model, x: np.ndarray, positive_index: int = 0,
                         batch_size: int = 64) -> np.ndarray:
    """P(positive) (n, members) of prepared films (n, size, size) from each member network, calibrated.

    One network (or a model whose members cannot be reached) gives one column: its own output.
    """
    x = np.asarray(x, np.float32)
    fn = cmodel.cached(model, "uncertainty_members", _members_fn)
    if fn is None:
        return cmodel.probabilities(model, x, batch_size)[:, [positive_index]]
    cal = _calibration(model)
    cols = []
    for i in range(0, len(x), batch_size):
        outs = fn(tf.constant(x[i : i + batch_size, ..., None]))
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        cols.append(np.stack([apply_calibration(np.asarray(z), cal)[:, positive_index] for z in outs], axis=1))
    return np.concatenate(cols) if cols else np.zeros((0, 1), np.float32)


def summarise(samples: np.ndarray) -> Spread:
    """The :class:`Spread` of one film's (copies, members) P(positive) samples."""
    s = np.asarray(samples, np.float64)
    lo, hi = np.percentile(s, PERCENTILES)
    return Spread(samples=s, low=float(lo), median=float(np.median(s)), high=float(hi))


def spreads(model: keras.Model, x: np.ndarray, positive_index: int = 0, n: int = COPIES) -> list[Spread]:
    """The :class:`Spread` of each prepared film of ``x`` (m, size, size): ``n`` copies x members each."""
    x = np.asarray(x, np.float32)
    if len(x) == 0:
        return []
    batch = np.concatenate([copies(f, n) for f in x])
    p = member_probabilities(model, batch, positive_index)
    return [summarise(p[i * n : (i + 1) * n]) for i in range(len(x))]


def film_spread(model: keras.Model, x: np.ndarray, positive_index: int = 0, n: int = COPIES) -> Spread:
    """The :class:`Spread` of one prepared film (size, size): one batched forward pass."""
    return spreads(model, np.asarray(x)[None], positive_index, n)[0]


def at_point(spread: Spread | None, point) -> Spread | None:
    """The range on the scale an operating point (:class:`core.operating.Point`) decides on: a site
    profile may recalibrate P(covid) (monotone, so the range's ends map to the new range's ends)."""
    if spread is None or point is None or not point.recalibration:
        return spread
    return summarise(operating.recalibrate(spread.samples, point.recalibration))


def at_decision(spread: Spread | None, point, threshold: float | None) -> tuple[Spread | None, float | None]:
    """The range and the threshold that decide: at ``point`` (:class:`core.operating.Point`: its
    threshold, and its recalibration of P) when one is given, else ``spread`` at ``threshold``."""
    if point is None:
        return spread, threshold
    return at_point(spread, point), point.threshold


def crosses(spread: Spread | None, threshold: float | None) -> bool:
    """True when the threshold lies inside the film's range: some copy or member would call it otherwise."""
    return spread is not None and threshold is not None and spread.low < float(threshold) <= spread.high


def sentence(spread: Spread | None, threshold: float | None) -> str:
    """A plain sentence on the film's range and what it means for the call at ``threshold``."""
    if spread is None:
        return ""
    n_copies, n_members = spread.samples.shape
    what = (f"{n_copies} slightly shifted, zoomed or re-exposed copies of the film"
            + (f" x {n_members} networks of the ensemble" if n_members > 1 else ""))
    rng = (f"P(COVID-19) ranges from {spread.low:.2f} to {spread.high:.2f} "
           f"({PERCENTILES[0]}th-{PERCENTILES[1]}th percentile over {what}).")
    if threshold is None:
        return rng
    if crosses(spread, threshold):
        return (rng + f" The range crosses the threshold {float(threshold):.2f}: small changes to the film, or "
                "another of the networks, would change the call. Treat this call as uncertain.")
    side = "above" if spread.low >= float(threshold) else "below"
    return rng + f" The whole range lies {side} the threshold {float(threshold):.2f}: the call holds under these changes."


def facts(spread: Spread | None, threshold: float | None) -> list[tuple[str, str]]:
    """The case report's line on the range (none without a spread)."""
    if spread is None:
        return []
    return [("range of P(covid)", f"{spread.low:.3f} to {spread.high:.3f}"
             + (" (crosses the threshold: uncertain)" if crosses(spread, threshold) else "")),
            ("what the range means", sentence(spread, threshold))]


def main(argv=None) -> int:
    """CLI: the range of P(COVID-19) of each film given, with the run's threshold."""
    from core import case, images, runs  # lazy: core.case imports this module

    p = argparse.ArgumentParser(description="The range of P(COVID-19) of each film over test-time changes and "
                                "the ensemble's members (10th-90th percentile), and whether it crosses the threshold.")
    p.add_argument("films", nargs="+", help="image files (PNG, JPEG, DICOM)")
    p.add_argument("--run", help="run folder (default: the shipped model)")
    p.add_argument("--json", action="store_true", help="one JSON object per film")
    a = p.parse_args(argv)
    run = runs.open_run(a.run)
    rc = 0
    for f in a.films:
        try:
            c = case.analyse(run, f)
        except images.ImageError as err:  # names the file and the reason
            print(f"{f}: {err}", file=sys.stderr)
            rc = 1
            continue
        s = c.spread
        row = {"film": f, "p_covid": c.p_positive, "low": s.low, "median": s.median, "high": s.high,
               "crosses": crosses(s, run.threshold), "sentence": sentence(s, run.threshold)}
        print(json.dumps(row) if a.json else f"{f}: {row['sentence']}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
