"""Run folders: where one training run keeps its model, settings, split, history and results.

A run folder ``runs/<YYYYmmdd-HHMMSS>-<name>/`` holds ``model.keras``, ``config.json``,
``split.csv``, ``history.csv``, ``predictions.csv``, ``metrics.json`` and ``env.json`` (later also
``audit.csv``/``audit.json``). Every file is written atomically (temporary file, then
``os.replace``), so a killed process never leaves half a file. Problems raise :class:`RunError`
with one sentence that names the run and the missing or corrupt file. The shipped model
(``config.DEFAULT_RUN``) is the run used when none is named.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from numbers import Real
from pathlib import Path

import numpy as np
import pandas as pd

from core import config, inputs

# re-exported: where a run came from (core.provenance) is part of writing run folders
from core.provenance import PACKAGES as PACKAGES
from core.provenance import environment as environment
from core.provenance import provenance as provenance
from core.provenance import sha256 as sha256
from core.provenance import source_files as source_files
from core.provenance import source_sha256 as source_sha256

FILES = ("model.keras", "config.json", "split.csv", "history.csv", "predictions.csv", "metrics.json", "env.json")


class RunError(ValueError):
    """A run folder that is missing, incomplete or corrupt."""


def _label(run: Path) -> str:
    return f"run {Path(run).name!r} ({run})"


def new_run(runs_root, name: str = "run") -> Path:
    """Create and return a fresh folder ``<runs_root>/<YYYYmmdd-HHMMSS>-<name>``."""
    root = Path(runs_root)
    root.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = root / (f"{stamp}-{safe}" if i == 0 else f"{stamp}-{safe}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RunError(f"cannot create a new run folder for {name!r} under {root}.")


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            write(fh)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; run files are plain readable artifacts
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return _atomic_write(path, lambda fh: json.dump(obj, fh, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_csv(path, df: pd.DataFrame) -> Path:
    """Write a DataFrame as CSV (no index), atomically."""
    return _atomic_write(path, lambda fh: df.to_csv(fh, index=False))


def atomic_save_model(model, path) -> Path:
    """Save a Keras model to ``path`` (.keras) atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _need(run, name: str) -> Path:
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"{_label(run)} does not exist or is not a folder.")
    path = run / name
    if not path.is_file():
        raise RunError(f"{_label(run)} has no {name}.")
    return path


