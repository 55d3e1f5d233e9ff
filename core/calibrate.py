"""Site calibration: a hospital's own operating point, fitted on its own labelled films.

``python -m core.calibrate --run RUN --data LOCAL (--target-sensitivity S | --target-specificity S)
--out SITE.json [--json]``

A model's ranking of films travels to a new hospital better than its threshold does (the
leave-one-source-out table: the development threshold calls most of a new hospital's normal films
COVID-19). This tool scores the site's labelled films (``LOCAL``: any data folder
:func:`core.datasets.load_table` reads, e.g. a ``manifest.csv``) with the run's model and fits:

- where both classes are present (at least :data:`MIN_RECALIBRATION` films of each), a Platt
  recalibration of P(covid) on its logit (``sigmoid(a * logit(p) + b)``, with Platt's soft targets
  so a small, perfectly separated site keeps a finite slope; a monotone map, so the ranking and
  AUC stay as they are; refused when the slope is not positive);
- the threshold on that probability that reaches the target on the site's films
  (:func:`core.metrics.choose_threshold`);
- patient-bootstrap 95% CIs of the sensitivity and specificity it gives on those films
  (:func:`core.metrics.bootstrap`, patients resampled). They describe the films it was fitted on,
  so they are the best case; ``tests/benchmarks/bench_site.py`` measures what the point gives on
  the rest of a held-out collection.

Too few films: fewer than :data:`MIN_FILMS` films of the target's class is refused
(:class:`core.operating.SiteError`): a proportion of fewer than 10 films has a 95% CI about
+-0.25 wide, so the target means nothing. With more, a warning is written when the CI of the
target's metric is wider than +-:data:`MAX_HALF_WIDTH` (for a sensitivity near 0.9 that takes
about 35-40 films of the class). The site's films should be films the run never saw.

SITE.json (plain JSON, :data:`core.operating.SITE_FORMAT`): ``run`` (path, name,
``model_sha256``), ``target``, ``threshold``, ``recalibration``, ``sensitivity`` /
``specificity`` with CIs, ``at_run_threshold`` (what the run's own threshold gives there), ``n``,
``n_per_class``, ``n_patients``, ``data``, ``date``, ``warnings``. It is applied by
``core.predict --site``, ``core.evaluate --site``, the case report and the dashboard's sidebar.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from core import config, datasets, metrics, operating, runs
from core.evaluate import jsonable
from core.operating import SiteError

MIN_FILMS = 10  # fewer films of the target's class: refused
MAX_HALF_WIDTH = 0.10  # a wider 95% CI of the target's metric: warned
MIN_RECALIBRATION = 5  # films of each class needed before the probability is recalibrated
CLASS_NAMES = {1: "COVID-19", 0: "non-COVID-19"}


def _half_width(d: dict) -> float:
    lo, hi = d.get("ci_low"), d.get("ci_high")
    if lo is None or hi is None or not np.isfinite(lo) or not np.isfinite(hi):
        return float("inf")
    return (hi - lo) / 2


def platt(d: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) of ``sigmoid(a * d + b)`` by Platt's own recipe: soft targets (N+ + 1) / (N+ + 2) and
    1 / (N- + 2) instead of 1 and 0, so that a small site whose films the model separates perfectly
    gets a finite slope (plain logistic regression would send it to infinity)."""
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    x = np.r_[d, d][:, None]
    lr = LogisticRegression(C=1e4).fit(x, np.r_[np.ones(len(d)), np.zeros(len(d))], sample_weight=np.r_[t, 1 - t])
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def fit_recalibration(y: np.ndarray, p: np.ndarray) -> tuple[dict | None, str | None]:
    """Platt on the logit of P(covid) when both classes have :data:`MIN_RECALIBRATION` films; else
    (None, why). A slope that is not positive (the model ranks the site's films backwards) is refused."""
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if min(n_pos, n_neg) < MIN_RECALIBRATION:
        return None, (f"P(covid) is not recalibrated: it needs at least {MIN_RECALIBRATION} films of each class "
                      f"(the site has {n_pos} COVID-19 and {n_neg} other films)")
    a, b = platt(operating.logit(p), y)
    if a <= 0:
        return None, (f"P(covid) is not recalibrated: on the site's films it ranks COVID-19 below the others "
                      f"(Platt slope {a:.2f})")
    return {"method": "platt", "a": a, "b": b, "on": "logit of P(covid)"}, None


