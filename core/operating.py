"""Operating points: which threshold on P(COVID-19) turns a probability into a call, and why.

The one place that chooses an operating point and applies it; ``core.predict``, ``core.evaluate``,
``core.case``, ``core.report`` and the dashboard all go through :func:`choose` and :func:`decide`.

- ``run``: the run's own threshold (metrics.json; for our runs chosen on the out-of-fold
  development rows for sensitivity >= 0.95).
- ``rule-out``: the highest threshold that keeps sensitivity >= :data:`RULE_OUT_SENSITIVITY` on
  the run's out-of-fold development rows (the ``val`` rows of predictions.csv, never test).
- ``balanced``: the threshold of Youden's J (sensitivity + specificity - 1 highest) on those rows.
- a site profile: a ``SITE.json`` written by ``python -m core.calibrate`` from a hospital's own
  labelled films (its threshold, a Platt recalibration of the probability on the logit when the
  site had both classes, and the CIs it will give). A profile made for another model (its
  ``model_sha256`` differs from the run's) is refused with :class:`SiteError`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core import metrics, runs

RULE_OUT_SENSITIVITY = 0.95
SITE_FORMAT = "covid-cxr site profile 1"
NAMED = ("run", "rule-out", "balanced")
MEANING = {
    "run": "the run's own threshold, chosen when it was trained on its out-of-fold development films",
    "rule-out": (f"misses at most {100 * (1 - RULE_OUT_SENSITIVITY):.0f} % of COVID-19 films of the development data "
                 "(sensitivity 0.95), at the cost of calling many other films COVID-19: a negative call is the "
                 "informative one"),
    "balanced": ("weighs missed COVID-19 films and false alarms equally (Youden's J on the development data): fewer "
                 "false alarms, more misses"),
    "site": "fitted on a hospital's own labelled films (python -m core.calibrate), for the target it names",
}
TITLES = {"run": "run's own", "rule-out": "rule-out", "balanced": "balanced", "site": "site profile"}


class SiteError(ValueError):
    """A site profile that cannot be used (unreadable, malformed, or made for another model), or a
    site whose films cannot support the asked target. One sentence naming the file and reason."""


@dataclass(frozen=True)
class Point:
    """One operating point: call COVID-19 when the (recalibrated) P(covid) >= ``threshold``."""

    name: str  # "run", "rule-out", "balanced" or "site"
    threshold: float
    meaning: str  # one sentence: what the point trades
    chosen_on: str  # where it was chosen (rows, target, n)
    recalibration: dict | None = None  # {"method": "platt", "a", "b"} on the logit of P(covid); None = as is
    profile: dict | None = None  # the site profile (SITE.json) for name "site"

    @property
    def title(self) -> str:
        """How pages and reports name it."""
        if self.name == "site" and self.profile:
            return f"site profile {self.profile.get('site', '')}".strip()
        return TITLES.get(self.name, self.name)


@dataclass(frozen=True)
class Decision:
    """A call at an operating point: ``p`` (the model's P(covid)), ``p_used`` (after the point's
    recalibration), ``positive`` (``p_used >= threshold``), ``call`` and one ``sentence``."""

    point: Point
    p: float
    p_used: float
    positive: bool

    @property
    def call(self) -> str:
        """``covid`` or ``not covid`` (as :func:`core.report.decision`)."""
        return "covid" if self.positive else "not covid"

    @property
    def sentence(self) -> str:
        """Which operating point decided, and on what number."""
        shown = (f"P(covid) {self.p:.3f}, recalibrated for the site to {self.p_used:.3f}"
                 if self.point.recalibration else f"P(covid) {self.p:.3f}")
        return (f"{self.call} at the {self.point.title} operating point ({shown} vs. threshold "
                f"{self.point.threshold:.3f}; {self.point.chosen_on})")


# ----------------------------------------------------------------------------- probabilities


def logit(p) -> np.ndarray:
    """log(p / (1 - p)), clipped away from 0 and 1 so that saturated outputs stay finite."""
    q = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(q) - np.log1p(-q)


def recalibrate(p, recalibration: dict | None) -> np.ndarray:
    """P(covid) through a point's recalibration: ``sigmoid(a * logit(p) + b)`` for Platt; else ``p``."""
    p = np.asarray(p, np.float64)
    if not recalibration:
        return p
    z = float(recalibration["a"]) * logit(p) + float(recalibration["b"])
    return 1.0 / (1.0 + np.exp(-z))


