"""Shared state of the dashboard: which run and data root, and cached calls into ``core``.

Models live in ``st.cache_resource`` (one shared, never-modified copy per process); tables,
predictions and dataset heatmaps in ``st.cache_data`` (in memory only, bounded by
``max_entries``). Every cache is keyed on what it reads: a file by its path and :func:`stamp`
(size, mtime, inode), so a run that ``core.evaluate``, ``core.audit`` or
``core.train --recalibrate`` rewrites is re-read (and a swapped model.keras is loaded, and its
sha256 checked, again). Streamlit leaves ``_``-named arguments out of a cache key, so no key
argument here starts with ``_``.
A film on the Explain page (an upload, or a dataset film opened there or on the Misclassified
page) is analysed once per session by :func:`case` and kept in that session's own state, keyed
by the sha256 of its bytes: never shared across sessions, a few films per session and a bound
over all sessions together, so hundreds of uploads do not grow the process.
Nothing here computes a metric, touches pixels or builds a model: it only calls ``core``.
Model work runs in a :func:`core.work.slot` (a bounded, first-come first-served line shared by
all sessions), so many sessions at once slow down instead of running out of memory; cache
hits never wait.
"""

from __future__ import annotations

import argparse
import collections
import gc
import hashlib
import json
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from core import case as ccase
from core import (
    config,
    datasets,
    evaluate,
    explain,
    feature_map,
    findings,
    images,
    keras_adapter,
    lungs,
    runs,
    safepath,
    splits,
    work,
)
from core import data as cdata
from core import model as cmodel
from core import severity as sev
from core import trust as ctrust

NO_DATA = (
    "This page needs the chest X-ray images, which are not in the repository: get them with "
    "`python -m core.data download --to data`, or point the app at a copy with "
    "`streamlit run dashboard/app.py -- --data DIR` (or the `CXR_DATA_DIR` variable)."
)
NO_RUN = "No model run was found: the shipped model `assets/model` is missing; train one with `python -m core.train`."

HEATMAP_CACHE = 128  # audit cases (heatmaps of dataset films) kept in memory
IMAGE_CACHE = 256  # decoded thumbnails kept in memory


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options after ``--`` on ``streamlit run dashboard/app.py -- --data DIR --runs DIR``."""
    p = argparse.ArgumentParser(prog="dashboard/app.py", add_help=False)
    p.add_argument("--data", default=None)
    p.add_argument("--runs", default=None)
    args, _ = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    return args


def data_root() -> Path:
    """The data root: ``--data`` after ``--``, else ``$CXR_DATA_DIR``, else ``data/``."""
    return config.data_dir(parse_args().data)


def runs_root() -> Path:
    """The runs root: ``--runs`` after ``--``, else ``$CXR_RUNS_DIR``, else ``runs/``."""
    return config.runs_dir(parse_args().runs)


@st.cache_data(ttl=60, show_spinner=False)
def _sources(root: str) -> list[tuple[str, str]]:
    if not Path(root).is_dir():
        return []
    try:
        return [(str(kind), str(path)) for kind, path in datasets.find_sources(root)]
    except OSError:
        return []


def has_data(root: Path | None = None) -> bool:
    """True when the data root holds at least one readable source layout."""
    return bool(_sources(str(root or data_root())))


# --------------------------------------------------------------------------- runs


@st.cache_data(ttl=30, show_spinner=False)
def run_choices(root: str) -> list[str]:
    """Run folders as strings, the shipped model first."""
    return [str(p) for p in runs.list_runs(root)]


def run_label(run: str) -> str:
    """Short name of a run for the sidebar."""
    p = Path(run)
    if p.resolve() == config.DEFAULT_RUN.resolve():
        return "shipped model (assets/model)"
    return p.name


def current_run() -> Path | None:
    """The run picked in the sidebar (the shipped model by default); None when there is none."""
    choices = run_choices(str(runs_root()))
    picked = st.session_state.get("run")
    if picked in choices:
        return Path(picked)
    return Path(choices[0]) if choices else None


def require_run() -> Path:
    """The picked run; without any run, say so in one sentence and stop the page."""
    run = current_run()
    if run is None:
        st.error(NO_RUN)
        st.stop()
    return run


stamp = runs.file_stamp  # what a cache keys a file on: (size, mtime in ns, inode); None when missing


def _stamp(run: Path | str, name: str) -> tuple[int, int, int] | None:
    return stamp(Path(run) / name)


@st.cache_data(max_entries=32, show_spinner=False)
def _run(run: str, config_stamp: tuple | None, metrics_stamp: tuple | None) -> runs.Run:
    return runs.open_run(run)


def run_handle(run: Path | str) -> runs.Run:
    """The run's :class:`core.runs.Run` (validated config, classes, threshold), read again when its
    config.json or metrics.json changes (RunError when missing or corrupt)."""
    return _run(str(run), _stamp(run, "config.json"), _stamp(run, "metrics.json"))


@st.cache_data(max_entries=32, show_spinner=False)
def _metrics(run: str, file_stamp: tuple | None) -> dict:
    return run_handle(run).metrics()


@st.cache_data(max_entries=16, show_spinner=False)
def _predictions(run: str, file_stamp: tuple | None) -> pd.DataFrame:
    return run_handle(run).predictions()


@st.cache_data(max_entries=16, show_spinner=False)
def _history(run: str, file_stamp: tuple | None) -> pd.DataFrame:
    return run_handle(run).history()


@st.cache_data(max_entries=16, show_spinner=False)
def _split(run: str, file_stamp: tuple | None) -> pd.DataFrame:
    return run_handle(run).split()


@st.cache_data(max_entries=16, show_spinner=False)
def _crossval(run: str, file_stamp: tuple | None) -> dict:
    return run_handle(run).crossval()


def run_crossval(run: Path) -> dict:
    """crossval.json of a run: its recipe's leave-one-source-out table (RunError when missing)."""
    return _crossval(str(run), _stamp(run, "crossval.json"))


