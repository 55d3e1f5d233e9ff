"""Adopt a trained model: ``python -m core.adopt MODEL --data DIR --out RUN [options]``.

Turns someone else's Keras model (``.keras``, legacy ``.h5``, or a TensorFlow SavedModel folder)
into a run folder that every page and CLI of this project accepts (see ``ADOPT`` in README.md):
``model.keras`` takes raw grey films with the declared preprocessing inside (or, for a SavedModel,
``model_savedmodel/`` and ``"blackbox": true``), ``config.json`` with an ``adopted`` block,
``predictions.csv`` (every film of the data root that the model did not train on), ``metrics.json``
(core.evaluate: patient-bootstrap CIs, at 0.5 or ``--threshold``, never a threshold tuned on the
films it reports), ``split.csv`` when ``--trained-on`` names its training films, ``history.csv``
from ``--history``.

Scoring streams the films in batches through :func:`core.predict.prepared_batches` (bounded
memory) in chunks of ``--chunk`` films; each chunk's scores are written atomically into
``RUN/.adopt-chunks/``, so a killed adoption continues with ``--resume`` and ``--shard I/N``
processes (cluster array jobs sharing RUN) each score their part of the chunks; whoever finds
every chunk done writes predictions.csv and metrics.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from core import adopt_load as al
from core import config, datasets, evaluate, predict, runs
from core import model as model_lib
from core.unseen import unseen_images

CHUNKS = ".adopt-chunks"  # inside the run: plan.csv and one chunk-<k>.csv per scored chunk
SETUP = ".adopt-setup"  # made (os.mkdir, atomic) by the one process that writes model and config
DEFAULT_CHUNK = 512


# --------------------------------------------------------------------------- the model


def _output_choice(outputs: list[str], classes, output, output_index):
    """``(output, unit)`` from ``--output``/``--output-index``: an output of a many-output model,
    else a unit of a multi-label output (by index, or by its name in ``--classes``)."""
    if output is not None:
        if output in outputs:
            return output, None
        if classes and output in classes:
            return None, list(classes).index(output)
        raise al.AdoptError(f"--output {output!r} is neither an output of the model ({', '.join(outputs)}) "
                            "nor a name in --classes.")
    if output_index is not None and len(outputs) > 1:
        return int(output_index), None
    return None, output_index


def _blackbox_activation(path, key_hint, size_hint) -> str:
    """softmax when the SavedModel's many-unit output sums to 1 on a test film, else sigmoid."""
    import tensorflow as tf  # lazy: only a SavedModel needs its signature called here

    shape, outs = al.signature(path)
    sig = tf.saved_model.load(str(path)).signatures["serving_default"]
    h, w = shape[0] or size_hint or 224, shape[1] or size_hint or 224
    got = sig(tf.random.uniform((2, h, w, shape[2]), 0.0, 1.0, seed=config.SEED))
    key = key_hint if key_hint in got else sorted(got)[0]
    sums = np.asarray(got[key]).sum(axis=-1)
    return "softmax" if np.allclose(sums, 1.0, atol=1e-3) else "sigmoid"


def build_model(source, spec: dict, size=None, classes=None, output=None, output_index=None,
                trust_code: bool = False, code=None):
    """``(wrapper, info, format, scan)`` for a source model file or SavedModel folder."""
    if code and not trust_code:
        raise al.AdoptError("--code runs a Python file: pass --trust-code with it.")
    if code:
        al.import_code(code)
    model, fmt, found = al.load_source(source, trust_code)
    if fmt == "savedmodel":
        _, outs = al.signature(source)
        out, unit = _output_choice(sorted(outs), classes, output, output_index)
        key = out if isinstance(out, str) else sorted(outs)[out or 0]
        act = _blackbox_activation(source, key, size) if outs[key] > 1 else "sigmoid"
        wrapper, info = al.blackbox_model(source, spec, size, out, unit, act)
    else:
        names = [al.producer(model, t).name for t in model.outputs]
        out, unit = _output_choice(names, classes, output, output_index)
        wrapper, info = al.wrap(model, spec, size, out, unit)
    info["unit"] = unit
    return wrapper, info, fmt, found


