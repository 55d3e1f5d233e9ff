"""Batch prediction: ``python -m core.predict IMAGE_OR_DIR... [--run R] [--csv OUT] [--shard I/N] [--json]``.

Films are decoded at the size the network needs (:func:`core.inputs.needed_side`), several at a
time in a thread pool, and prepared a batch at a time by :func:`core.inputs.prepare` (the run's lung
crop when it has one, the lung U-Net batched) while the network scores the previous batch; bad files are reported (on stderr, and under ``errors`` in the JSON) and skipped.
``--shard I/N`` keeps the I-th of N contiguous parts of the sorted file list (1 <= I <= N), cut
between batches, so that the N tasks of a cluster array job split a large archive and their CSVs,
concatenated in order I = 1..N (one header), are the CSV of the whole archive, bit for bit, when
every task uses the same ``--batch-size``. The column ``p_covid`` is always
P(COVID-19), class index ``config.COVID_INDEX`` of the softmax (the original project reported
P(normal) under a COVID-19 label). When the run has a metrics.json, its validation-chosen
threshold gives the ``prediction`` column.

Every film gets the dashboard's plausibility checks (:func:`core.checks.check_film`, in the
decoding threads, a few ms a film): a film that fails one (a photograph, a lateral view, an
all-black or all-white image...) is marked ``withheld`` with the ``reason``, and gets no
``covid_positive`` call; its probabilities stay in the table as the model's raw output. The
layout checks read the lungs' box when the run crops to the lungs, else the whole film.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from core import checks, config, datasets, images, inputs, lungs, operating, runs
from core import model as model_lib

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


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with 1 <= I <= N; ValueError otherwise."""
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard takes I/N, e.g. 2/8 (part 2 of 8); got {text!r}") from None
    if not 1 <= i <= n:
        raise ValueError(f"--shard {text}: parts are numbered 1..N, so I must be between 1 and {n}")
    return i, n