def run_config(run: Path) -> dict:
    """config.json of a run (RunError when missing, corrupt or malformed)."""
    return run_handle(run).config


def run_metrics(run: Path) -> dict:
    """metrics.json of a run (RunError when missing or corrupt)."""
    return _metrics(str(run), _stamp(run, "metrics.json"))


def run_predictions(run: Path) -> pd.DataFrame:
    """predictions.csv of a run (RunError when missing or corrupt)."""
    return _predictions(str(run), _stamp(run, "predictions.csv"))


def run_history(run: Path) -> pd.DataFrame:
    """history.csv of a run (RunError when missing or corrupt)."""
    return _history(str(run), _stamp(run, "history.csv"))


def run_split(run: Path) -> pd.DataFrame:
    """split.csv of a run (RunError when missing or corrupt)."""
    return _split(str(run), _stamp(run, "split.csv"))


def run_classes(run: Path) -> list[str]:
    """Class names of a run, COVID-19 first."""
    return list(run_handle(run).classes)


def threshold(run: Path) -> float | None:
    """The run's operating point on P(covid) from metrics.json, or None without one (core.runs.Run.threshold)."""
    return run_handle(run).threshold


def seed_runs(run: Path) -> pd.DataFrame:
    """This run and the runs under the runs folder that differ from it only in their seed
    (:func:`core.evaluate.seed_runs`): one row each, with its seed and test AUCs."""
    return evaluate.seed_runs(run, [Path(r) for r in run_choices(str(runs_root()))])


# --------------------------------------------------------------------------- models


@st.cache_resource(max_entries=4, show_spinner="Loading the model...")
def _model(run: str, model_stamp: tuple | None, config_stamp: tuple | None):
    model = runs.open_run(run).model()
    try:  # the Explain page needs it for every film: load it with the model, before the freeze
        lungs.lung_model()
    except (FileNotFoundError, OSError, ValueError):
        pass
    # Streamlit collects garbage after every script run (gc.collect(2)): with TensorFlow's ~400k
    # objects that is ~0.2-0.5 s each, holding the GIL, so each session's run stalls all the
    # others. Freezing what is loaded now (modules, models) leaves it only the objects the
    # sessions create.
    gc.freeze()
    keep_tensorflow_kernels()
    return model


def keep_tensorflow_kernels() -> None:
    """Stop Streamlit's after-run clean-up from emptying TensorFlow's kernel cache.

    After every script run (a page, a fragment) Streamlit calls ``keras.backend.clear_session()``
    when Keras is imported, for scripts that build models on each run. That empties TensorFlow's
    kernel cache, so the next call of every traced model function re-instantiates its kernels:
    measured on this app's models, 12-15x the call itself (lung mask 14 -> 210 ms, probabilities
    5 -> 58 ms, Grad-CAM 5 -> 55 ms), about 0.4 s of CPU per upload. The dashboard builds no
    model in a script run (models are loaded once, in ``st.cache_resource``; Keras' own
    per-thread state is fresh in every script thread anyway), so in this process
    ``clear_session`` does nothing; Streamlit's own ``gc.collect`` still runs after each run.
    """
    keras_adapter.keep_kernels_on_clear_session()


