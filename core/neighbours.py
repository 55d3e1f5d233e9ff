"""The films a film most resembles, to the model: its nearest development films in the model's
penultimate-feature space (:func:`core.model.features`).

An example-based explanation: "the five films this one most resembles are all from one children's
hospital" says what a source probe AUC says, in a form a reader can check with their eyes.

The index is a plain NPZ in the run folder (:data:`INDEX_FILE`): the features of the run's
development films (predictions.csv rows that are neither ``test`` nor ``external``; an adopted run
has none, so its scored films stand in), standardised with their own mean and spread and scaled
to unit length, with each film's path relative to the data root, label, collection (``source``),
split and whether its label counts as the run's positive class. Paths only, never pixels.
Distance is the cosine distance (1 - cosine similarity, 0 = same direction, 2 = opposite) of
standardised features; with ~1-2k films a numpy product is enough (well under a millisecond).

The index is written by :func:`write_index` (``python -m core.neighbours build``, and
:mod:`core.feature_map` inside ``python -m core.audit``), and refused when it was made for
another model file.

CLI::

    python -m core.neighbours build [--run RUN] [--data DIR] [--json]
    python -m core.neighbours FILM [--run RUN] [--k 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from core import images, inputs, runs, safepath
from core import model as cmodel

INDEX_FILE = "neighbours.npz"
K = 5  # neighbours shown per film
MOST = 0.5  # a sentence when more than this share of the neighbours share a collection / disagree with the call
COLUMNS = ("path", "label", "source", "distance")
BATCH = 32  # films decoded and prepared at once (memory stays flat)


@dataclass(frozen=True)
class Index:
    """A loaded neighbour index: unit-length standardised features and what each film is."""

    unit: np.ndarray  # (n, d) float32
    mean: np.ndarray  # (d,) the development films' mean feature
    scale: np.ndarray  # (d,) their spread (standard deviation, floored)
    table: pd.DataFrame  # path, label, source, split, positive
    model_sha256: str


# --------------------------------------------------------------------------- features of many films
def film_features(run, table: pd.DataFrame, root, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features of the films named by ``table['path']`` (relative to ``root``), prepared
    as the run's network sees them (:func:`core.inputs.prepare`, its lung crop), BATCH at a time.

    Returns ``(features (m, d), kept)``: ``kept`` are the row positions that could be read; an
    unreadable film is reported on stderr and skipped. A model whose layers cannot be reached
    (a SavedModel signature) raises :class:`core.runs.RunError`.
    """
    run = runs.open_run(run)
    model = run.model()
    size = cmodel.input_size(model)
    layer = (run.adopted or {}).get("penultimate")
    paths = table["path"].astype(str).tolist()
    out, kept = [], []
    for start in tqdm(range(0, len(paths), BATCH), desc="features", disable=not progress, file=sys.stderr):
        films, idx = [], []
        for i in range(start, min(start + BATCH, len(paths))):
            try:
                films.append(images.decode(safepath.read_film(root, paths[i]), paths[i]))
                idx.append(i)
            except images.ImageError as exc:
                print(f"skipped {exc}", file=sys.stderr)
        if films:
            try:
                out.append(cmodel.features(model, inputs.prepare(films, size, run.lung_crop)[0], layer=layer))
            except ValueError as exc:  # a black box: no penultimate layer to read
                raise runs.RunError(f"{run.label}: no penultimate features ({exc})") from exc
            kept += idx
    if not kept:
        raise FileNotFoundError(f"none of the {len(paths)} films of {run.name} could be read under {root}")
    return np.concatenate(out).astype(np.float32), np.asarray(kept, int)