def decide(p: float, point: Point) -> Decision:
    """The call on one film's P(covid) at ``point``."""
    used = float(recalibrate([p], point.recalibration)[0])
    return Decision(point=point, p=float(p), p_used=used, positive=bool(used >= point.threshold))


def apply(df: pd.DataFrame, point: Point, pcol: str = "p_covid") -> pd.DataFrame:
    """A copy of a predictions table with ``p_used`` (recalibrated P(covid)), ``threshold``,
    ``operating_point`` and ``covid_positive`` at ``point`` (a film marked ``withheld`` gets no call)."""
    out = df.copy()
    out["p_used"] = recalibrate(out[pcol].to_numpy(float), point.recalibration) if len(out) else []
    out["threshold"] = point.threshold
    out["operating_point"] = point.title
    called = (out["p_used"] >= point.threshold).astype("boolean")
    out["covid_positive"] = called.mask(out["withheld"].astype(bool)) if "withheld" in out.columns else called
    return out


# ----------------------------------------------------------------------------- the named points


def _y(val: pd.DataFrame) -> np.ndarray:
    return (val["label"].astype(str) == "covid").to_numpy(int)


def development_points(pred: pd.DataFrame) -> dict[str, Point]:
    """rule-out and balanced, chosen on the ``val`` rows (out-of-fold development data) of a
    predictions table; a point whose rows lack a class it needs is left out."""
    val = pred[pred["split"] == "val"]
    y, p = _y(val), val["p_covid"].to_numpy(float)
    out = {}
    for name, target, value in (("rule-out", "sensitivity", RULE_OUT_SENSITIVITY), ("balanced", "youden", 0.0)):
        try:
            thr = metrics.choose_threshold(y, p, target, value)
        except ValueError:
            continue
        at = metrics.at_threshold(y, p, thr)
        where = (f"chosen on {len(val)} out-of-fold development films: sensitivity {at['sensitivity']:.2f}, "
                 f"specificity {at['specificity']:.2f} there")
        out[name] = Point(name, float(thr), MEANING[name], where)
    return out


def operating_points(run) -> dict[str, Point]:
    """The run's named operating points: ``run`` (its own threshold, when it has one), ``rule-out``
    and ``balanced`` (:func:`development_points`, when its predictions.csv has val rows)."""
    run = runs.open_run(run)
    out = {}
    if run.threshold is not None:
        out["run"] = Point("run", float(run.threshold), MEANING["run"], run.threshold_source)
    try:
        pred = run.predictions()
    except runs.RunError:
        return out
    if "p_covid" in pred.columns:
        out.update(development_points(pred))
    return out


# ----------------------------------------------------------------------------- site profiles


def model_identity(run) -> str:
    """What a site profile is bound to: the run's ``model_sha256`` (config.json), else the sha256 of
    its model.keras."""
    run = runs.open_run(run)
    got = run.config.get("model_sha256")
    if isinstance(got, str) and got:
        return got
    return runs.sha256(run.file("model.keras")) if run.has("model.keras") else ""


