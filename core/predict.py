"""Batch prediction: ``python -m core.predict IMAGE_OR_DIR... [--run R] [--csv OUT] [--json]``.

Images are decoded by :func:`core.images.load` at the model's input size; bad files are reported
(on stderr, and under ``errors`` in the JSON) and skipped. The column ``p_covid`` is always
P(COVID-19), class index ``config.COVID_INDEX`` of the softmax (the original project reported
P(normal) under a COVID-19 label). When the run has a metrics.json, its validation-chosen
threshold gives the ``prediction`` column.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from core import config, images, runs

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


def expand(inputs) -> list[Path]:
    """Files named, plus image files (by suffix) found recursively in named folders, sorted."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)  # missing or odd files are reported by the decoder
    return out


def predict_paths(model, paths, size: int | None = None, classes=None, batch_size: int = 32):
    """Predict images from files.

    Returns ``(DataFrame, errors)``: one row per readable image with ``path`` and ``p_<class>``
    for each class (``p_covid`` = P(COVID-19)) and ``predicted`` (arg-max class), and one
    :class:`core.images.ImageError` per file that could not be used.
    """
    from core import model as model_lib

    size = size or model_lib.input_size(model)
    n_out = int(model.output_shape[-1])
    classes = list(classes or config.classes("binary" if n_out == 2 else "multiclass"))
    paths = [str(p) for p in paths]
    rows, errors = [], []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        arr, kept, errs = images.load_many(chunk, size)
        errors.extend(errs)
        if not kept:
            continue
        probs = model_lib.probabilities(model, arr, batch_size=batch_size)
        for j, k in enumerate(kept):
            row = {"path": chunk[k]}
            row.update({f"p_{c}": float(probs[j, i]) for i, c in enumerate(classes)})
            row["predicted"] = classes[int(np.argmax(probs[j]))]
            rows.append(row)
    cols = ["path"] + [f"p_{c}" for c in classes] + ["predicted"]
    return pd.DataFrame(rows, columns=cols), errors


def run_threshold(run) -> float | None:
    """The run's validation-chosen decision threshold on P(covid), if it has metrics.json."""
    try:
        thr = runs.read_metrics(run).get("threshold")
    except runs.RunError:
        return None
    if isinstance(thr, dict):
        thr = thr.get("value")
    return float(thr) if isinstance(thr, (int, float)) else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m core.predict",
        description="Predict P(COVID-19) for chest X-ray files or folders (PNG, JPEG, DICOM). "
        "Bad files are reported and skipped.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--run", help="run folder (default: the shipped model in assets/model)")
    p.add_argument("--data", help="unused; accepted for symmetry with the other CLIs")
    p.add_argument("--csv", metavar="OUT", help="also write the table to this CSV file")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    a = p.parse_args(argv)
    try:
        run = runs.resolve_run(a.run)
        cfg = runs.read_config(run)
        model = runs.load_model(run)
    except runs.RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    classes = cfg.get("classes") or config.classes(cfg.get("task", "binary"))
    paths = expand(a.inputs)
    df, errors = predict_paths(model, paths, int(cfg.get("size") or 0) or None, classes, a.batch_size)
    thr = run_threshold(run)
    if thr is not None and len(df):
        df["threshold"] = thr
        df["covid_positive"] = df["p_covid"] >= thr
    for err in errors:
        print(f"skipped {err.name}: {err.reason}", file=sys.stderr)
    if a.csv:
        runs.write_csv(a.csv, df)
    if a.json:
        out = {
            "run": str(run),
            "threshold": thr,
            "n": len(df),
            "predictions": json.loads(df.to_json(orient="records")),
            "errors": [{"path": e.name, "reason": e.reason} for e in errors],
        }
        print(json.dumps(out))
    else:
        with pd.option_context("display.max_rows", None, "display.width", 200):
            print(df.to_string(index=False) if len(df) else "no readable images")
    return 0 if len(df) or not paths else 1


if __name__ == "__main__":
    sys.exit(main())
