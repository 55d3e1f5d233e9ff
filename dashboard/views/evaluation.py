"""Evaluation: the shortcut-proof checks first, then curves, the live threshold and per-source metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core import evaluate, metrics, runs
from core.crossval import table_rows as crossval_table
from core.metrics import fmt
from dashboard import components, state

st.title("Evaluation")
run = state.require_run()
st.caption(f"Run: {components.plain(state.run_label(str(run)))}. All numbers are on the run's held-out test split "
           "(patients never seen in training); 95 % CIs resample patients.")

try:
    m = state.run_metrics(run)
    pred = state.run_predictions(run)
except runs.RunError as exc:
    st.error(components.plain(state.error_sentence(exc)) + " Run `python -m core.evaluate --run RUN` to write it.")
    st.stop()


# ------------------------------------------------------------------ the headline: unseen collections
st.subheader("On collections it never saw (leave-one-source-out)")
try:
    cv = state.run_crossval(run)
except runs.RunError:
    cv = None
if cv is None and state.run_handle(run).adopted:
    st.info("No leave-one-source-out table for an adopted run, because that table retrains the recipe once per "
            "collection left out, and an adopted model comes without a recipe this tool can retrain. Its "
            "figures below are on the films it was adopted on, at the threshold it was given (or 0.5).")
elif cv is None:
    st.info("This run has no leave-one-source-out table (crossval.json). Make one for its recipe with "
            "`python -m core.crossval --data DIR` and copy its crossval.json into the run folder.")
else:
    st.dataframe(crossval_table(cv), hide_index=True, key="eval_crossval")
    worst = cv.get("worst_roc_auc")
    if worst is not None:
        st.caption(
            f"The recipe was trained once per row with that collection left out entirely; each row is "
            f"judged at the threshold its run chose on its own out-of-fold predictions. Mean AUC "
            f"{cv.get('mean_roc_auc', float('nan')):.2f}, worst {worst:.2f} ({cv.get('worst_source')}). "
            "This, not the internal test below, is what to expect on a new hospital's films.")
components.site_calibration_table(run)

# ------------------------------------------------------------------ the checks that matter
st.subheader("Does it detect COVID-19, or the collection an image came from?")
within = m.get("within_source") or {}
external = m.get("external")
# Seed spread: stored by the trainer/evaluator when several seeds were run, else from sibling runs
# (same training settings, different seed) under the runs folder.
spread = m.get("seed_spread") or m.get("spread")
seeds = state.seed_runs(run)
if not spread and len(seeds) > 1:
    spread = evaluate.seed_spread([state.run_metrics(Path(r)) for r in seeds["run"]])
if not (isinstance(spread, dict) and "roc_auc" in spread):
    spread = None

cards = [("Internal test ROC AUC", fmt(m.get("roc_auc")), f"{m.get('n_test', '?')} images, all sources mixed")]
for source, w in within.items():
    cards.append((f"Within {source} ROC AUC", fmt(w.get("roc_auc")),
                  f"{w.get('n_covid', '?')} covid vs {w.get('n', 0) - w.get('n_covid', 0)} other, one source"))
if external:
    cards.append((f"Held-out {', '.join(external.get('sources', []))} ROC AUC", fmt(external.get("roc_auc")),
                  external.get("roc_auc_definition", "sources never seen in training")))
if spread:
    r = spread["roc_auc"]
    cards.append((f"ROC AUC across {r.get('n')} seeds", f"{r.get('mean', float('nan')):.2f} ± {r.get('sd', float('nan')):.2f}",
                  "mean ± sd of the internal test AUC over runs that differ only in their seed"))
cols = st.columns(len(cards))
for col, (label, value, help_) in zip(cols, cards, strict=False):
    col.metric(label, value, help=help_)
if not within:
    st.warning("No test source holds both covid and other images, so the source shortcut cannot be checked "
               "within a source on these data.")
for w in m.get("warnings", []):
    st.warning(components.plain(w))
if spread:
    parts = [f"within {s_} {w_.get('mean', float('nan')):.2f} ± {w_.get('sd', float('nan')):.2f}"
             for s_, w_ in (spread.get("within_source_roc_auc") or {}).items()]
    if parts:
        st.caption("Within-source ROC AUC across seeds (mean ± sd): " + "; ".join(parts) + ".")
    if len(seeds) > 1:
        with st.expander(f"The {len(seeds)} runs of this configuration"):
            st.dataframe(seeds.assign(run=seeds["run"].map(state.run_label)), hide_index=True, key="eval_seeds")
else:
    st.caption("Only one seed of this configuration is in the runs folder, so its spread across seeds is not "
               "shown here (assets/MODEL_CARD.md gives the shipped recipe's, over seeds, for the table above); "
               "train more with `python -m core.train --seed N`.")

# ------------------------------------------------------------------ live threshold
test = pred[pred["split"] == "test"]
if test.empty or "p_covid" not in test.columns:
    st.info("This run's predictions.csv has no test rows with p_covid, so there is nothing more to show.")
    st.stop()
y = (test["label"].astype(str) == "covid").to_numpy(int)
p = test["p_covid"].to_numpy(float)
thr_op = state.threshold(run)
thr_op = 0.5 if thr_op is None else thr_op

st.subheader("Operating point")
c1, c2 = st.columns([2, 1])
t = c1.slider("Threshold on P(covid)", 0.0, 1.0, float(round(thr_op, 3)), 0.001, format="%.3f", key="eval_thr",
              help="The run's operating point was chosen on held-out development data (out-of-fold predictions; target sensitivity); moving it "
                   "here shows the trade-off on the test split, it does not re-tune the model.")
sample_prev = float(y.mean()) if len(y) else 0.5
prev = c2.number_input("Prevalence of COVID-19 among those tested", 0.001, 0.999,
                       float(round(min(max(sample_prev, 0.001), 0.999), 3)), 0.01, format="%.3f", key="eval_prev",
                       help="PPV and NPV depend on how common the disease is; the test split's share is the default.")
at = metrics.at_threshold(y, p, t, prevalence=prev)
k = st.columns(4)
for col, name in zip(k, ("sensitivity", "specificity", "ppv", "npv"), strict=False):
    v = at[name]
    col.metric(name.upper() if len(name) == 3 else name.capitalize(), "n/a" if math.isnan(v) else f"{v:.3f}")
st.caption(f"At threshold {t:.3f}: TP {at['tp']}, FP {at['fp']}, TN {at['tn']}, FN {at['fn']} "
           f"(operating point {thr_op:.3f}; PPV/NPV at prevalence {prev:.3f}).")

# ------------------------------------------------------------------ curves
TITLE = dict(font=dict(size=13))
g1, g2, g3, g4 = st.columns(4)
cm = np.array([[at["tn"], at["fp"]], [at["fn"], at["tp"]]])
fig = go.Figure(go.Heatmap(z=cm, x=["pred. not covid", "pred. covid"], y=["not covid", "covid"],
                           text=cm, texttemplate="%{text}", colorscale="Blues", showscale=False))
fig.update_layout(title=dict(text="Confusion matrix (slider threshold)", **TITLE), height=330, margin=dict(l=10, r=10, t=40, b=10),
                  yaxis_title="true", yaxis_autorange="reversed")
g1.plotly_chart(fig, key="eval_cm")

op = metrics.at_threshold(y, p, thr_op)
roc = metrics.roc_points(y, p)
fig = go.Figure()
fig.add_trace(go.Scatter(x=roc["fpr"], y=roc["tpr"], mode="lines", name="ROC"))
fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="grey"), name="chance"))
fig.add_trace(go.Scatter(x=[1 - op["specificity"]], y=[op["sensitivity"]], mode="markers", name="operating point",
                         marker=dict(size=12, symbol="x", color="red")))
fig.add_trace(go.Scatter(x=[1 - at["specificity"]], y=[at["sensitivity"]], mode="markers", name="slider",
                         marker=dict(size=9, color="orange")))
fig.update_layout(title=dict(text=f"ROC, AUC {fmt(m.get('roc_auc'))}", **TITLE), xaxis_title="1 - specificity",
                  yaxis_title="sensitivity", height=330, margin=dict(l=10, r=10, t=40, b=10), showlegend=False)
g2.plotly_chart(fig, key="eval_roc")

pr = metrics.pr_points(y, p)
fig = go.Figure()
fig.add_trace(go.Scatter(x=pr["recall"], y=pr["precision"], mode="lines", name="PR"))
fig.add_trace(go.Scatter(x=[op["sensitivity"]], y=[op["sample_ppv"]], mode="markers", name="operating point",
                         marker=dict(size=12, symbol="x", color="red")))
fig.update_layout(title=dict(text=f"PR, AUC {fmt(m.get('pr_auc'))}", **TITLE), xaxis_title="recall (sensitivity)",
                  yaxis_title="precision (PPV, test prevalence)", height=330, margin=dict(l=10, r=10, t=40, b=10),
                  showlegend=False)
g3.plotly_chart(fig, key="eval_pr")

curve, ece, brier = metrics.calibration(y, p)
fig = go.Figure()
fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="grey"), name="perfect"))
fig.add_trace(go.Scatter(x=curve["mean_pred"], y=curve["frac_pos"], mode="lines+markers", name="model",
                         text=[f"n={n}" for n in curve["n"]]))
fig.update_layout(title=dict(text=f"Calibration, ECE {ece:.3f}, Brier {brier:.3f}", **TITLE), xaxis_title="mean predicted P(covid)",
                  yaxis_title="share covid", height=330, margin=dict(l=10, r=10, t=40, b=10), showlegend=False)
g4.plotly_chart(fig, key="eval_cal")

# ------------------------------------------------------------------ per source, external
st.subheader("Per source (at the operating point)")
rows = []
for source, b in (m.get("per_source") or {}).items():
    rows.append({"source": source, "n": b.get("n"), "covid": b.get("n_covid"),
                 **{k_: fmt(b.get(k_)) for k_ in ("roc_auc", "sensitivity", "specificity", "accuracy", "ppv", "npv")}})
if rows:
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="eval_sources")
    st.caption("A source with one class only has no AUC: its sensitivity or specificity says how that "
               "collection is treated, not how well COVID-19 is told apart.")

ext_files = sorted(run.glob("external-*.json"))
ext_files = [f for f in ext_files if not f.name.endswith("-predictions.json")]
if external or ext_files:
    st.subheader("External validation (data never used in training)")
    if external:
        st.write({k_: fmt(external.get(k_)) for k_ in ("roc_auc", "sensitivity", "specificity", "accuracy")
                  if k_ in external} | {"sources": ", ".join(external.get("sources", [])), "n": external.get("n")})
    for f in ext_files:
        try:
            e = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            st.warning(components.plain(f"{f.name} is unreadable."))
            continue
        st.markdown(f"**{components.plain(f.stem)}**")
        st.write({k_: fmt(e.get(k_)) for k_ in ("roc_auc", "sensitivity", "specificity", "accuracy") if k_ in e}
                 | {"n": e.get("n")})
        for w in e.get("warnings", []):
            st.warning(components.plain(w))
else:
    st.caption("No external validation yet: `python -m core.evaluate --run RUN --data OTHER_DATA` "
               "(or train with `--holdout-source`) adds one.")

if m.get("multiclass"):
    with st.expander("Multiclass metrics"):
        st.json(m["multiclass"], expanded=False)