def _check_enough(y: np.ndarray, target: str) -> int:
    """Refuse a target whose class has fewer than MIN_FILMS films; return that class (1 covid, 0 other)."""
    cls = 1 if target == "sensitivity" else 0
    n = int((y == cls).sum())
    if n < MIN_FILMS:
        raise SiteError(f"the site has {n} {CLASS_NAMES[cls]} film(s); a {target} target needs at least {MIN_FILMS} "
                        f"(with fewer, its 95% CI is wider than about +-0.25).")
    return cls


def fit_site(y, p, groups=None, target: str = "sensitivity", value: float = 0.9, threshold_run: float | None = None,
             n_boot: int = 1000, seed: int = config.SEED) -> dict:
    """The operating point of a site from its films' labels ``y`` (1 = covid), the run's P(covid) ``p``
    and patient ``groups``: ``{"target", "threshold", "recalibration", "sensitivity", "specificity",
    "at_run_threshold", "n", "n_per_class", "n_patients", "warnings"}``. SiteError when too few films."""
    if target not in ("sensitivity", "specificity"):
        raise ValueError(f"target must be sensitivity or specificity, not {target!r}")
    if not 0 < value < 1:
        raise ValueError(f"the target {target} must be between 0 and 1 (exclusive), got {value}")
    y, p = np.asarray(y, int), np.asarray(p, np.float64)
    cls = _check_enough(y, target)
    recal, why = fit_recalibration(y, p)
    used = operating.recalibrate(p, recal)
    thr = metrics.choose_threshold(y, used, target, value)
    got = metrics.bootstrap(y, used, groups, thr, ("sensitivity", "specificity"), n_boot, seed)
    warnings = [why] if why else []
    hw = _half_width(got[target])
    if hw > MAX_HALF_WIDTH:
        warnings.append(f"the 95% CI of the {target} is +-{hw:.2f} wide (more than +-{MAX_HALF_WIDTH:.2f}): "
                        f"{int((y == cls).sum())} {CLASS_NAMES[cls]} films are too few to pin it down; add more")
    other = "specificity" if target == "sensitivity" else "sensitivity"
    if int((y == 1 - cls).sum()) == 0:
        warnings.append(f"the site has no {CLASS_NAMES[1 - cls]} films: its {other} is not measured here")
    out = {"target": {"metric": target, "value": float(value)}, "threshold": float(thr), "recalibration": recal,
           "sensitivity": got["sensitivity"], "specificity": got["specificity"], "ci_half_width": hw,
           "n": len(y), "n_per_class": {"covid": int(y.sum()), "other": int(len(y) - y.sum())},
           "n_patients": metrics.group_codes(groups, len(y))[1], "warnings": warnings}
    if threshold_run is not None:
        at = metrics.at_threshold(y, p, threshold_run)
        out["at_run_threshold"] = {"threshold": threshold_run, "sensitivity": at["sensitivity"],
                                   "specificity": at["specificity"]}
    return out


def site_predictions(run, data, progress: bool = True) -> pd.DataFrame:
    """The site's labelled films (:func:`core.datasets.load_table`) scored by the run's model."""
    from core import (
        predict,  # lazy: core.predict pulls in TensorFlow; fit_site and the profile readers do not
    )

    run = runs.open_run(run)
    root = Path(data)
    table = datasets.load_table(root)
    if table.empty:
        raise SiteError(f"the data folder {root} holds no labelled film.")
    pred, errors = predict.predict_table(run, table, root, progress=progress)
    for err in errors:
        print(f"skipped {err.name}: {err.reason}", file=sys.stderr)
    return pred