def model_key(run: Path | str) -> tuple:
    """What identifies the loaded model: the stamps of model.keras and of config.json (its sha256)."""
    return (_stamp(run, "model.keras"), _stamp(run, "config.json"))


def model(run: Path):
    """The run's Keras model, loaded once per version of its files (safe mode, sha256 checked).

    Never modify it. A replaced model.keras (or config.json) is loaded and checked again.
    """
    return _model(str(run), *model_key(run))


def model_size(run: Path) -> int:
    """Input side in pixels of the run's model."""
    return cmodel.input_size(model(run))


def conv_layers(run: str) -> list[str]:
    """Explainable convolution layers of a run's model, and the default one first."""
    return _conv_layers(run, model_key(run))


@st.cache_data(max_entries=16, show_spinner=False)
def _conv_layers(run: str, key: tuple) -> list[str]:
    m = model(Path(run))
    if not explain.conv_layers(m):  # a black box (a SavedModel signature): no layer to offer
        return []
    default = explain.default_layer(m)
    return [default] + [name for name in explain.conv_layers(m) if name != default]


# --------------------------------------------------------------------------- one film (Explain page)

CASES_PER_SESSION = 2  # analysed films one session keeps: the one shown and the one before it
CASES_IN_ALL = 32  # analysed films all sessions together keep (1-3 MB each); the oldest go first
SHOWN_MAX = ccase.SHOWN_MAX  # longer side (px) of the film as sent to the browser
SESSION_CASES = "_explain_cases"  # the session-state key of a session's analysed films
_ALL: collections.deque = collections.deque()  # (weak reference to a session's store, key), oldest first
_ALL_LOCK = threading.Lock()  # guards _ALL and every store (another session's thread may evict)

MapKey = ccase.MapKey  # (method, class index, layer)


def _store() -> collections.OrderedDict:
    """This session's analysed films (in its session state: no other session can reach them)."""
    store = st.session_state.get(SESSION_CASES)
    if store is None:
        store = st.session_state[SESSION_CASES] = collections.OrderedDict()
    return store


def _keep(store: collections.OrderedDict, key: tuple, entry: dict) -> None:
    """Put ``entry`` in the session's store as its newest; evict beyond both bounds."""
    with _ALL_LOCK:
        fresh = key not in store
        store[key] = entry
        store.move_to_end(key)
        while len(store) > CASES_PER_SESSION:
            store.popitem(last=False)
        if fresh:
            _ALL.append((weakref.ref(store), key))
        while len(_ALL) > CASES_IN_ALL:
            ref, old = _ALL.popleft()
            other = ref()
            if other is not None and old != key:
                other.pop(old, None)


def case(run: Path, data: bytes, name: str, *, colour_check: bool = True, maps: Sequence[MapKey] = (),
         on_wait: Callable[[int], None] | None = None) -> tuple[ccase.Case, float | None]:
    """One film analysed for this session (a :class:`core.case.Case`), and the seconds it waited
    in line (None: no wait).

    ``data`` are the file's bytes (an upload, or a dataset file read with :func:`dataset_bytes`),
    ``name`` its name; ``colour_check`` runs core.checks' colour check on the bytes (uploads).
    The case is kept in the session's own state, keyed by the run's model and the bytes'
    sha256 (never shared with another session, at most :data:`CASES_PER_SESSION` films per
    session and :data:`CASES_IN_ALL` in all), so reruns of the page (a widget, a method added)
    never decode or run the model again. What is missing (:func:`core.case.analyse` on the first
    call, :func:`core.case.heatmap` of ``maps`` = (method, class index, layer) asked for the first
    time) is computed in ONE :func:`core.work.slot`; ``on_wait(ahead)`` is called before waiting
    for it (the page says "queued"). Raises core.images.ImageError for a file that cannot be
    used (remembered too).
    """
    key = (str(run), model_key(run), hashlib.sha256(data).hexdigest(), str(name), bool(colour_check))
    store = _store()
    with _ALL_LOCK:
        entry = store.get(key)
    if isinstance(entry, dict):  # a file that could not be used
        raise images.ImageError(*entry["error"])
    todo = [k for k in dict.fromkeys(maps) if entry is None or k not in entry.maps]
    if entry is not None and not todo:
        _keep(store, key, entry)
        return entry, None
    handle, m = run_handle(run), model(run)
    t0, fresh = time.perf_counter(), entry is None
    with work.slot(on_wait) as ticket:
        t1 = time.perf_counter()
        try:
            if entry is None:
                entry = ccase.analyse(handle, data, name=name, colour_check=colour_check, model=m)
        except images.ImageError as exc:
            _keep(store, key, {"error": (exc.name, exc.reason)})
            raise
        for method, ci, layer in todo:
            ccase.heatmap(handle, entry, method, ci, layer, model=m)
    _log_times(name, wait_s=t1 - t0, work_s=time.perf_counter() - t1, analysed=fresh, maps=len(todo))
    _keep(store, key, entry)
    return entry, (ticket.wait_s if ticket.waited else None)


