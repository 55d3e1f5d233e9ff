"""Does the audit catch a planted shortcut? Small Keras models, trained as a user would, with and without one.

    .venv/bin/python tests/benchmarks/bench_shortcut.py --stage data|train|adopt|audit|report|all \\
        [--out runs/bench_shortcut] [--data ../shared/cxr] [--seeds 1,2,3] [--epochs 12] [--json]

Stages (each reads what the one before wrote under ``--out``, so they run separately):

``data``
    The film table of ``--data`` (:func:`core.splits.prepare`: patient groups, duplicates dropped) is
    split by patient group; train = the split's train + val rows, test = its test rows. Films are
    written at :data:`FILM` px (PNG) into three data roots, each with a ``manifest.csv``
    (``path,label,patient_id,source,view,age,sex`` + ``split``, ``marker``): ``clean_train/`` (no
    marker), ``planted_train/`` (every COVID-19 film carries a burned-in laterality marker
    :data:`MARKER_TEXT`, white, at the top-left corner, drawn with OpenCV; the other films unmarked)
    and ``test/`` (the marker on a random half of the films, independent of the label). ``source``
    stays the real collection.
``train``
    Plain Keras (no core.train): per seed and kind (planted, clean) a small CNN (128x128x1 grey 0-1,
    a ``Rescaling`` inside, four conv blocks, global pooling, softmax over [covid, other]) with a
    ``CSVLogger`` history; saved as ``models/<kind>_s<seed>/model.keras``. Each model is scored on the
    test films: AUC overall / on marked / on unmarked films, and the shortcut's signature, the mean
    P(covid) gap marked - unmarked among non-COVID and among COVID films, and where a plain Grad-CAM
    (last conv layer) puts its heat (share in the 10% border band, and in the marker's corner box).
    Plus a ``keras.applications.DenseNet121`` (``weights=None``, 224x224x3) with a new head, trained
    briefly on a subset of the clean films, saved as ``.keras`` and ``.h5``.
``adopt``
    ``python -m core.adopt`` on every model (its flags live in :func:`adopt_command` alone).
``audit``
    ``python -m core.audit --run RUN --data TEST --json`` on every adopted run.
``report``
    Per model the audit's findings (severity, kind, claim), whether a HIGH finding names the marker
    (:data:`MARKER_KINDS`: core.findings' ``corner_heat`` and ``border_heat`` cards), planted flagged k/n
    and clean flagged k/n, the trust panel (:func:`core.case.trust_rows`) on one marked non-COVID test
    film, the DenseNet121 adopt + audit time and the wall times of every stage. ``corner_heat`` needs the
    audit's per-film table to carry :func:`core.heat.corner_share` (``core.audit_steps.trust_table``).

Everything is written under ``--out`` (git-ignored ``runs/``); no image enters the repository.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from core import datasets, images, splits  # noqa: E402

FILM = 256  # px, side of the written films
SIZE = 128  # px, the small CNNs' input
DENSE_SIZE = 224
DENSE_SUBSET = 320  # training films of the DenseNet121 example
DENSE_EPOCHS = 2
MARKER_TEXT = "L"  # a laterality letter, burned in at the top-left corner
MARKER_HEIGHT = 0.08  # glyph height as a share of the film's side (a ~3 cm lead letter on a 43 cm film)
MARKER_MARGIN = 0.03  # distance from the edges, share of the side
MARKER_BOX = (0.0, 0.0, 0.18, 0.18)  # (y0, x0, y1, x1) shares: the corner region the marker sits in
TEST_MARK_SEED = 0
KINDS = ("planted", "clean")
# Findings that name a burned-in marker: heat on the film's border or corner, or a slice cut by the marker.
MARKER_KINDS = ("border_heat", "corner_heat")
MARKER_WORDS = ("marker",)


def adopt_command(model: Path, test_root: Path, run: Path, trained_on: Path | None, history: Path | None,
                  preprocess: str = "grey01") -> list[str]:
    """The ``python -m core.adopt`` call of one model (the one place its flags live: ADOPT_API.md)."""
    cmd = [sys.executable, "-m", "core.adopt", str(model), "--data", str(test_root), "--out", str(run),
           "--preprocess", preprocess, "--classes", "covid,other"]  # the models' softmax columns, in order
    if trained_on is not None:
        cmd += ["--trained-on", str(trained_on)]
    if history is not None and history.is_file():
        cmd += ["--history", str(history)]
    return cmd


def audit_command(run: Path, test_root: Path) -> list[str]:
    """The ``python -m core.audit`` call of one adopted run."""
    return [sys.executable, "-m", "core.audit", "--run", str(run), "--data", str(test_root), "--json", "--no-png"]


# --------------------------------------------------------------------------- stage: data
def draw_marker(film: np.ndarray) -> np.ndarray:
    """``film`` (uint8 grey) with :data:`MARKER_TEXT` burned in, white, at the top-left corner."""
    out = film.copy()
    side = min(out.shape[:2])
    font, thick = cv2.FONT_HERSHEY_SIMPLEX, max(2, round(side / 85))
    (_, h0), _ = cv2.getTextSize(MARKER_TEXT, font, 1.0, thick)
    scale = MARKER_HEIGHT * side / h0
    (_, h), _ = cv2.getTextSize(MARKER_TEXT, font, scale, thick)
    m = round(MARKER_MARGIN * side)
    cv2.putText(out, MARKER_TEXT, (m, m + h), font, scale, 255, thick, cv2.LINE_AA)
    return out


def _film_name(path: str) -> str:
    return path.replace("/", "__").rsplit(".", 1)[0] + ".png"


def _manifest_rows(table: pd.DataFrame, names: list[str], marker: np.ndarray) -> pd.DataFrame:
    """The manifest of a written root: core.datasets.read_manifest's columns plus split and marker."""
    # read_manifest prefixes patient_id with the source: write it without, so the ids come back unchanged
    pid = [p[len(s) + 1:] if p.startswith(f"{s}:") else p
           for p, s in zip(table["patient_id"].astype(str), table["source"].astype(str), strict=True)]
    return pd.DataFrame({
        "path": [f"films/{n}" for n in names], "label": table["label"].to_numpy(), "patient_id": pid,
        "source": table["source"].to_numpy(), "view": table["view"].to_numpy(),
        "age": table["age"].to_numpy(), "sex": table["sex"].to_numpy(), "split": table["split"].to_numpy(),
        "marker": marker.astype(int), "original": table["path"].to_numpy()})