def standardise(features: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Features standardised with (mean, scale) and scaled to unit length, float32 (n, d)."""
    z = (np.atleast_2d(np.asarray(features, np.float32)) - mean) / scale
    return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def positive_labels(run) -> set[str]:
    """The labels that count as the run's positive class (config ``adopted.positive_labels`` for an
    adopted run, else the positive class's own name)."""
    run = runs.open_run(run)
    return set((run.adopted or {}).get("positive_labels") or [run.positive])


# --------------------------------------------------------------------------- the index file
def reference_rows(predictions: pd.DataFrame) -> pd.DataFrame:
    """The films neighbours are drawn from: development rows (neither test nor external); when there
    are none (an adopted run), every scored film."""
    dev = predictions[~predictions["split"].isin(["test", "external"])]
    return (dev if len(dev) else predictions).reset_index(drop=True)


def write_index(run, features: np.ndarray, rows: pd.DataFrame) -> Path:
    """Write the neighbour index of ``run`` from the features (n, d) of the films ``rows`` (path,
    label, source, split; same order). Returns the file's path."""
    run = runs.open_run(run)
    f = np.asarray(features, np.float32)
    mean = f.mean(axis=0)
    scale = np.maximum(f.std(axis=0), 1e-6 * max(float(f.std()), 1e-12))
    pos = positive_labels(run)
    col = {c: rows[c].astype(str).to_numpy() if c in rows else np.full(len(rows), "") for c in
           ("path", "label", "source", "split")}
    path = run.file(INDEX_FILE)
    tmp = run.file(f".{INDEX_FILE}.tmp.npz")
    np.savez_compressed(tmp, unit=standardise(f, mean, scale).astype(np.float16), mean=mean, scale=scale,
                        positive=np.isin(col["label"], sorted(pos)),
                        model_sha256=np.array(run.config.get("model_sha256") or ""),
                        **{k: v.astype(str) for k, v in col.items()})
    tmp.replace(path)
    return path


def build(run=None, data=None, progress: bool = True) -> Path:
    """Compute and write the neighbour index of a run (its development films, or for an adopted run
    its scored films) from the images under ``data``."""
    run = runs.open_run(run)
    rows = reference_rows(run.predictions())
    feats, kept = film_features(run, rows, run.data_root(data), progress)
    return write_index(run, feats, rows.iloc[kept].reset_index(drop=True))


@lru_cache(maxsize=4)
def _load(path: str, stamp) -> Index | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            table = pd.DataFrame({c: z[c].astype(str) for c in ("path", "label", "source", "split")})
            table["positive"] = z["positive"].astype(bool)
            return Index(unit=z["unit"].astype(np.float32), mean=z["mean"], scale=z["scale"], table=table,
                         model_sha256=str(z["model_sha256"]))
    except (OSError, ValueError, KeyError):
        return None


def load_index(run) -> Index | None:
    """The run's neighbour index, cached per version of the file; None when absent or unreadable."""
    run = runs.open_run(run)
    return _load(str(run.file(INDEX_FILE)), run.stamp(INDEX_FILE)) if run.has(INDEX_FILE) else None


# --------------------------------------------------------------------------- lookup
def nearest(run, features, k: int = K, *, call: str | None = None, exclude=()) -> pd.DataFrame:
    """The ``k`` development films nearest to a film with penultimate ``features`` (1, d).

    Returns a DataFrame (path, label, source, distance), nearest first; ``attrs["sentence"]`` is one
    plain sentence when most of them come from one collection or (given ``call``, the decision of
    :func:`core.report.decision`: "covid" or "not covid") carry a label that disagrees with it, else None.
    ``exclude``: paths never returned (the film itself, when it is in the index). Raises
    :class:`core.runs.RunError` when the run has no index or it was made for another model file.
    """
    run = runs.open_run(run)
    index = load_index(run)
    if index is None:
        raise runs.RunError(f"{run.label} has no neighbour index ({INDEX_FILE}): run "
                            f"`python -m core.neighbours build --run {run.path} --data DIR`")
    sha = run.config.get("model_sha256") or ""
    if index.model_sha256 != sha:
        raise runs.RunError(f"{run.label}: its {INDEX_FILE} was made for another model file; build it again "
                            "(`python -m core.neighbours build`)")
    sim = index.unit @ standardise(features, index.mean, index.scale)[0]
    if len(exclude):
        sim = np.where(index.table["path"].isin(list(exclude)).to_numpy(), -np.inf, sim)
    k = int(min(k, np.isfinite(sim).sum()))
    top = np.argpartition(-sim, k - 1)[:k] if k else np.zeros(0, int)
    top = top[np.argsort(-sim[top], kind="stable")]
    out = index.table.iloc[top].reset_index(drop=True)
    table = out[["path", "label", "source"]].assign(distance=np.clip(1.0 - sim[top], 0.0, 2.0).astype(float))
    table.attrs["sentence"] = describe(out, call, run.positive)
    return table


def describe(neighbours: pd.DataFrame, call: str | None = None, positive: str = "covid") -> str | None:
    """One plain sentence when most neighbours come from one collection, or disagree with ``call``;
    None when neither holds. ``neighbours`` needs ``source`` (and ``positive`` for the call)."""
    n = len(neighbours)
    if n == 0:
        return None
    parts = []
    top = neighbours["source"].value_counts()
    if top.iloc[0] > MOST * n:
        parts.append(f"{top.iloc[0]} of the {n} films this one most resembles, to the model, come from one "
                     f"collection ({top.index[0]})")
    if call and call not in ("withheld", "no operating point") and "positive" in neighbours:
        # core.report.decision: "<positive>" or "not <positive>"
        against = int((neighbours["positive"].to_numpy(bool) != (not call.startswith("not "))).sum())
        if against > MOST * n:
            parts.append(f"{against} of the {n} carry a label that disagrees with the call ({call})")
    if not parts:
        return None
    return "; ".join(parts) + "."


# --------------------------------------------------------------------------- CLI
def cli_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A command line with the ``--run``, ``--data`` and ``--json`` options (this module's and core.feature_map's)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    runs.add_run_argument(p)
    p.add_argument("--data", default=None, help="data root (default: $CXR_DATA_DIR or data/)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def main(argv=None) -> int:
    p = cli_parser(
        "python -m core.neighbours",
        "Nearest development films in the model's penultimate-feature space. 'build' writes the "
        f"run's {INDEX_FILE} (features, paths, labels and collections of its development films; "
        "an adopted run's scored films); FILM prints the k films it most resembles.",
    )
    p.add_argument("what", metavar="build|FILM", help="'build', or a film (PNG, JPEG, DICOM) to look up")
    p.add_argument("--k", type=int, default=K, help="neighbours to print (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        if args.what == "build":
            path = build(args.run, args.data, progress=not args.json)
            n = len(load_index(path.parent).table)
            print(json.dumps({"path": str(path), "n": n}) if args.json else f"wrote {path} ({n} films)")
            return 0
        from core import case  # lazy: core.case imports this module (an import cycle at the top)

        c = case.analyse(args.run, Path(args.what))
        table = nearest(args.run, c.features, args.k)
    except (FileNotFoundError, runs.RunError, images.ImageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"neighbours": table.to_dict("records"), "sentence": table.attrs["sentence"]}))
    else:
        print(table.to_string(index=False))
        if table.attrs["sentence"]:
            print(table.attrs["sentence"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