def class_names(info: dict, classes, positive_labels) -> tuple[list[str], str]:
    """The wrapper's class names and the positive class (whose P the pages and metrics read)."""
    labels = [p.strip() for p in positive_labels if p.strip()]
    if classes and len(set(classes)) != len(classes):
        raise al.AdoptError(f"--classes {','.join(classes)} names a class twice.")
    if info["activation"] == "sigmoid":
        unit = info.get("unit")
        if classes and len(classes) == info["n_units"] and info["n_units"] > 1:
            name = classes[unit or 0]
        else:
            name = classes[0] if classes else labels[0]
        return [name, "other" if name != "other" else "not_other"], name
    if not classes or len(classes) != info["n_units"]:
        raise al.AdoptError(f"the model's output {info['output']!r} is a softmax over {info['n_units']} classes: "
                            f"name them in order with --classes a,b,... ({info['n_units']} names).")
    hits = [c for c in classes if c.lower() in {lbl.lower() for lbl in labels}]
    if not hits:
        raise al.AdoptError(f"none of --classes {','.join(classes)} is among the positive labels "
                            f"({','.join(labels)}): name the positive class in --positive.")
    return list(classes), hits[0]


def source_sha256(path) -> str:
    """sha256 of a model file, or of a SavedModel folder's files (paths and bytes, in order)."""
    p = Path(path)
    if p.is_file():
        return runs.sha256(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(p).as_posix()}\0{runs.sha256(f)}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- the films


def read_trained_on(manifest, root: Path, table: pd.DataFrame) -> pd.DataFrame:
    """The films a model was trained on, as a split table (``split`` = train) of paths under ``root``.

    MANIFEST is a CSV with ``path`` (absolute, or relative to the data root or to the manifest's
    folder) and optionally ``patient_id``, ``source``, ``label``; for films found in the data root's
    table its values are used (the patient ids the exclusions compare), the manifest's elsewhere.
    """
    m = pd.read_csv(manifest, dtype=str)
    if "path" not in m.columns:
        raise al.AdoptError(f"--trained-on {manifest}: needs a 'path' column.")
    here = Path(manifest).resolve().parent

    def rel(p: str) -> str:
        q = Path(p)
        for cand in ([q] if q.is_absolute() else [root / q, here / q]):
            if cand.exists():
                try:
                    return cand.resolve().relative_to(root.resolve()).as_posix()
                except ValueError:
                    return str(cand.resolve())
        return p

    m["path"] = [rel(p) for p in m["path"]]
    known = table.set_index("path")
    for col in ("patient_id", "source", "label"):
        given = m[col] if col in m.columns else pd.Series([None] * len(m))
        looked = m["path"].map(known[col]) if col in known.columns else None
        m[col] = looked.where(looked.notna(), given) if looked is not None else given  # the data root names ids
    m["split"] = "train"
    return m[["path", "split", "label", "source", "patient_id"]]


def film_table(root: Path) -> pd.DataFrame:
    """The data root's table (core.datasets); a folder in no known layout is an unlabelled archive:
    every image file under it, label ``unknown``, each film its own patient (``attrs["unlabelled"]``)."""
    try:
        return datasets.load_table(root)
    except ValueError:
        files = predict.expand([root])
        if not files:
            raise
    rel = [f.relative_to(root).as_posix() for f in files]
    table = pd.DataFrame({"path": rel, "label": "unknown", "source": root.name,
                          "patient_id": [f"{root.name}:{p}" for p in rel]})
    table.attrs["unlabelled"] = True
    return table


def _unlabelled_plan(table: pd.DataFrame, trained: pd.DataFrame | None) -> tuple[pd.DataFrame, dict]:
    """An unlabelled archive's films, less those listed in --trained-on (no patients to follow)."""
    listed = table["path"].isin(set(trained["path"])) if trained is not None else np.zeros(len(table), bool)
    out = table[~listed].reset_index(drop=True)
    out["group"] = out["patient_id"]
    return out, ({"listed in --trained-on": int(listed.sum())} if listed.any() else {})