def write_root(root: Path, table: pd.DataFrame, films: dict, marker: np.ndarray) -> Path:
    """Write ``table``'s films (``films``: original path -> uint8 film) into ``root``/films, marked where
    ``marker`` is true, and its manifest.csv."""
    (root / "films").mkdir(parents=True, exist_ok=True)
    names = [_film_name(p) for p in table["path"]]
    for path, name, mark in zip(table["path"], names, marker, strict=True):
        film = draw_marker(films[path]) if mark else films[path]
        cv2.imwrite(str(root / "films" / name), film)
    man = _manifest_rows(table, names, marker)
    man.to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def stage_data(args) -> dict:
    """Split the films by patient group and write the clean, planted and test roots (module docstring)."""
    t0 = time.time()
    table = splits.prepare(args.data, progress=False)
    films = {}
    for p in table["path"]:
        films[p] = np.clip(images.load(datasets.abspath(args.data, p), FILM) + 0.5, 0, 255).astype(np.uint8)
    train = table[table["split"] != "test"].reset_index(drop=True)
    test = table[table["split"] == "test"].reset_index(drop=True)
    covid = (train["label"] == "covid").to_numpy()
    rng = np.random.default_rng(TEST_MARK_SEED)
    test_mark = np.zeros(len(test), bool)
    test_mark[rng.permutation(len(test))[: len(test) // 2]] = True
    data = args.out / "data"
    write_root(data / "clean_train", train, films, np.zeros(len(train), bool))
    write_root(data / "planted_train", train, films, covid)
    write_root(data / "test", test, films, test_mark)
    out = {"n_train": len(train), "n_test": len(test), "train_covid": int(covid.sum()),
           "test_covid": int((test["label"] == "covid").sum()), "test_marked": int(test_mark.sum()),
           "test_marked_covid": int((test_mark & (test["label"] == "covid").to_numpy()).sum()),
           "film_px": FILM, "marker": MARKER_TEXT, "wall_s": round(time.time() - t0, 1)}
    (data / "data.json").write_text(json.dumps(out, indent=1))
    return out


# --------------------------------------------------------------------------- stage: train
def load_root(root: Path, size: int) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(x grey 0-1 (n, size, size, 1), y (0 = covid, 1 = other), manifest) of a written root."""
    man = pd.read_csv(root / "manifest.csv", keep_default_na=False)
    x = np.stack([cv2.resize(cv2.imread(str(root / p), cv2.IMREAD_GRAYSCALE), (size, size),
                             interpolation=cv2.INTER_AREA) for p in man["path"]]).astype(np.float32) / 255.0
    y = np.where(man["label"] == "covid", 0, 1)
    return x[..., None], y, man


def small_cnn(seed: int):
    """The user's model: grey 0-1 in, a Rescaling to [-1, 1] inside, four conv blocks, softmax over 2."""
    import keras  # lazy: TensorFlow costs ~3.5 s; the data and report stages do not need it

    keras.utils.set_random_seed(seed)
    inp = keras.Input((SIZE, SIZE, 1), name="film")
    z = keras.layers.Rescaling(2.0, offset=-1.0)(inp)
    for i, filters in enumerate((16, 32, 64, 64)):
        z = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i + 1}")(z)
        # momentum 0.9: with ~30 steps an epoch the default 0.99 leaves the moving statistics behind
        z = keras.layers.BatchNormalization(momentum=0.9)(z)
        z = keras.layers.MaxPooling2D()(z)
    z = keras.layers.Dropout(0.2)(keras.layers.GlobalAveragePooling2D()(z))
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(z), name="small_cnn")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def gradcam_border(model, x: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A plain Grad-CAM of P(covid)'s input to the softmax at the last conv layer (a user's own code):
    per film, the share of its heat in the 10% border band, in the marker's corner box and in the hottest
    corner square (core.findings.corner_share, what the audit's corner_heat card counts)."""
    import keras  # lazy: see small_cnn
    import tensorflow as tf

    from core import findings, heat

    conv = [ly for ly in model.layers if isinstance(ly, keras.layers.Conv2D)][-1]
    probe = keras.Model(model.inputs, [conv.output, model.output])
    border, corner, hottest = [], [], []
    y0, x0, y1, x1 = (round(v * SIZE) for v in MARKER_BOX)
    for i in range(0, len(x), batch):
        xb = tf.constant(x[i:i + batch])
        with tf.GradientTape() as tape:
            fmap, prob = probe(xb, training=False)
            score = tf.math.log(prob[:, 0] + 1e-7) - tf.math.log(prob[:, 1] + 1e-7)  # the logit difference
        grads = tape.gradient(score, fmap)
        cams = tf.nn.relu(tf.reduce_sum(fmap * tf.reduce_mean(grads, axis=(1, 2), keepdims=True), -1)).numpy()
        for cam in cams:
            h = cv2.resize(cam, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
            border.append(heat.heat_share(h, np.ones_like(h, bool))["border_share"])
            corner.append(float(h[y0:y1, x0:x1].sum() / h.sum()) if h.sum() > 0 else float("nan"))
            hottest.append(findings.corner_share(h)["corner_share"])
    return np.array(border), np.array(corner), np.array(hottest)


def shortcut_scores(p_covid: np.ndarray, y: np.ndarray, mark: np.ndarray) -> dict:
    """AUC overall / marked / unmarked and the P(covid) gap marked - unmarked within each class."""
    from sklearn.metrics import roc_auc_score

    pos = y == 0

    def auc(m):
        return round(float(roc_auc_score(pos[m], p_covid[m])), 3) if len(set(pos[m])) == 2 else None

    def gap(cls):
        return round(float(p_covid[cls & mark].mean() - p_covid[cls & ~mark].mean()), 3)

    return {"auc": auc(np.ones_like(mark)), "auc_marked": auc(mark), "auc_unmarked": auc(~mark),
            "gap_noncovid": gap(~pos), "gap_covid": gap(pos),
            "p_covid_noncovid_marked": round(float(p_covid[~pos & mark].mean()), 3),
            "p_covid_noncovid_unmarked": round(float(p_covid[~pos & ~mark].mean()), 3)}


def heat_scores(model, x: np.ndarray, mark: np.ndarray) -> dict:
    """Where the plain Grad-CAM's heat lies on marked and unmarked test films."""
    from core import findings

    border, corner, hottest = gradcam_border(model, x)
    return {"border_share_marked": round(float(np.nanmean(border[mark])), 3),
            "border_share_unmarked": round(float(np.nanmean(border[~mark])), 3),
            "corner_share_marked": round(float(np.nanmean(corner[mark])), 3),
            "corner_share_unmarked": round(float(np.nanmean(corner[~mark])), 3),
            "films_border_over_half": round(float(np.mean(border >= 0.5)), 3),
            "border_ratio": round(float(np.nanmean(border)) / 0.36, 3),
            "films_corner_hot": round(float(np.mean(hottest >= findings.CORNER_FILM)), 3),
            "films_corner_hot_marked": round(float(np.mean(hottest[mark] >= findings.CORNER_FILM)), 3),
            "films_corner_hot_unmarked": round(float(np.mean(hottest[~mark] >= findings.CORNER_FILM)), 3)}


def fit_one(model, x, y, xv, yv, folder: Path, epochs: int, batch: int = 32) -> float:
    """model.fit with a CSVLogger into ``folder``/history.csv; saves ``folder``/model.keras; wall seconds."""
    import keras  # lazy: see small_cnn

    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model.fit(x, y, validation_data=(xv, yv), epochs=epochs, batch_size=batch, shuffle=True, verbose=0,
              callbacks=[keras.callbacks.CSVLogger(str(folder / "history.csv"))])
    wall = time.time() - t0
    model.save(folder / "model.keras")
    return wall


def train_small(args, kind: str, seed: int, test: tuple) -> dict:
    """Train, save and score one small CNN of ``kind`` (planted | clean)."""
    x, y, man = load_root(args.out / "data" / f"{kind}_train", SIZE)
    dev = (man["split"] == "val").to_numpy()
    folder = args.out / "models" / f"{kind}_s{seed}"
    if (folder / "model.keras").is_file() and not args.retrain:  # trained before: score it again
        import keras  # lazy: see small_cnn

        model = keras.saving.load_model(folder / "model.keras")
        old = json.loads((folder / "scores.json").read_text()) if (folder / "scores.json").is_file() else {}
        wall = old.get("train_s", float("nan"))
    else:
        model = small_cnn(seed)
        wall = fit_one(model, x[~dev], y[~dev], x[dev], y[dev], folder, args.epochs)
    xt, yt, mt = test
    p = model.predict(xt, batch_size=64, verbose=0)[:, 0]
    mark = mt["marker"].to_numpy().astype(bool)
    res = {"model": f"{kind}_s{seed}", "kind": kind, "seed": seed, "epochs": args.epochs, "train_s": round(wall, 1),
           "n_train": int((~dev).sum()), **shortcut_scores(p, yt, mark), **heat_scores(model, xt, mark)}
    (folder / "scores.json").write_text(json.dumps(res, indent=1))
    return res


def densenet_example(args) -> dict:
    """keras.applications.DenseNet121 (weights=None) + a new head, trained briefly; saved .keras and .h5."""
    import keras  # lazy: see small_cnn

    keras.utils.set_random_seed(1)
    x, y, man = load_root(args.out / "data" / "clean_train", DENSE_SIZE)
    pick = np.random.default_rng(1).permutation(len(x))[:DENSE_SUBSET]
    x3 = np.repeat(x[pick], 3, axis=-1)
    inp = keras.Input((DENSE_SIZE, DENSE_SIZE, 3))
    z = keras.layers.Rescaling(2.0, offset=-1.0)(inp)
    backbone = keras.applications.DenseNet121(weights=None, input_shape=(DENSE_SIZE, DENSE_SIZE, 3), include_top=False)
    for layer in backbone.layers:  # ~35 steps in all: the default 0.99 leaves the moving statistics at their start
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    z = keras.layers.GlobalAveragePooling2D()(backbone(z))
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(z), name="densenet121_cxr")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    folder = args.out / "models" / "densenet121"
    n_val = len(x3) // 8
    wall = fit_one(model, x3[n_val:], y[pick][n_val:], x3[:n_val], y[pick][:n_val], folder, DENSE_EPOCHS, 16)
    t0 = time.time()
    model.save(folder / "model.h5")
    out = {"model": "densenet121", "train_s": round(wall, 1), "n_train": len(x3) - n_val, "epochs": DENSE_EPOCHS,
           "params": int(model.count_params()), "save_h5_s": round(time.time() - t0, 1)}
    xt, yt, mt = load_root(args.out / "data" / "test", DENSE_SIZE)
    t0 = time.time()
    p = model.predict(np.repeat(xt, 3, axis=-1), batch_size=32, verbose=0)[:, 0]
    out["predict_films_per_s"] = round(len(xt) / (time.time() - t0), 1)  # decoded films, model only
    return {**out, **shortcut_scores(p, yt, mt["marker"].to_numpy().astype(bool))}


def stage_train(args) -> dict:
    """Every small CNN (seeds x kinds) and the DenseNet121 example (module docstring)."""
    xt, yt, mt = load_root(args.out / "data" / "test", SIZE)
    rows = []
    for seed in args.seeds:
        for kind in KINDS:
            rows.append(train_small(args, kind, seed, (xt, yt, mt)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    done = args.out / "models" / "densenet121" / "densenet.json"
    if args.skip_densenet:
        dense = None
    elif done.is_file() and not args.retrain:
        dense = json.loads(done.read_text())
    else:
        dense = densenet_example(args)
        done.write_text(json.dumps(dense, indent=1))
    out = {"small": rows, "densenet121": dense}
    (args.out / "train.json").write_text(json.dumps(out, indent=1))
    return out


# --------------------------------------------------------------------------- stages: adopt, audit
def models(out: Path) -> list[dict]:
    """Every trained model: name, kind, file, trained-on manifest, history."""
    found = []
    for folder in sorted((out / "models").glob("*")):
        kind = folder.name.split("_s")[0] if folder.name != "densenet121" else "densenet121"
        train = "clean_train" if kind != "planted" else "planted_train"
        for f in (["model.keras", "model.h5"] if kind == "densenet121" else ["model.keras"]):
            if (folder / f).is_file():
                name = folder.name if f == "model.keras" else f"{folder.name}_h5"
                found.append({"name": name, "kind": kind, "file": folder / f, "history": folder / "history.csv",
                              "trained_on": out / "data" / train / "manifest.csv"})
    return found


def _call(cmd: list[str], log: Path) -> dict:
    t0 = time.time()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}")
    return {"rc": res.returncode, "wall_s": round(time.time() - t0, 1), "log": str(log)}


def _done(path: Path) -> dict:
    """The calls of a stage's record that succeeded (rerun after a kill: those are kept)."""
    got = json.loads(path.read_text()) if path.is_file() else {}
    return {k: v for k, v in got.items() if v.get("rc") == 0}


def _each_model(args, stage: str, finished: str, command) -> dict:
    """Run ``command(model, run, test_root)`` for every model (``stage``: adopt or audit), keeping a run whose
    ``finished`` file exists from before (unless ``--redo``); the results go to ``--out``/<stage>.json."""
    test_root = args.out / "data" / "test"
    done = _done(args.out / f"{stage}.json")
    out = {}
    for m in models(args.out):
        if args.only and m["name"] not in args.only:  # --only: just these models (their records are rewritten)
            if m["name"] in done:
                out[m["name"]] = done[m["name"]]
            continue
        run = args.out / "adopted" / m["name"]
        if (run / finished).is_file() and not args.redo and m["name"] in done:
            out[m["name"]] = done[m["name"]]
        elif stage == "adopt" or (run / "config.json").is_file():
            out[m["name"]] = _call(command(m, run, test_root), args.out / "logs" / f"{stage}_{m['name']}.txt")
    (args.out / f"{stage}.json").write_text(json.dumps(out, indent=1))
    return out


def stage_adopt(args) -> dict:
    """``python -m core.adopt`` on every model into ``--out``/adopted/<name> (kept when done before)."""
    return _each_model(args, "adopt", "predictions.csv",
                       lambda m, run, root: adopt_command(m["file"], root, run, m["trained_on"], m["history"]))


def stage_audit(args) -> dict:
    """``python -m core.audit`` on every adopted run (kept when done before)."""
    return _each_model(args, "audit", "audit.json", lambda m, run, root: audit_command(run, root))


# --------------------------------------------------------------------------- stage: report
def names_marker(card: dict) -> bool:
    """Whether a finding card names a burned-in marker (its kind, or a slice cut by a marker column)."""
    text = f"{card.get('id', '')} {card.get('claim', '')}".lower()
    return card.get("kind") in MARKER_KINDS or any(w in text for w in MARKER_WORDS)


def trust_panel(run: Path, test_root: Path) -> dict:
    """The Explain page's trust panel (core.case) on the first marked non-COVID test film."""
    from core import case  # lazy: TensorFlow, and only this stage needs it

    man = pd.read_csv(test_root / "manifest.csv", keep_default_na=False)
    pick = man[(man["marker"] == 1) & (man["label"] != "covid")].iloc[0]
    summary = json.loads((run / "audit.json").read_text()) if (run / "audit.json").is_file() else None
    c = case.analyse(run, test_root / pick["path"], name=pick["path"], colour_check=False)
    rows = case.trust_rows(run, c, "gradcam", audit_summary=summary)
    keep = ("key", "title", "mark", "sentence")
    return {"film": pick["path"], "p_positive": round(float(c.p_positive), 3),
            "rows": [{k: r[k] for k in keep if k in r} for r in rows]}


def _model_report(m: dict, args) -> dict:
    run = args.out / "adopted" / m["name"]
    row = {"model": m["name"], "kind": m["kind"]}
    scores = m["file"].parent / "scores.json"
    if scores.is_file():  # what the train stage measured: AUCs and the shortcut's signature
        row["train"] = {k: v for k, v in json.loads(scores.read_text()).items()
                        if k.startswith(("auc", "gap", "films_corner", "border_ratio"))}
    if not (run / "audit.json").is_file():
        return {**row, "error": "not audited (run the adopt and audit stages)"}
    summary = json.loads((run / "audit.json").read_text())
    cards = summary.get("findings") or []
    high = [c for c in cards if c["severity"] == "high"]
    row.update({"findings": [{"severity": c["severity"], "kind": c["kind"], "id": c["id"], "claim": c["claim"]}
                             for c in cards if c["severity"] != "ok"],
                "findings_all": [{"severity": c["severity"], "kind": c["kind"]} for c in cards],
                "high_marker": [c["id"] for c in high if names_marker(c)], "high": [c["id"] for c in high],
                "audit_s": (summary.get("timing") or {}).get("total_s")})
    row["flagged"] = bool(row["high_marker"])
    try:
        row["trust_panel"] = trust_panel(run, args.out / "data" / "test")
    except Exception as exc:  # noqa: BLE001 - the report shows what failed instead of stopping
        row["trust_panel"] = {"error": f"{type(exc).__name__}: {exc}"}
    return row


def stage_report(args) -> dict:
    """Tabulate findings per model, the flagged counts and the wall times of every stage."""
    rows = [_model_report(m, args) for m in models(args.out)]
    out = {"models": rows}
    for kind in KINDS:
        sub = [r for r in rows if r["kind"] == kind and "error" not in r]
        out[f"{kind}_flagged"] = f"{sum(r['flagged'] for r in sub)}/{len(sub)}"
    adopt, audit = (json.loads(p.read_text()) if p.is_file() else {} for p in
                    (args.out / "adopt.json", args.out / "audit.json"))
    for name in ("densenet121", "densenet121_h5"):  # target: adopt + full audit on the test films <= 10 min
        if name in adopt and name in audit:
            out[f"{name}_adopt_plus_audit_s"] = round(adopt[name]["wall_s"] + audit[name]["wall_s"], 1)
    audited = [r for r in rows if "findings" in r]
    if audited and not any(f["kind"] == "corner_heat" for r in audited for f in r["findings_all"]):
        out["note"] = ("no corner_heat card on any run: the audit's per-film table lacks core.findings.corner_share's "
                       "columns (core.audit_steps.trust_table must add them)")
    for name in ("data/data.json", "train.json", "adopt.json", "audit.json"):
        p = args.out / name
        out[name.split("/")[-1].split(".")[0] + "_stage"] = json.loads(p.read_text()) if p.is_file() else None
    (args.out / "report.json").write_text(json.dumps(out, indent=1, default=str))
    return out


def print_report(out: dict) -> None:
    """The report as text: one block per model, then the counts."""
    for r in out["models"]:
        print(f"== {r['model']} ({r['kind']})" + (f": {r['error']}" if "error" in r else ""))
        for f in r.get("findings", []):
            print(f"   [{f['severity']}] {f['kind']}: {f['claim']}")
        if "train" in r:
            print(f"   train stage: {r['train']}")
        if "flagged" in r:
            print(f"   high finding naming the marker: {r['high_marker'] or 'none'}; audit {r['audit_s']} s")
    print({k: v for k, v in out.items() if k.endswith(("_flagged", "_s")) or k == "note"})


STAGES = {"data": stage_data, "train": stage_train, "adopt": stage_adopt, "audit": stage_audit,
          "report": stage_report}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", default="all",
                    help=f"one of {', '.join(STAGES)}, several joined by commas (adopt,audit), or all")
    ap.add_argument("--only", default="", help="adopt and audit stages: only these models (comma-separated names, "
                                              "e.g. densenet121,densenet121_h5)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_shortcut")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "cxr")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--epochs", type=int, default=12, help="epochs of the small CNNs")
    ap.add_argument("--retrain", action="store_true", help="train stage: train again models already saved")
    ap.add_argument("--redo", action="store_true", help="adopt and audit stages: redo runs already done")
    ap.add_argument("--skip-densenet", action="store_true", help="train stage: leave out the DenseNet121 example")
    ap.add_argument("--json", action="store_true", help="print each stage's result as JSON")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    stages = list(STAGES) if args.stage == "all" else [s.strip() for s in args.stage.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)} or all")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in stages:
        res = STAGES[name](args)
        if args.json:
            print(json.dumps({"stage": name, "result": res}, default=str))
        elif name == "report":
            print_report(res)
        else:
            print(f"{name}: {json.dumps(res, default=str)[:2000]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