def read_site(source, name: str | None = None) -> dict:
    """A site profile from a path or bytes (an upload); SiteError when it is not one."""
    label = name or (Path(source).name if isinstance(source, (str, Path)) else "site profile")
    try:
        text = Path(source).read_text(encoding="utf-8") if isinstance(source, (str, Path)) else bytes(source).decode()
        prof = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SiteError(f"site profile {label} cannot be read ({getattr(exc, 'strerror', None) or exc}).") from None
    if not isinstance(prof, dict) or prof.get("format") != SITE_FORMAT:
        raise SiteError(f"site profile {label} is not a site profile written by python -m core.calibrate.")
    thr = prof.get("threshold")
    if not isinstance(thr, (int, float)) or isinstance(thr, bool) or not math.isfinite(thr):
        raise SiteError(f"site profile {label} has no numeric threshold.")
    if not isinstance(prof.get("run"), dict) or not isinstance(prof.get("target", {}), dict):
        raise SiteError(f"site profile {label} lacks the run it was made for or its target.")
    rec = prof.get("recalibration")
    if rec is not None and not (isinstance(rec, dict) and all(isinstance(rec.get(k), (int, float)) for k in "ab")):
        raise SiteError(f"site profile {label} has a recalibration without numeric a and b.")
    return prof


def site_point(run, source, name: str | None = None) -> Point:
    """The operating point of a site profile (path or bytes) for ``run``; SiteError when the profile
    was made for another model."""
    prof = read_site(source, name)
    label = name or (Path(source).name if isinstance(source, (str, Path)) else "site profile")
    want, got = model_identity(run), prof.get("run", {}).get("model_sha256")
    if got != want:
        raise SiteError(f"site profile {label} was made for another model (sha256 {str(got)[:12]}, this run's "
                        f"is {want[:12]}); calibrate this run on the site's films instead.")
    where = (f"fitted on {prof.get('n', '?')} films of the site on {prof.get('date', '?')} for "
             f"{prof.get('target', {}).get('metric', '?')} >= {prof.get('target', {}).get('value', '?')}")
    return Point("site", float(prof["threshold"]), MEANING["site"], where, prof.get("recalibration"), prof)


def choose(run, choice: str | None = None, data: bytes | None = None) -> Point:
    """The operating point named by ``choice``: None or ``run`` (the run's own), ``rule-out``,
    ``balanced``, or a site profile (a path to SITE.json; ``data``: its bytes, e.g. an upload).
    SiteError when it is not available for this run."""
    if data is not None or (choice and choice not in NAMED):
        return site_point(run, choice if data is None else data, None if data is None else choice)
    key = choice or "run"
    run = runs.open_run(run)
    if key == "run" and run.threshold is not None:  # no need to read predictions.csv
        return Point("run", float(run.threshold), MEANING["run"], run.threshold_source)
    points = operating_points(run)
    if key not in points:
        raise SiteError(f"{run.label} has no {key!r} operating point "
                        "(it needs a metrics.json, or val rows of both classes in predictions.csv).")
    return points[key]


# ----------------------------------------------------------------------------- scoring a point


def scored(pred: pd.DataFrame, point: Point, n_boot: int = 1000, seed: int = metrics.SEED) -> dict:
    """Metrics of a predictions table's rows (``label``, ``p_covid``, ``patient_id``[, ``group``]) at
    ``point`` (its recalibration, then its threshold), with patient-bootstrap CIs
    (:func:`core.metrics.binary_metrics`), and which point it was."""
    groups = pred["group"] if "group" in pred.columns else pred["patient_id"]
    used = recalibrate(pred["p_covid"].to_numpy(float), point.recalibration)
    got = metrics.binary_metrics(_y(pred), used, point.threshold, groups.astype(object).to_numpy(), n_boot, seed)
    return {"operating_point": point.title, "threshold": point.threshold, "chosen_on": point.chosen_on,
            "recalibrated": point.recalibration is not None, **got}


def format_scored(block: dict) -> str:
    """One line per headline metric of :func:`scored`."""
    lines = [f"At the {block['operating_point']} operating point (threshold {block['threshold']:.4f}"
             f"{' on the recalibrated P(covid)' if block['recalibrated'] else ''}; {block['chosen_on']}), "
             f"n={block['n']}:"]
    lines += [f"  {m:<12} {metrics.fmt(block[m], reason=True)}" for m in ("sensitivity", "specificity", "ppv", "npv")]
    return "\n".join(lines)