def _read_json(run, name: str) -> dict:
    path = _need(run, name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{_label(Path(run))} has a corrupt {name} ({exc}).") from None
    except OSError as exc:
        raise RunError(f"{_label(Path(run))} has an unreadable {name} ({exc.strerror or exc}).") from None


def _read_csv(run, name: str, required: tuple[str, ...] = ()) -> pd.DataFrame:
    path = _need(run, name)
    try:
        df = pd.read_csv(path, dtype={"patient_id": str, "path": str})
    except Exception as exc:  # pandas raises many parser errors
        raise RunError(f"{_label(Path(run))} has a corrupt {name} ({exc}).") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise RunError(f"{_label(Path(run))} has a {name} without the column(s) {', '.join(missing)}.")
    return df


def read_config(run) -> dict:
    """The run's config.json as a dict."""
    return _read_json(run, "config.json")


def read_env(run) -> dict:
    """The run's env.json (package versions, git commit and source hash: :func:`environment`)."""
    return _read_json(run, "env.json")


def read_history(run) -> pd.DataFrame:
    """The run's history.csv: one row per network and epoch (member, epoch, loss, val_auc, ...)."""
    return _read_csv(run, "history.csv", ("epoch",))


# Chart titles and the Keras name each gathers: loss/val_loss, accuracy/val_accuracy, auc/val_auc/val_ws_auc.
HISTORY_CHARTS = {"Loss": "loss", "Accuracy": "accuracy", "AUC": "auc"}
HISTORY_INDEX = ("member", "epoch")  # what identifies a row of history.csv; never a measurement


def history_curves(hist: pd.DataFrame) -> pd.DataFrame:
    """history.csv as curves to draw: a long table ``chart, series, member, epoch, value``.

    Each measured column goes to the chart of :data:`HISTORY_CHARTS` whose name it carries, any
    other numeric column to ``Other``. ``member`` (which network of an ensemble; 0 when absent)
    identifies a curve together with ``series``, so one curve never runs from the last epoch of
    one network back to the first of the next. Rows are in epoch order within each curve.
    """
    hist = hist.copy()
    if "member" not in hist.columns:
        hist["member"] = 0

    def chart(col: str) -> str:
        for title, key in HISTORY_CHARTS.items():
            if col == key or col.endswith("_" + key) or col.startswith(key + "_"):
                return title
        return "Other"

    measured = [c for c in hist.columns if c not in HISTORY_INDEX and pd.api.types.is_numeric_dtype(hist[c])]
    long = hist.melt(id_vars=list(HISTORY_INDEX), value_vars=measured, var_name="series").dropna(subset=["value"])
    long.insert(0, "chart", long["series"].map(chart))
    return long.sort_values(["chart", "series", "member", "epoch"], kind="stable").reset_index(drop=True)


def read_predictions(run) -> pd.DataFrame:
    """The run's predictions.csv: one row per val/test(/external) image with p_<class> columns."""
    return _read_csv(run, "predictions.csv", ("path", "source", "label", "split"))  # what every page reads


def read_split(run) -> pd.DataFrame:
    """The run's split.csv (path, split, label, source, patient_id, ...)."""
    return _read_csv(run, "split.csv", ("path", "split"))


def read_metrics(run) -> dict:
    """The run's metrics.json (written by core.evaluate)."""
    return _read_json(run, "metrics.json")


def read_crossval(run) -> dict:
    """The run's crossval.json: the leave-one-source-out table of its recipe (core.crossval)."""
    return _read_json(run, "crossval.json")


def load_model(run=None, check_hash: bool = True):
    """Load the run's model.keras with ``safe_mode=True``; verify its sha256 if config has one."""
    import keras  # lazy: keras pulls in TensorFlow (+3.3 s); TF-free CLIs (core.data, core.evaluate) import core.runs

    run = resolve_run(run)
    try:  # a run made by core.adopt (a SavedModel, or code the user trusted) loads through core.adopt_load
        cfg = read_config(run) if is_run(run) else {}
        adopted = cfg.get("adopted")
    except (RunError, AttributeError):
        adopted = None  # a corrupt config.json is reported below, after the model file, as for every run
    if isinstance(adopted, dict):
        from core import adopt_load  # lazy: as keras above

        return adopt_load.load_run_model(run, cfg, check_hash)
    path = _need(run, "model.keras")
    if check_hash and is_run(run):
        cfg = read_config(run)
        expected = cfg.get("model_sha256") if isinstance(cfg, dict) else None
        if expected and sha256(path) != expected:
            raise RunError(f"{_label(Path(run))} has a model.keras whose sha256 does not match config.json.")
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:
        # Short, actionable reasons; never advise turning safe mode off (tests/test_faults.py).
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "safe_mode" in str(exc) or "unsafe" in str(exc):
            text = "it contains Python code (e.g. a Lambda layer), which safe mode refuses to load"
        elif "zip" in str(exc).lower() or "File not found" in str(exc):
            text = "it is not a valid .keras file (truncated, corrupt, or another format such as HDF5 or pickle)"
        raise RunError(f"{_label(Path(run))} has a model.keras that cannot be loaded: {text[:200]}.") from None


def is_run(path) -> bool:
    """True if ``path`` looks like a run folder (has config.json)."""
    return (Path(path) / "config.json").is_file()


def list_runs(runs_root=None) -> list[Path]:
    """Run folders under ``runs_root`` (newest first), with the shipped run first when present."""
    root = config.runs_dir(runs_root)
    found = []
    if root.is_dir():
        found = sorted((p for p in root.iterdir() if p.is_dir() and is_run(p)), key=lambda p: p.name, reverse=True)
    shipped = config.DEFAULT_RUN
    out = [shipped] if is_run(shipped) else []
    return out + [p for p in found if p.resolve() != shipped.resolve()]


def resolve_run(arg=None) -> Path:
    """A run folder from an argument: None -> the shipped run; a path; or a name under runs/."""
    if arg is None or str(arg) == "":
        run = config.DEFAULT_RUN
    else:
        run = Path(arg).expanduser()
        if not run.exists():
            candidate = config.runs_dir() / str(arg)
            if candidate.exists():
                run = candidate
    if not Path(run).is_dir():
        raise RunError(f"{_label(Path(run))} does not exist or is not a folder.")
    return Path(run).resolve()


# --------------------------------------------------------------------------- the Run handle
SCALING = "raw grey 0-255, preprocessing inside"  # what every saved model of this project takes


def file_stamp(path) -> tuple[int, int, int] | None:
    """What a cache keys a file on: (size, mtime in ns, inode); None when it is missing.

    A file rewritten in place or replaced (``os.replace``, as this module writes) gets a new stamp.
    """
    try:
        st_ = Path(path).stat()
    except OSError:
        return None
    return (st_.st_size, st_.st_mtime_ns, st_.st_ino)


@dataclass(frozen=True)
class Run:
    """One run folder, read and validated once (:func:`open_run`); the one reader of its files.

    ``threshold`` is the validation-chosen decision threshold on P(``positive``) from metrics.json
    as it was when the run was opened (``threshold_source`` says where it came from, or why there
    is none); ``recorded_data_root`` is config ``data_root`` (where the run was trained), resolved
    against the repository, whether or not it exists here.
    """

    path: Path
    config: dict
    classes: tuple[str, ...]
    positive: str
    size: int | None
    channels: int
    lung_crop: dict | None
    scaling: str
    threshold: float | None
    threshold_source: str
    recorded_data_root: Path | None
    adopted: dict | None = None  # config "adopted" of a run made by core.adopt; None for our own runs
    blackbox: bool = False  # an adopted SavedModel: layers out of reach, output-only explanations
    training_data_known: bool = True  # False: adopted without --trained-on, every film scored as external

    @property
    def name(self) -> str:
        """The folder's name."""
        return self.path.name

    @property
    def label(self) -> str:
        """How errors name the run: ``run 'name' (path)``."""
        return _label(self.path)

    @property
    def positive_index(self) -> int:
        """Index of :attr:`positive` in :attr:`classes` (the softmax column of P(COVID-19))."""
        return self.classes.index(self.positive)

    def file(self, name: str) -> Path:
        """Path of one of the run's files (it may not exist)."""
        return self.path / name

    def has(self, name: str) -> bool:
        """True when the run has the file ``name``."""
        return self.file(name).is_file()

    def stamp(self, name: str) -> tuple[int, int, int] | None:
        """:func:`file_stamp` of one of the run's files."""
        return file_stamp(self.file(name))

    def data_root(self, arg=None) -> Path:
        """Where the run's images are: ``arg``, else ``$CXR_DATA_DIR``, else the recorded data root
        when it exists here, else ``<repo>/data`` (the one fallback rule of every reader)."""
        if arg or os.environ.get("CXR_DATA_DIR"):
            return config.data_dir(arg)
        if self.recorded_data_root is not None and self.recorded_data_root.is_dir():
            return self.recorded_data_root
        return config.data_dir()

    def model(self):
        """The run's Keras model: loaded lazily in safe mode, sha256-checked against config.json,
        cached per version of model.keras and config.json (a replaced file is loaded again)."""
        return _cached_model(str(self.path), self.stamp("model.keras"), self.stamp("config.json"))

    def predictions(self) -> pd.DataFrame:
        """predictions.csv (RunError when missing or corrupt)."""
        return read_predictions(self.path)

    def split(self) -> pd.DataFrame:
        """split.csv (RunError when missing or corrupt)."""
        return read_split(self.path)

    def history(self) -> pd.DataFrame:
        """history.csv (RunError when missing or corrupt)."""
        return read_history(self.path)

    def metrics(self) -> dict:
        """metrics.json (RunError when missing or corrupt)."""
        return read_metrics(self.path)

    def crossval(self) -> dict:
        """crossval.json (RunError when missing or corrupt)."""
        return read_crossval(self.path)

    def env(self) -> dict:
        """env.json (RunError when missing or corrupt)."""
        return read_env(self.path)

    def audit(self) -> dict | None:
        """audit.json (core.audit's summary); None when the run has not been audited, RunError when corrupt."""
        return _read_json(self.path, "audit.json") if self.has("audit.json") else None

    def audit_table(self) -> pd.DataFrame | None:
        """audit.csv (one row per audited film); None when absent, RunError when corrupt."""
        return _read_csv(self.path, "audit.csv") if self.has("audit.csv") else None


@lru_cache(maxsize=4)
def _cached_model(path: str, model_stamp, config_stamp):
    return load_model(path)


def _bad(run: Path, field: str, why: str) -> RunError:
    return RunError(f"{_label(run)} has a config.json whose {field!r} {why}.")


def _number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _classes(run: Path, cfg: dict) -> tuple[str, ...]:
    got = cfg.get("classes")
    if got is None:
        try:
            return tuple(config.classes(cfg.get("task", "binary")))
        except (ValueError, TypeError):
            raise _bad(run, "task", f"is {cfg.get('task')!r}, not one of {sorted(config.TASKS)}") from None
    if not isinstance(got, list) or not got or not all(isinstance(c, str) for c in got):
        raise _bad(run, "classes", "is not a list of class names (strings)")
    return tuple(got)


def _size(run: Path, cfg: dict) -> int | None:
    size = cfg.get("size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise _bad(run, "size", f"is {size!r}, not a positive whole number of pixels")
    return size


def _lung_crop(run: Path, cfg: dict) -> dict | None:
    crop = cfg.get("lung_crop")
    if crop is not None and not isinstance(crop, (bool, dict)):
        raise _bad(run, "lung_crop", f"is {crop!r}, not false, true or an object of settings")
    if isinstance(crop, dict) and not all(_number(v) for v in crop.values()):
        raise _bad(run, "lung_crop", "has a setting that is not a number")
    return inputs.settings(cfg)


def _recorded_root(run: Path, cfg: dict) -> Path | None:
    root = cfg.get("data_root")
    if not root:
        return None
    if not isinstance(root, str):
        raise _bad(run, "data_root", f"is {root!r}, not a folder name")
    p = Path(root).expanduser()
    return (p if p.is_absolute() else config.REPO_ROOT / p).resolve()


def _threshold(run: Path) -> tuple[float | None, str]:
    """The decision threshold of metrics.json (a number, or ``{"value": ...}``) and where it came from."""
    if not (run / "metrics.json").is_file():
        return None, "none: the run has no metrics.json (run `python -m core.evaluate --run RUN`)"
    try:
        got = read_metrics(run)
    except RunError as exc:
        return None, f"none: {exc}"
    thr = got.get("threshold") if isinstance(got, dict) else None
    where = "metrics.json"
    if isinstance(thr, dict):
        if thr.get("target") is not None:
            where = (f"metrics.json: chosen on {thr.get('chosen_on', 'val')} rows for "
                     f"{thr['target']} >= {thr.get('target_value')}")
        where = f"metrics.json: {thr['source']}" if thr.get("source") else where  # adopted: given, or 0.5
        thr = thr.get("value")
    if not _number(thr):
        return None, "none: metrics.json holds no numeric threshold"
    return float(thr), where


def _positive(classes: tuple[str, ...], cfg: dict) -> str:
    pos = cfg.get("positive")
    if isinstance(pos, str) and pos in classes:
        return pos
    return "covid" if "covid" in classes else classes[config.COVID_INDEX]


def open_run(arg=None) -> Run:
    """The run named by ``arg`` (a :class:`Run` is returned as is; None: the shipped model; a path;
    a name under runs/), its config.json read and validated. RunError names the run and the field."""
    if isinstance(arg, Run):
        return arg
    path = resolve_run(arg)
    cfg = read_config(path)
    if not isinstance(cfg, dict):
        raise RunError(f"{_label(path)} has a config.json that is not a JSON object.")
    classes = _classes(path, cfg)
    channels = cfg.get("channels", 1)
    if not isinstance(channels, int) or isinstance(channels, bool) or channels <= 0:
        raise _bad(path, "channels", f"is {channels!r}, not a positive whole number")
    thr, source = _threshold(path)
    adopted = cfg["adopted"] if isinstance(cfg.get("adopted"), dict) else None
    return Run(path=path, config=cfg, classes=classes, positive=_positive(classes, cfg), size=_size(path, cfg),
               channels=channels, lung_crop=_lung_crop(path, cfg), scaling=SCALING, threshold=thr,
               threshold_source=source, recorded_data_root=_recorded_root(path, cfg), adopted=adopted,
               blackbox=bool(adopted and adopted.get("blackbox")),
               training_data_known=not adopted or bool(adopted.get("trained_on")))


def add_run_argument(parser, positional: bool = False) -> None:
    """The run argument of a command line (``RUN`` or ``--run RUN``), read by :func:`open_for_cli`."""
    names, kw = (["run"], {"nargs": "?"}) if positional else (["--run"], {})
    parser.add_argument(*names, **kw, help="run folder (default: the shipped model in assets/model)")


def open_for_cli(arg=None, *, with_model: bool = False) -> Run | None:
    """:func:`open_run` for a command line: the Run (its model loaded too with ``with_model``), or
    None after printing the one-sentence error on stderr (the CLI then exits with status 2)."""
    try:
        run = open_run(arg)
        if with_model:
            run.model()
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return run


class DiskFull(ValueError):
    """The disk filled up while training: one sentence (the folder, free vs needed space, how to go on)."""


def disk_full_sentence(folder: Path) -> str:
    """Why training stopped on a full disk, with the space it needs and how to continue.

    The space needed is about two checkpoints (the new one is written next to the old one before
    it replaces it), estimated from the checkpoint in ``folder`` or else the shipped model.
    """
    folder = Path(folder)
    probe = folder if folder.exists() else folder.parent
    free = shutil.disk_usage(probe).free if probe.exists() else 0
    ckpt = folder / "checkpoint" / "last.keras"
    sample = ckpt if ckpt.is_file() else config.DEFAULT_RUN / "model.keras"
    need = 2 * (sample.stat().st_size if sample.is_file() else 0)
    then = (f"then continue with `python -m core.train --resume {folder}` (it keeps every finished epoch)"
            if (folder / "checkpoint" / "state.json").is_file() else "then run the same command again")
    return (f"The disk holding {folder} is full ({free / 2**20:.0f} MB free, about {need / 2**20:.0f} MB "
            f"needed for the next checkpoint): free some space, {then}.")