TIMES_ENV = "CXR_SERVER_TIMES"  # a file path: one JSON line per analysis (tests/benchmarks/bench_load.py)


def _log_times(name: str, **fields) -> None:
    """With $CXR_SERVER_TIMES set, append the server's own seconds for one film (model-slot wait, work
    in the slot) to that file, so a load benchmark can tell them from the browsers' share of the CPU."""
    path = os.environ.get(TIMES_ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"name": str(name), "t": time.time(), **fields}) + "\n")


def severity(run: Path, entry: ccase.Case) -> dict:
    """Severity estimate of an analysed film (core.severity.estimate_prepared, from its features and lung mask)."""
    return sev.estimate_prepared(severity_record(), entry.x, entry.small, model(run),
                                 features=entry.features, mask=entry.lungs)


@st.cache_data(max_entries=8, show_spinner=False)
def _ood_reference(run: str, file_stamp: tuple | None) -> dict | None:
    return ctrust.load_reference(run)


def ood_reference(run: Path) -> dict | None:
    """The run's OOD reference (ood_reference.npz), None when absent."""
    return _ood_reference(str(run), _stamp(run, ctrust.REFERENCE_FILE))


def model_sha256(run: Path) -> str | None:
    """The model file's sha256 as recorded in config.json (load_model checks the file against it)."""
    try:
        return run_handle(run).config.get("model_sha256")
    except runs.RunError:
        return None


@st.cache_data(max_entries=2, show_spinner=False)
def _severity_record(path: str, file_stamp: tuple | None) -> dict | None:
    try:
        return sev.load(path)
    except sev.SeverityError:
        return None


def severity_record() -> dict | None:
    """The shipped severity model (assets/severity/severity.json), None when missing or corrupt."""
    path = sev.ASSET_DIR / "severity.json"
    return _severity_record(str(path), stamp(path))


# --------------------------------------------------------------------------- images


def dataset_image(root: str, rel: str, size: int) -> np.ndarray:
    """A thumbnail (``size`` x ``size``) of a dataset image (path relative to the data root),
    through core.images.load; cached, keyed on the file's stamp."""
    return _small_image(root, rel, size, safepath.film_stamp(root, rel))


@st.cache_data(max_entries=IMAGE_CACHE, show_spinner=False)
def _small_image(root: str, rel: str, size: int, file_stamp: tuple | None) -> np.ndarray:
    return safepath.load_film(root, rel, size)


def dataset_bytes(root: str, rel: str) -> bytes:
    """The bytes of a dataset file, for :func:`case` (core.safepath.read_film: core.images.ImageError
    when outside the data root, not a regular file, missing, empty or huge)."""
    return safepath.read_film(root, rel)


def error_sentence(exc: BaseException) -> str:
    """One sentence for the user from an ImageError / RunError / other expected failure."""
    if isinstance(exc, images.ImageError):
        return f"This file cannot be used: {exc.reason}."
    if isinstance(exc, KeyError):
        return f"a required column or field {exc.args[0]!r} is missing."
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if text.endswith(".") else text + "."


# --------------------------------------------------------------------------- data tables


def data_table(root: str, split_file: str | None = None) -> pd.DataFrame:
    """The image table of a data root (core.datasets), with the run's split applied when given."""
    return _data_table(root, split_file, stamp(split_file) if split_file else None)


@st.cache_data(max_entries=4, show_spinner="Reading the data folder...")
def _data_table(root: str, split_file: str | None, split_stamp: tuple | None) -> pd.DataFrame:
    table = datasets.load_table(root)
    if split_file and Path(split_file).is_file():
        table = splits.apply_split(table, splits.load_split(split_file))
    return table