def calibrate(run, data, target: str, value: float, n_boot: int = 1000, seed: int = config.SEED,
              progress: bool = True, site: str | None = None) -> dict:
    """The site profile (SITE.json's content) of ``run`` on the labelled films under ``data``."""
    run = runs.open_run(run)
    pred = site_predictions(run, data, progress)
    y = (pred["label"].astype(str) == "covid").to_numpy(int)
    prof = fit_site(y, pred[f"p_{run.positive}"].to_numpy(float), pred["patient_id"].to_numpy(object), target,
                    value, run.threshold, n_boot, seed)
    head = {"format": operating.SITE_FORMAT, "site": site or Path(data).resolve().name,
            "run": {"path": str(run.path), "name": run.name, "model_sha256": operating.model_identity(run)},
            "data": str(Path(data).resolve()), "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    return jsonable({**head, **prof})


def format_profile(prof: dict) -> str:
    """A few lines of text: the point, its CIs and the warnings."""
    t = prof["target"]
    lines = [f"site {prof['site']}: {prof['n']} films ({prof['n_per_class']['covid']} COVID-19, "
             f"{prof['n_per_class']['other']} other; {prof['n_patients']} patients)",
             f"target {t['metric']} >= {t['value']}: threshold {prof['threshold']:.4f} on "
             + ("the recalibrated P(covid)" if prof["recalibration"] else "P(covid)")]
    for m in ("sensitivity", "specificity"):
        lines.append(f"  {m:<12} {metrics.fmt(prof[m], reason=True)}")
    at = prof.get("at_run_threshold")
    if at:
        lines.append(f"  at the run's own threshold {at['threshold']:.4f}: sensitivity "
                     f"{_num(at['sensitivity'])}, specificity {_num(at['specificity'])}")
    lines += [f"WARNING: {w}" for w in prof["warnings"]]
    return "\n".join(lines)


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _pm(row: dict, col: str) -> str:
    m, sd = row.get(f"{col}_mean"), row.get(f"{col}_sd")
    return "-" if m is None else f"{m:.2f} ± {sd:.2f}"


def site_table(doc: dict) -> pd.DataFrame:
    """The measured table of ``tests/benchmarks/bench_site.py`` (``site_calibration.json``) in
    plain-words columns: per held-out source and number of site films k, sensitivity and
    specificity on the rest of the source at the site's point and at the run's own threshold
    (mean ± sd over the draws), the CI half-width on the site's films, and refused draws."""
    rows = []
    for r in doc.get("rows", []):
        rows.append({"held-out source": r["source"], "site films k": r["k"], "site target": r["target"],
                     "sensitivity, site point": _pm(r, "site_sensitivity"),
                     "specificity, site point": _pm(r, "site_specificity"),
                     "sensitivity, run's threshold": _pm(r, "run_sensitivity"),
                     "specificity, run's threshold": _pm(r, "run_specificity"),
                     "CI half-width on site films": _pm(r, "half_width"),
                     "refused draws": f"{r['refused']} of {r['draws']}"})
    return pd.DataFrame(rows)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m core.calibrate",
        description="Fit a site's own operating point on its labelled films: the threshold on P(covid) that reaches "
                    "the target there, a Platt recalibration of the probability when both classes are present, and "
                    "patient-bootstrap 95%% CIs of the sensitivity and specificity it gives. Refused when the "
                    f"target's class has fewer than {MIN_FILMS} films; a warning when its CI is wider than "
                    f"+-{MAX_HALF_WIDTH}. Apply the profile with core.predict --site, core.evaluate --site or "
                    "the dashboard's sidebar.")
    runs.add_run_argument(ap)
    ap.add_argument("--data", required=True, help="the site's labelled films: a data folder core.datasets reads "
                    "(e.g. a manifest.csv with path,label[,patient_id]); films the run never saw")
    goal = ap.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-sensitivity", type=float, metavar="S", help="reach this sensitivity on the "
                      "site's COVID-19 films (e.g. 0.9)")
    goal.add_argument("--target-specificity", type=float, metavar="S", help="reach this specificity on the "
                      "site's other films (a site with normal films only can set only this)")
    ap.add_argument("--out", required=True, help="where to write SITE.json")
    ap.add_argument("--site", help="the site's name in the profile (default: the data folder's name)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    ap.add_argument("--seed", type=int, default=config.SEED, help="bootstrap seed")
    ap.add_argument("--json", action="store_true", help="print the profile as one JSON object on stdout")
    return ap


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    target, value = (("sensitivity", a.target_sensitivity) if a.target_sensitivity is not None
                     else ("specificity", a.target_specificity))
    run = runs.open_for_cli(a.run, with_model=True)
    if run is None:
        return 2
    try:
        prof = calibrate(run, a.data, target, value, a.n_boot, a.seed, progress=not a.json and sys.stderr.isatty(),
                         site=a.site)
    except (SiteError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs.write_json(a.out, prof)
    print(json.dumps(prof, allow_nan=False) if a.json else format_profile(prof) + f"\nwritten to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