def plan(run: Path, root: Path, trained: pd.DataFrame | None, progress: bool) -> tuple[pd.DataFrame, dict, dict]:
    """The films to score (sorted by path, with ``split`` and ``group``), the films left out by
    reason and the near-duplicates; split.csv is written first when the training films are known."""
    if trained is not None:
        runs.write_csv(run / "split.csv", trained)
    whole = film_table(root)
    if whole.attrs.get("unlabelled"):
        table, excluded = _unlabelled_plan(whole, trained)
    else:
        table, excluded = unseen_images(runs.open_run(run), root, progress=progress)
    table = table.sort_values("path", kind="stable").reset_index(drop=True)
    table["split"] = "test" if trained is not None else "external"
    extra = {"near_duplicates": table.attrs.get("near_duplicates", []), "unchecked": table.attrs.get("unchecked")}
    return table[["path", "label", "source", "patient_id", "group", "split"]], excluded, extra


def chunk_ranges(n: int, chunk: int) -> list[range]:
    """Row ranges of the chunks of a plan of ``n`` films."""
    return [range(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def my_chunks(n_chunks: int, part: tuple[int, int] | None) -> list[int]:
    """The chunk numbers of shard ``part`` = (I, N): the I-th of N contiguous parts."""
    if part is None:
        return list(range(n_chunks))
    i, n = part
    return list(range((i - 1) * n_chunks // n, i * n_chunks // n))


def _chunk_file(run: Path, k: int) -> Path:
    return run / CHUNKS / f"chunk-{k:06d}.csv"


def score_chunks(run: Path, model, table: pd.DataFrame, root: Path, classes, todo: list[int], chunk: int,
                 batch_size: int, progress: bool, workers: int | None = None) -> dict:
    """Score the chunks ``todo`` of the plan, one atomic chunk file each (rows that could not be
    decoded carry their ``error``); returns ``{"films", "seconds"}`` of this call."""
    ranges = chunk_ranges(len(table), chunk)
    paths = [str(datasets.abspath(root, table["path"][r])) for k in todo for r in ranges[k]]
    rows = [r for k in todo for r in ranges[k]]
    size = model_lib.input_size(model)
    bar = tqdm(total=len(paths), desc="adopting", unit="film", disable=not progress, file=sys.stderr)
    t0, done, left = time.perf_counter(), {}, [k for k in todo]
    for b, (idx, x, _, _, errs) in enumerate(predict.prepared_batches(paths, size, None, batch_size, workers)):
        if len(idx):
            probs = model_lib.probabilities(model, x, batch_size=batch_size)
            done.update({rows[i]: p for i, p in zip(idx, probs, strict=True)})
        # the batch's films that are not in ``idx`` failed, in order, one error each
        failed = sorted(set(range(b * batch_size, min((b + 1) * batch_size, len(paths)))) - set(idx))
        done.update({rows[i]: e.reason for i, e in zip(failed, errs, strict=True)})
        bar.update(len(idx) + len(errs))
        while left and all(r in done for r in ranges[left[0]]):
            _write_chunk(run, left[0], ranges[left.pop(0)], done, classes)
    bar.close()
    return {"films": len(paths), "seconds": time.perf_counter() - t0}


def _write_chunk(run: Path, k: int, rng: range, done: dict, classes) -> None:
    """One chunk file: ``row``, ``error`` ('' when scored) and ``p_<class>``; its rows leave ``done``."""
    got = [done.pop(r) for r in rng]
    out = pd.DataFrame({"row": list(rng), "error": [g if isinstance(g, str) else "" for g in got]})
    for j, c in enumerate(classes):
        out[f"p_{c}"] = [np.nan if isinstance(g, str) else float(g[j]) for g in got]
    runs.write_csv(_chunk_file(run, k), out)


def assemble(run: Path) -> pd.DataFrame | None:
    """predictions.csv from the plan and the chunk files, when every chunk is done (else None).

    Returns the errors table (``path``, ``reason``) of films that could not be decoded.
    """
    plan_df = pd.read_csv(run / CHUNKS / "plan.csv", dtype={"patient_id": str, "path": str, "group": str})
    chunk = int(runs.read_config(run)["adopted"]["chunk"])
    files = [_chunk_file(run, k) for k in range(len(chunk_ranges(len(plan_df), chunk)))]
    if not all(f.is_file() for f in files):
        return None
    scores = pd.concat([pd.read_csv(f, keep_default_na=False, na_values=[""]) for f in files], ignore_index=True)
    scores["error"] = scores["error"].fillna("").astype(str)
    bad = scores["error"] != ""
    ok = scores[~bad]
    pred = plan_df.iloc[ok["row"].to_numpy()].reset_index(drop=True)
    for c in [c for c in scores.columns if c.startswith("p_")]:
        pred[c] = ok[c].to_numpy(float)
    runs.write_csv(run / "predictions.csv", pred)
    return pd.DataFrame({"path": plan_df["path"].iloc[scores.loc[bad, "row"].to_numpy()].to_numpy(),
                         "reason": scores.loc[bad, "error"].to_numpy()})


# --------------------------------------------------------------------------- the run


def _config(args, info: dict, fmt: str, found: dict, classes, positive, root: Path, model_path) -> dict:
    source = Path(args.model)
    unit = info.get("unit")
    return {
        "name": source.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "classes": classes, "positive": positive, "size": info["size"], "channels": info["channels"],
        "task": "binary" if len(classes) == 2 else "multiclass", "lung_crop": None,
        "model_sha256": runs.sha256(model_path) if model_path else None,
        "data_root": str(root),
        "adopted": {
            "source": source.name, "source_path": str(source.resolve()), "format": fmt,
            "source_sha256": source_sha256(source),
            "output": info["output"] if unit is None else {"output": info["output"], "unit": unit},
            "activation": info["activation"], "logits": info["logits"],
            "preprocess": al.preprocess_spec(args.preprocess),
            "positive_labels": args.positive, "trained_on": str(Path(args.trained_on).resolve()) if args.trained_on else None,
            "threshold": args.threshold, "blackbox": fmt == "savedmodel",
            "penultimate": None if fmt == "savedmodel" else "adopted",
            "trust_code": bool(args.trust_code), "code": str(Path(args.code).resolve()) if args.code else None,
            "found_code": found, "chunk": args.chunk, "batch_size": args.batch_size,
        },
    }


def setup(run: Path, args, wrapper, info, fmt, found, classes, positive, root: Path, progress: bool) -> None:
    """Write model, config, env, split and the plan of a new adoption (one process does this)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / CHUNKS).mkdir(exist_ok=True)
    model_path = None
    if fmt == "savedmodel":
        dest = run / "model_savedmodel"
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(args.model, dest)
    else:
        model_path = runs.atomic_save_model(wrapper, run / "model.keras")
    if args.history:
        hist = pd.read_csv(args.history)
        if "epoch" not in hist.columns:
            raise al.AdoptError(f"--history {args.history}: not a Keras CSVLogger file (no 'epoch' column).")
        runs.write_csv(run / "history.csv", hist)
    runs.write_json(run / "env.json", runs.environment())
    runs.write_json(run / "config.json", _config(args, info, fmt, found, classes, positive, root, model_path))
    trained = read_trained_on(args.trained_on, root, film_table(root)) if args.trained_on else None
    todo, excluded, extra = plan(run, root, trained, progress)
    runs.write_json(run / CHUNKS / "excluded.json", {"excluded": excluded, **extra})
    runs.write_csv(run / CHUNKS / "plan.csv", todo)  # written last: its presence means setup is done


def _claim_setup(run: Path, resume: bool) -> bool:
    """True for the one process that sets the run up (or redoes a setup that was killed, with
    ``resume``); False for the others (shards), which wait for its plan."""
    run.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(run / SETUP)
        return True
    except FileExistsError:
        return resume


def _wait_for_plan(run: Path, timeout: float = 3600.0) -> None:
    t0 = time.time()
    while not (run / CHUNKS / "plan.csv").is_file():
        if time.time() - t0 > timeout:
            raise al.AdoptError(f"{run}: no plan.csv after {timeout:.0f} s; is the process setting it up alive?")
        time.sleep(2.0)


def finish(run: Path, n_boot: int, seed: int) -> dict | None:
    """predictions.csv, metrics.json and adopt.json once every chunk is scored (else None)."""
    errors = assemble(run)
    if errors is None:
        return None
    metrics = evaluate.evaluate_run(run, None, n_boot=n_boot, write=True, seed=seed, progress=False)
    ex = json.loads((run / CHUNKS / "excluded.json").read_text())
    n_scored = len(pd.read_csv(run / "predictions.csv", usecols=["path"]))
    summary = {"run": str(run), "n_scored": n_scored, "n_labelled": int(metrics.get("n_test", 0)),
               "excluded": ex["excluded"],
               "near_duplicates": len(ex["near_duplicates"]), "unchecked": ex["unchecked"],
               "errors": errors.to_dict("records"), "threshold": metrics["threshold"]["value"],
               "threshold_source": metrics["threshold"].get("source"),
               "roc_auc": metrics.get("roc_auc"), "warnings": metrics.get("warnings", [])}
    runs.write_json(run / "adopt.json", summary)
    return summary


def adopt(args, progress: bool = False) -> dict:
    """The whole adoption of ``args`` (see :func:`parser`): set up (or resume) the run, score this
    process's chunks, and finish when all are done. Returns a summary dict."""
    run, root = Path(args.out).resolve(), config.data_dir(args.data)
    part = predict.parse_shard(args.shard) if args.shard else None
    if args.chunk % args.batch_size:
        raise al.AdoptError(f"--chunk {args.chunk} must be a multiple of --batch-size {args.batch_size}.")
    planned = (run / CHUNKS / "plan.csv").is_file()
    if planned and not (args.resume or part):
        raise al.AdoptError(f"{run} already holds an adoption: choose a new --out, or continue it with --resume.")
    if not planned:  # the model is checked before the run folder is touched
        wrapper, info, fmt, found = build_model(args.model, al.preprocess_spec(args.preprocess), args.size,
                                                args.classes, args.output, args.output_index, args.trust_code,
                                                args.code)
        classes, positive = class_names(info, args.classes, args.positive)
        planned = _claim_setup(run, args.resume)
        if planned:
            try:
                setup(run, args, wrapper, info, fmt, found, classes, positive, root, progress)
            except BaseException:
                shutil.rmtree(run / SETUP, ignore_errors=True)  # a later --resume sets it up again
                raise
    _wait_for_plan(run)
    recorded = runs.read_config(run)["adopted"]
    if recorded["source_sha256"] != source_sha256(args.model):
        raise al.AdoptError(f"{run} was adopted from another file than {args.model} (sha256 differs).")
    args.chunk, args.batch_size = recorded["chunk"], recorded["batch_size"]  # the batches of the first start
    handle = runs.open_run(run)
    table = pd.read_csv(run / CHUNKS / "plan.csv", dtype={"patient_id": str, "path": str, "group": str})
    n_chunks = len(chunk_ranges(len(table), args.chunk))
    todo = [k for k in my_chunks(n_chunks, part) if not _chunk_file(run, k).is_file()]
    speed = score_chunks(run, handle.model(), table, root, handle.classes, todo, args.chunk, args.batch_size,
                         progress, args.workers)
    summary = finish(run, args.n_boot, args.seed) or {"run": str(run), "finished": False,
                                                      "chunks_left": sum(not _chunk_file(run, k).is_file()
                                                                         for k in range(n_chunks))}
    summary.update(shard=args.shard, films_this_call=speed["films"],
                   films_per_s=speed["films"] / speed["seconds"] if speed["seconds"] > 0 else None)
    return summary


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m core.adopt``."""
    p = argparse.ArgumentParser(
        prog="python -m core.adopt",
        description="Turn a trained Keras model (.keras, Keras 2 .h5, or a SavedModel folder) into a run folder "
                    "that every page and CLI of this project accepts, scored on the films of --data.")
    p.add_argument("model", metavar="MODEL", help="the model file (.keras, .h5) or SavedModel folder")
    p.add_argument("--data", help="data root with the films to score (default: $CXR_DATA_DIR, else data/)")
    p.add_argument("--out", required=True, metavar="RUN", help="the run folder to write")
    p.add_argument("--preprocess", default="grey01", help=f"what the model expects: {', '.join(al.PREPROCESS)} "
                   "or a JSON spec file {scale, offset, per_image, mean, std} (default grey01)")
    p.add_argument("--size", type=int, help="side the films are resized to (default: the model's input size)")
    p.add_argument("--output", help="the output to read: an output name, or a unit's name in --classes")
    p.add_argument("--output-index", type=int, help="the output (several outputs) or unit (multi-label sigmoid)")
    p.add_argument("--classes", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                   help="names of the output's units in order (needed for a softmax over n)")
    p.add_argument("--positive", type=lambda s: [c.strip() for c in s.split(",") if c.strip()], default=["covid"],
                   help="data labels counted positive (default covid)")
    p.add_argument("--history", metavar="CSV", help="Keras CSVLogger file of its training (Training page)")
    p.add_argument("--trained-on", metavar="MANIFEST", help="CSV of the films it was trained on (path[,patient_id]):"
                   " those, their patients' films and near-duplicates are left out of the evaluation")
    p.add_argument("--threshold", type=float, help="decision threshold on P(positive) (default 0.5; none is tuned "
                   "on the films it reports)")
    p.add_argument("--trust-code", action="store_true", help="allow Lambda layers and custom objects (a model file is "
                   "code: only for files you trust)")
    p.add_argument("--code", metavar="FILE.py", help="with --trust-code: a Python file that registers custom objects")
    p.add_argument("--shard", metavar="I/N", help="score only part I of N of the chunks (processes sharing RUN)")
    p.add_argument("--resume", action="store_true", help="continue an adoption that was stopped")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="films per resumable chunk (multiple of batch)")
    p.add_argument("--workers", type=int, help="threads that decode films (default: CPU count)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the metrics")
    p.add_argument("--seed", type=int, default=config.SEED)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def main(argv=None) -> int:
    """Run :func:`adopt` from the command line; errors are one sentence on stderr (status 2)."""
    args = parser().parse_args(argv)
    if args.trust_code:  # the user trusts this file on the command line: so does this process when it reopens the run
        os.environ[al.TRUST_ENV] = "1"
    try:
        summary = adopt(args, progress=not args.json and sys.stderr.isatty())
    except (al.AdoptError, runs.RunError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(evaluate.jsonable(summary), allow_nan=False))
    elif summary.get("finished", True):
        auc = evaluate.metrics.fmt(summary["roc_auc"], digits=3) if summary["roc_auc"] else "none (no labels)"
        print(f"adopted {args.model} into {summary['run']}: {summary['n_scored']} films scored, excluded "
              f"{summary['excluded'] or 'none'}, {len(summary['errors'])} unreadable; AUC "
              f"{auc} at threshold {summary['threshold']:.2f} "
              f"({summary['threshold_source']}); {summary['films_per_s'] or 0:.1f} films/s")
        for w in summary["warnings"]:
            print("WARNING: " + w)
    else:
        print(f"scored part {args.shard} into {summary['run']}; {summary['chunks_left']} chunk(s) left to others")
    return 0


if __name__ == "__main__":
    sys.exit(main())