def data_confounding(root: str, split_file: str | None = None) -> tuple[list[str], dict]:
    """Warnings when a label is confounded with a source, and how well shortcuts predict covid."""
    return _data_confounding(root, split_file, stamp(split_file) if split_file else None)


@st.cache_data(max_entries=4, show_spinner="Checking the data for shortcuts...")
def _data_confounding(root: str, split_file: str | None, split_stamp: tuple | None) -> tuple[list[str], dict]:
    table = data_table(root, split_file).copy()
    table.attrs["root"] = Path(root)
    return cdata.confounding(table)


# --------------------------------------------------------------------------- shortcut audit


@st.cache_data(max_entries=8, show_spinner=False)
def _audit_json(run: str, file_stamp: tuple | None) -> dict | None:
    return run_handle(run).audit()


@st.cache_data(max_entries=8, show_spinner=False)
def _audit_csv(run: str, file_stamp: tuple | None) -> pd.DataFrame | None:
    return run_handle(run).audit_table()


def audit_summary(run: Path) -> dict | None:
    """The run's audit.json (None when the run has not been audited)."""
    return _audit_json(str(run), _stamp(run, "audit.json"))


def audit_table(run: Path) -> pd.DataFrame | None:
    """The run's audit.csv (None when absent)."""
    return _audit_csv(str(run), _stamp(run, "audit.csv"))


def mean_map(run: Path, method: str, group: str) -> np.ndarray | None:
    """Overlay (RGB) of the mean heatmap of ``method`` over the mean image of ``group``
    (e.g. ``class-covid``, ``source-nih``) from the run's ``audit_maps/``; None when absent."""
    folder = Path(run) / "audit_maps"
    stamps = (stamp(folder / f"heat__{method}__{group}.npy"), stamp(folder / f"image__{group}.npy"))
    return _mean_map(str(run), method, group, stamps)


@st.cache_data(max_entries=64, show_spinner=False)
def _mean_map(run: str, method: str, group: str, file_stamps: tuple) -> np.ndarray | None:
    folder = Path(run) / "audit_maps"
    try:
        heat = np.load(folder / f"heat__{method}__{group}.npy", allow_pickle=False)
        img = np.load(folder / f"image__{group}.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    # Mean maps are averages of [0, 1] maps: rescale to the full colour range, as core.audit does.
    return explain.overlay(img, heat / max(float(heat.max()), 1e-8), alpha=0.45)


@st.cache_data(max_entries=HEATMAP_CACHE, show_spinner="Explaining the images...")
def _audit_cases(run: str, key: tuple, root: str, paths: tuple[str, ...], method: str,
                 file_stamps: tuple) -> list[dict]:
    m = model(Path(run))
    with work.slot():
        return findings.case_images(run_handle(run), root, list(paths), method, model=m)


def audit_cases(run: Path, root: str, paths: tuple[str, ...], method: str) -> list[dict]:
    """The films behind an audit finding with the run's heatmaps on them (core.findings.case_images)."""
    stamps = tuple(safepath.film_stamp(root, p) for p in paths)
    return _audit_cases(str(run), model_key(run), root, tuple(paths), method, stamps)


def audited_runs() -> list[str]:
    """Runs (as strings, the shipped model first) that have an audit.json."""
    return [r for r in run_choices(str(runs_root())) if (Path(r) / "audit.json").is_file()]


@st.cache_data(max_entries=8, show_spinner="Comparing the audits...")
def _compare_runs(a: str, b: str, file_stamps: tuple):
    return findings.compare_runs(a, b, (run_label(a), run_label(b)))


def compare_runs(a: str, b: str):
    """(figures, cards) of two audited runs side by side (core.findings.compare_runs)."""
    stamps = tuple(_stamp(r, name) for r in (a, b) for name in ("audit.json", "metrics.json"))
    return _compare_runs(a, b, stamps)


@st.cache_data(max_entries=8, show_spinner=False)
def _feature_map(run: str, file_stamp: tuple | None) -> pd.DataFrame | None:
    return feature_map.load(run_handle(run))


def feature_map_table(run: Path) -> pd.DataFrame | None:
    """The run's map of its model's features (feature_map.csv, core.feature_map); None when absent."""
    return _feature_map(str(run), _stamp(run, feature_map.MAP_FILE))