def shard(paths: list, i: int, n: int, batch_size: int = 1) -> list:
    """The ``i``-th (1-based) of ``n`` contiguous, near-equal parts of ``paths``, cut between
    batches of ``batch_size``: every film then meets the network in the same batch as in one
    unsharded run, so the parts' results are those of the whole, bit for bit."""
    batches = -(-len(paths) // batch_size)
    return paths[(i - 1) * batches // n * batch_size : i * batches // n * batch_size]


def _decode_one(path: str, need: int, check: bool):
    """``(film, bytes or None)`` of one file, decoded at the needed size, or its ImageError."""
    try:
        data, name = images.read_bytes(path, name=path)
        return images.decode(data, name, need=need), (data if check else None)
    except images.ImageError as err:
        return err


def _prepare_chunk(futures, size: int, lung_crop, lung_model, check: bool, pool):
    """One batch: its decoded films prepared together (:func:`core.inputs.prepare`: one batched call
    of the lung U-Net), then checked in the pool. ``(ok, x, fell_back, verdicts, errors)``."""
    done = [f.result() for f in futures]
    ok = [k for k, r in enumerate(done) if not isinstance(r, images.ImageError)]
    errors = [r for r in done if isinstance(r, images.ImageError)]
    films = [done[k][0] for k in ok]
    if ok:
        x, boxes, fell_back = inputs.prepare(films, size, lung_crop, lung_model)
    else:  # nothing decoded: no lung net or preparation to run
        x, boxes, fell_back = np.zeros((0, size, size), np.float32), np.zeros((0, 4)), np.zeros(0, bool)
    verdicts = [None] * len(ok)
    if check:
        # the layout checks read the lungs' box when there is one, else the whole film
        lung_boxes = [None if lung_crop is None or fb else tuple(b) for b, fb in zip(boxes, fell_back, strict=True)]
        verdicts = list(pool.map(checks.check_film, films, [done[k][1] for k in ok], [None] * len(ok), lung_boxes))
    return ok, x, fell_back, verdicts, errors


def prepared_batches(paths: list[str], size: int, lung_crop=None, batch_size: int = 32, workers: int | None = None,
                     check: bool = False):
    """Yield ``(indices, x, fell_back, verdicts, errors)`` per batch of ``paths``: films decoded at the
    needed size (:func:`core.inputs.needed_side`) in a pool of ``workers`` threads (default: the CPU
    count), then prepared a batch at a time (the lung U-Net batched) in a stage thread, one batch
    ahead of the caller, so that decoding overlaps the network and memory stays bounded.
    ``verdicts``: :func:`core.checks.check_film` per film with ``check``, else None each."""
    lung_model = None
    if lung_crop is not None:
        lung_model = lungs.lung_model()  # loaded once here, shared by the threads
    need = inputs.needed_side(size, lung_crop)
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool, ThreadPoolExecutor(1) as stage:
        ahead: collections.deque = collections.deque()

        def submit(start):
            chunk = range(start, min(start + batch_size, len(paths)))
            futures = [pool.submit(_decode_one, paths[k], need, check) for k in chunk]
            ahead.append((chunk, stage.submit(_prepare_chunk, futures, size, lung_crop, lung_model, check, pool)))

        starts = iter(range(0, len(paths), batch_size))
        for start in starts:
            submit(start)
            if len(ahead) == 2:
                break
        while ahead:
            chunk, future = ahead.popleft()
            nxt = next(starts, None)
            if nxt is not None:
                submit(nxt)
            ok, x, fell_back, verdicts, errors = future.result()
            yield [chunk[k] for k in ok], x, np.asarray(fell_back, bool), verdicts, errors


def predict_films(model, paths, size: int | None = None, batch_size: int = 32, lung_crop: dict | None = None,
                  workers: int | None = None, progress: bool = False, check: bool = False):
    """The one batch-prediction path: films from files, prepared through :mod:`core.inputs`
    (:func:`prepared_batches`), scored ``batch_size`` at a time.

    Returns ``(kept, probs, fell_back, errors, verdicts)``: the indices of ``paths`` that could be
    used, their class probabilities (len(kept), n_classes), whether the lung crop fell back for each,
    one :class:`core.images.ImageError` per file that could not be used, and per kept film its
    :func:`core.checks.check_film` verdict (with ``check``; else None). ``progress``: a bar on stderr.
    """
    size = size or model_lib.input_size(model)
    paths = [str(p) for p in paths]
    kept, probs, fell_back, errors, verdicts = [], [], [], [], []
    bar = tqdm(total=len(paths), desc="predicting", unit="film", disable=not progress, file=sys.stderr)
    for idx, x, fb, vs, errs in prepared_batches(paths, size, lung_crop, batch_size, workers, check):
        bar.update(len(idx) + len(errs))
        errors.extend(errs)
        if idx:
            kept.extend(idx)
            verdicts.extend(vs)
            probs.append(model_lib.probabilities(model, x, batch_size=batch_size))
            fell_back.append(fb)
    bar.close()
    n_out = int(model.output_shape[-1])
    probs_all = np.concatenate(probs) if probs else np.zeros((0, n_out), np.float32)
    return kept, probs_all, (np.concatenate(fell_back) if fell_back else np.zeros(0, bool)), errors, verdicts


def predict_paths(model, paths, size: int | None = None, classes=None, batch_size: int = 32,
                  lung_crop: dict | None = None, workers: int | None = None, progress: bool = False,
                  check: bool = True):
    """Predict films from files (:func:`predict_films`; ``lung_crop``: the run's setting, see
    :func:`core.inputs.settings`; ``None`` = whole film).

    Returns ``(DataFrame, errors)``: one row per readable image, in the order of ``paths``, with
    ``path`` and ``p_<class>`` for each class (``p_covid`` = P(COVID-19)), ``predicted`` (arg-max
    class), with a lung crop ``fell_back`` (no lungs found: the whole film was used), and with
    ``check`` ``withheld``/``reason`` (:func:`core.checks.check_film`: the film failed a plausibility
    check, so its answer means little); and one :class:`core.images.ImageError` per file that could
    not be used. ``progress``: a bar on stderr.
    """
    n_out = int(model.output_shape[-1])
    classes = list(classes or config.classes("binary" if n_out == 2 else "multiclass"))
    paths = [str(p) for p in paths]
    kept, probs, fell_back, errors, verdicts = predict_films(model, paths, size, batch_size, lung_crop, workers,
                                                             progress, check)
    df = pd.DataFrame({"path": [paths[k] for k in kept]})
    for i, c in enumerate(classes):
        df[f"p_{c}"] = probs[:, i].astype(float)
    df["predicted"] = [classes[int(i)] for i in np.argmax(probs, axis=1)] if len(probs) else []
    if lung_crop is not None:
        df["fell_back"] = fell_back.astype(bool)
    if check:
        df["withheld"] = [v.withheld for v in verdicts] if len(df) else []
        df["reason"] = [v.reason or "" for v in verdicts] if len(df) else []
    return df, errors


def predict_table(run, table: pd.DataFrame, root, progress: bool = True):
    """Predict every image of a data table (``path`` relative to ``root``) with ``run``'s model,
    prepared as its network expects; returns ``(predictions, errors)``: the table's ``path``,
    ``source``, ``patient_id``, ``group``, ``label``, ``class`` (the run's task), ``split`` =
    ``external`` and ``p_<class>`` per class, one row per readable image."""
    run = runs.open_run(run)
    paths = [datasets.abspath(root, p) for p in table["path"]]
    kept, probs, _, errors, _ = predict_films(run.model(), paths, run.size, lung_crop=run.lung_crop,
                                              progress=progress)
    rows = table.iloc[kept].reset_index(drop=True)
    task = "binary" if list(run.classes) == list(config.TASKS["binary"]) else "multiclass"
    pred = pd.DataFrame({
        "path": rows["path"], "source": rows["source"], "patient_id": rows["patient_id"],
        "group": rows["group"] if "group" in rows.columns else rows["patient_id"], "label": rows["label"],
        "class": [config.label_to_class(lbl, task) for lbl in rows["label"]],
        "split": "external",
    })
    for i, c in enumerate(run.classes):
        pred[f"p_{c}"] = probs[:, i] if len(probs) else []
    return pred, errors


def _operating_point(run: runs.Run, site: str | None):
    """The point that turns P(covid) into a call (core.operating): the site profile's, else the run's
    own; None without either; False after printing why a site profile cannot be used."""
    try:
        return operating.choose(run, site) if site or run.threshold is not None else None
    except operating.SiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m core.predict",
        description="Predict P(COVID-19) for chest X-ray files or folders (PNG, JPEG, DICOM). "
        "Bad files are reported and skipped.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    runs.add_run_argument(p)
    p.add_argument("--data", help="unused; accepted for symmetry with the other CLIs")
    p.add_argument("--csv", metavar="OUT", help="also write the table to this CSV file")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard", metavar="I/N", help="only the I-th of N contiguous parts of the sorted file list "
                   "(1 <= I <= N; for cluster array jobs: with one --batch-size for all parts, their CSVs "
                   "concatenate to the whole archive's)")
    p.add_argument("--workers", type=int, help="threads that decode and prepare films (default: CPU count)")
    p.add_argument("--site", metavar="SITE.json", help="decide at a site's operating point (python -m core.calibrate; "
                   "its threshold and recalibration) instead of the run's own")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    a = p.parse_args(argv)
    try:
        part = parse_shard(a.shard) if a.shard else None
    except ValueError as exc:
        p.error(str(exc))
    run = runs.open_for_cli(a.run, with_model=True)
    point = _operating_point(run, a.site) if run is not None else None
    if run is None or point is False:
        return 2
    paths = expand(a.inputs)
    if part:
        paths = shard(paths, *part, batch_size=a.batch_size)
    crop = run.lung_crop
    df, errors = predict_paths(run.model(), paths, run.size, run.classes, a.batch_size, crop, a.workers,
                               progress=sys.stderr.isatty())
    if point is not None and len(df):
        # no call for a film that failed a plausibility check (pandas' nullable boolean: <NA>)
        df = operating.apply(df, point, f"p_{run.positive}")
    for err in errors:
        print(f"skipped {err.name}: {err.reason}", file=sys.stderr)
    if len(df) and df["withheld"].any():
        print(f"{int(df['withheld'].sum())} film(s) with withheld=True: {checks.WITHHELD} (see the reason column)",
              file=sys.stderr)
    if crop is not None and len(df) and df["fell_back"].any():
        print(f"{int(df['fell_back'].sum())} film(s) with fell_back=True: {inputs.FALLBACK_WARNING}", file=sys.stderr)
    if a.csv:
        runs.write_csv(a.csv, df)
    if a.json:
        out = {
            "run": str(run.path),
            "threshold": point and point.threshold, "operating_point": point and point.title,
            "n": len(df),
            "n_withheld": int(df["withheld"].sum()) if len(df) else 0,
            "shard": a.shard,
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
