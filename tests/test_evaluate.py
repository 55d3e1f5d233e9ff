"""core.evaluate on synthetic run folders (known answers) and, when available, a real tiny run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core import evaluate, metrics, runs, splits

HEADLINE_KEYS = ("roc_auc", "pr_auc", "sensitivity", "specificity", "accuracy", "ppv", "npv", "f1", "ece",
                 "brier", "threshold")


def _rows(rng, source, label, n_patients, split, score, per_patient=1):
    rows = []
    for i in range(n_patients):
        pid = f"{source}:{label}{split}{i}"
        for k in range(per_patient):
            p = float(np.clip(score(rng), 0.001, 0.999))
            rows.append({"path": f"{source}/{label}/{split}{i}_{k}.png", "source": source, "patient_id": pid,
                         "label": label, "class": "covid" if label == "covid" else "other", "split": split,
                         "p_covid": p, "p_other": 1 - p})
    return rows


def shortcut_predictions(seed=0, external=False) -> pd.DataFrame:
    """A 'model' that learned the source: every ieee8023 image scores high, whatever its label."""
    rng = np.random.default_rng(seed)
    high = lambda r: r.uniform(0.6, 1.0)  # noqa: E731
    low = lambda r: r.uniform(0.0, 0.4)  # noqa: E731
    rows = []
    for split, n in (("val", 10), ("test", 20)):
        rows += _rows(rng, "ieee8023", "covid", n, split, high, per_patient=2)
        rows += _rows(rng, "ieee8023", "pneumonia", n // 2, split, high)
        rows += _rows(rng, "kermany", "normal", n, split, low)
        rows += _rows(rng, "nih", "normal", n, split, low)
    if external:  # a held-out normal collection the shortcut does not recognise: scores spread out
        rows += _rows(rng, "padchest", "normal", 30, "external", lambda r: r.uniform(0.0, 1.0))
    return pd.DataFrame(rows)


def make_run(tmp_path, pred: pd.DataFrame, task="binary", name="run"):
    run = tmp_path / name
    run.mkdir()
    classes = ["covid", "other"] if task == "binary" else ["covid", "normal", "pneumonia"]
    runs.write_json(run / "config.json", {"task": task, "classes": classes, "size": 64, "seed": 1,
                                          "data_root": str(tmp_path / "nodata")})
    runs.write_csv(run / "predictions.csv", pred)
    return run


def test_metrics_json_keys_and_shortcut_detection(tmp_path):
    run = make_run(tmp_path, shortcut_predictions())
    r = evaluate.evaluate_run(run, n_boot=300)
    saved = json.loads((run / "metrics.json").read_text())  # strict JSON: NaN written as null
    for k in HEADLINE_KEYS:
        assert set(saved[k]) >= {"value", "ci_low", "ci_high"}, k
        assert saved[k]["ci_low"] <= saved[k]["value"] <= saved[k]["ci_high"], k
    for k in ("confusion", "calibration", "per_source", "within_source", "n_test", "n_patients", "task", "classes"):
        assert k in saved, k
    assert saved["task"] == "binary" and saved["classes"] == ["covid", "other"]
    test = shortcut_predictions()
    test = test[test["split"] == "test"]
    assert saved["n_test"] == len(test) == 90
    assert saved["n_patients"] == test["patient_id"].nunique() == 70
    assert np.array(saved["confusion"]).sum() == 90
    # Internal AUC is high, within ieee8023 the scores say nothing: the shortcut is flagged.
    assert r["roc_auc"]["value"] > 0.85
    assert list(saved["within_source"]) == ["ieee8023"]
    w = saved["within_source"]["ieee8023"]
    assert w["n"] == 50 and w["n_covid"] == 40
    assert w["roc_auc"]["ci_low"] < 0.5 + 0.25 and abs(w["roc_auc"]["value"] - 0.5) < 0.25
    assert any("collection" in m for m in saved["warnings"])
    # Single-class sources get per-source numbers but NaN AUC with a reason, saved as null.
    assert saved["per_source"]["kermany"]["roc_auc"]["value"] is None
    assert "both classes" in saved["per_source"]["kermany"]["roc_auc"]["reason"]
    assert saved["per_source"]["kermany"]["specificity"]["value"] == 1.0


def test_threshold_is_chosen_on_val_not_test(tmp_path):
    pred = shortcut_predictions(seed=1)
    run = make_run(tmp_path, pred)
    r = evaluate.evaluate_run(run, n_boot=100, target_sensitivity=0.95)
    val = pred[pred["split"] == "val"]
    y_val = (val["label"] == "covid").astype(int)
    assert r["threshold"]["value"] == metrics.choose_threshold(y_val, val["p_covid"], "sensitivity", 0.95)
    assert r["threshold"]["chosen_on"] == "val" and r["threshold"]["val_sensitivity"] >= 0.95
    # Changing only test scores leaves the threshold alone.
    pred2 = pred.copy()
    pred2.loc[pred2["split"] == "test", "p_covid"] = 0.5
    r2 = evaluate.evaluate_predictions(pred2, n_boot=100)
    assert r2["threshold"]["value"] == r["threshold"]["value"]


def test_external_split_reports_specificity_and_auc_against_in_source(tmp_path):
    run = make_run(tmp_path, shortcut_predictions(seed=2, external=True))
    r = evaluate.evaluate_run(run, n_boot=200)
    ext = r["external"]
    assert ext["sources"] == ["padchest"] and ext["n"] == 30 and ext["n_covid"] == 0
    assert ext["specificity"]["value"] < r["specificity"]["value"]
    assert ext["roc_auc"]["value"] < r["roc_auc"]["value"]
    assert "external non-covid" in ext["roc_auc_definition"]
    assert ext["delta"]["specificity"] == pytest.approx(ext["specificity"]["value"] - r["specificity"]["value"])
    assert ext["in_source"]["roc_auc"] == r["roc_auc"]
    assert any("padchest" in w for w in r["warnings"])
    # The external rows never count as test rows.
    assert r["n_test"] == 90


def test_cli_json_prints_one_object_and_writes_metrics(tmp_path, capsys):
    run = make_run(tmp_path, shortcut_predictions(seed=3))
    assert evaluate.main(["--run", str(run), "--json", "--n-boot", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["roc_auc"]["value"] > 0.8 and (run / "metrics.json").exists()
    assert evaluate.main(["--run", str(run), "--n-boot", "50", "--no-write"]) == 0
    text = capsys.readouterr().out
    assert "Within-source AUC" in text and "WARNING" in text and "chosen on validation" in text


def test_cli_several_runs_reports_seed_spread(tmp_path, capsys):
    a = make_run(tmp_path, shortcut_predictions(seed=4), name="a")
    b = make_run(tmp_path, shortcut_predictions(seed=5), name="b")
    assert evaluate.main(["--run", str(a), "--run", str(b), "--json", "--n-boot", "50", "--no-write"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["runs"]) == 2
    s = out["spread"]["roc_auc"]
    vals = [x["roc_auc"]["value"] for x in out["runs"]]
    assert s["n"] == 2 and s["mean"] == pytest.approx(np.mean(vals)) and s["sd"] == pytest.approx(np.std(vals, ddof=1))
    assert "ieee8023" in out["spread"]["within_source_roc_auc"]
    assert not (a / "metrics.json").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert evaluate.main(["--run", str(tmp_path / "missing"), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err
    run = make_run(tmp_path, shortcut_predictions().drop(columns=["source"]))
    assert evaluate.main(["--run", str(run)]) == 2
    assert "source" in capsys.readouterr().err


def test_multiclass_run_gets_binary_view_and_multiclass_block(tmp_path):
    rng = np.random.default_rng(6)
    pred = shortcut_predictions(seed=6)
    labels = pred["label"].to_numpy()
    logits = rng.normal(size=(len(pred), 3)) + 2 * np.eye(3)[pd.Series(labels).map(
        {"covid": 0, "normal": 1, "pneumonia": 2}).to_numpy()]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = pred.drop(columns=["p_covid", "p_other"]).assign(
        **{"class": labels, "p_covid": probs[:, 0], "p_normal": probs[:, 1], "p_pneumonia": probs[:, 2]})
    run = make_run(tmp_path, pred, task="multiclass")
    r = evaluate.evaluate_run(run, n_boot=100)
    assert r["classes"] == ["covid", "normal", "pneumonia"]
    assert set(r["multiclass"]["per_class"]) == {"covid", "normal", "pneumonia"}
    assert r["roc_auc"]["value"] == pytest.approx(r["multiclass"]["per_class"]["covid"]["roc_auc"]["value"])


def test_no_val_rows_falls_back_with_warning(tmp_path):
    pred = shortcut_predictions(seed=7)
    run = make_run(tmp_path, pred[pred["split"] == "test"])
    r = evaluate.evaluate_run(run, n_boot=50, write=False)
    assert r["threshold"]["value"] == 0.5 and any("fell back" in w for w in r["warnings"])


def test_jsonable_handles_nan_numpy_and_paths(tmp_path):
    out = evaluate.jsonable({"a": float("nan"), "b": np.float32(1.5), "c": [np.int64(2), np.inf], "d": tmp_path})
    assert out == {"a": None, "b": 1.5, "c": [2, None], "d": str(tmp_path)}
    json.dumps(out, allow_nan=False)


# ----------------------------------------------------------------------------- real tiny run


@pytest.mark.slow
def test_real_tiny_run_internal_and_external(tiny_run, cxr_root, tmp_path):
    run = tiny_run
    r = evaluate.evaluate_run(run, n_boot=200, write=False)
    assert r["n_test"] > 0
    test = runs.read_predictions(run).query("split == 'test'")
    if test["label"].eq("covid").any() and test["label"].ne("covid").any():
        assert 0 <= r["roc_auc"]["value"] <= 1
    else:  # one class only: an AUC that is undefined must say so, not pass as a number
        assert math.isnan(r["roc_auc"]["value"]) and r["roc_auc"]["reason"]
    # External validation: a data root holding images the run never saw (kermany images not in split.csv).
    seen = runs.read_split(run)
    from core import datasets

    table = datasets.load_table(cxr_root, sources=["kermany"])
    seen_patients = set(seen["patient_id"].astype(str)) if "patient_id" in seen.columns else set()
    unseen = table[~table["path"].isin(set(seen["path"])) & ~table["patient_id"].isin(seen_patients)].head(12)
    assert not unseen.empty, "the tiny run (5 images per cell) cannot have seen every kermany image"
    root = tmp_path / "other"
    for rel in unseen["path"]:
        dst = root / "NORMAL" if "NORMAL" in rel.upper() else root / "PNEUMONIA"
        dst.mkdir(parents=True, exist_ok=True)
        (dst / rel.rsplit("/", 1)[-1]).symlink_to(datasets.abspath(cxr_root, rel))
    ext = evaluate.evaluate_run(run, data=root, n_boot=100, write=True, progress=False)
    assert ext["mode"] == "external" and ext["n"] == len(unseen)
    assert ext["threshold"]["value"] == r["threshold"]["value"]  # no re-tuning
    assert "specificity" in ext["delta"]
    assert (run / f"external-{root.name}.json").exists()


def _fake_run_on(cxr_root, tmp_path, sources):
    """A run folder whose split.csv lists every image of ``sources`` of the real data (no model)."""
    from core import datasets

    table = datasets.load_table(cxr_root)
    listed = table[table["source"].isin(sources)].assign(split="train")
    run = tmp_path / "fake"
    run.mkdir()
    runs.write_json(run / "config.json", {"task": "binary", "data_root": str(cxr_root)})
    runs.write_csv(run / "split.csv", listed[["path", "split", "label", "source", "patient_id"]])
    return run, table


def test_unseen_images_same_root_means_unseen_sources(cxr_root, tmp_path):
    run, table = _fake_run_on(cxr_root, tmp_path, ["ieee8023", "kermany"])
    unseen, excluded = evaluate.unseen_images(run, cxr_root)
    # hannover films of the 15 patients who also have ieee8023 films were seen as those patients
    hann = table[table["source"] == "hannover"]
    linked = hann["patient_id"].str.contains(r"\+ieee8023:")
    assert 0 < linked.sum() < len(hann)
    assert set(unseen["source"]) == {"nih", "hannover"}
    assert set(unseen["path"]) == set(table.loc[table["source"] == "nih", "path"]) | set(hann.loc[~linked, "path"])
    assert excluded == {"source the run trained on (same data root)": int(table["source"].isin(["ieee8023", "kermany"]).sum()),
                        "patient seen by the run": int(linked.sum())}


def test_bootstrap_resamples_split_groups_not_patient_ids(tmp_path):
    pred = shortcut_predictions()
    run = make_run(tmp_path, pred)
    plain = evaluate.evaluate_run(run, n_boot=200, write=False)
    test = pred[pred["split"] == "test"]
    assert plain["n_patients"] == test["patient_id"].nunique()
    # The split merged every kermany test patient into one group (e.g. joined by exact copies):
    # that group is one resampling unit, drawn or not as a whole.
    split = pred[["path", "split", "label", "source", "patient_id"]].assign(group=pred["patient_id"])
    split.loc[(split["source"] == "kermany") & (split["split"] == "test"), "group"] = "kermany:merged"
    runs.write_csv(run / "split.csv", split)
    r = evaluate.evaluate_run(run, n_boot=200, write=False)
    assert r["n_patients"] == split.loc[split["split"] == "test", "group"].nunique() < plain["n_patients"]
    assert r["per_source"]["kermany"]["n_patients"] == 1
    assert r["roc_auc"]["value"] == plain["roc_auc"]["value"]  # same predictions, only the CI unit differs
    g = evaluate._groups(evaluate.with_groups(pred, split))
    assert set(g[(pred["source"] == "kermany") & (pred["split"] == "test")]) == {"kermany:merged"}


def test_unseen_images_other_root_excludes_seen_files_and_patients(cxr_root, tmp_path):
    from core import datasets

    run, table = _fake_run_on(cxr_root, tmp_path, ["kermany"])
    kerm = table[table["source"] == "kermany"]
    # Another collection: 3 kermany files the run saw (renamed copies) + 4 nih files it did not.
    other = tmp_path / "other" / "collection"
    for i, rel in enumerate(kerm["path"].head(3)):
        (other / "normal").mkdir(parents=True, exist_ok=True)
        (other / "normal" / f"copy{i}{Path(rel).suffix}").symlink_to(datasets.abspath(cxr_root, rel))
    for rel in table[table["source"] == "nih"]["path"].head(4):
        (other / "normal" / Path(rel).name).symlink_to(datasets.abspath(cxr_root, rel))
    unseen, excluded = evaluate.unseen_images(run, tmp_path / "other")
    assert len(unseen) == 4
    assert excluded == {"byte-identical to an image of the run": 3}


def reencoded(src: Path, dst: Path, scale: float = 0.7, quality: int = 75) -> Path:
    """A resized (``scale`` of each side), JPEG re-encoded copy of a film: how a public CXR
    usually reappears in another collection (not a symlink, not byte-identical)."""
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("L")
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
        dst.parent.mkdir(parents=True, exist_ok=True)
        im.save(dst, "JPEG", quality=quality)
    return dst


def test_unseen_images_excludes_resized_reencoded_copies(cxr_root, tmp_path):
    from core import datasets

    run, table = _fake_run_on(cxr_root, tmp_path, ["ieee8023", "kermany"])
    other = tmp_path / "other" / "collection"
    copies = {}
    for src in ("ieee8023", "kermany"):
        for rel in table.loc[table["source"] == src, "path"].head(2):
            dst = reencoded(datasets.abspath(cxr_root, rel), other / "covid" / f"{src}-{Path(rel).stem}.jpg")
            copies[f"collection/covid/{dst.name}"] = rel
    nih = table.loc[table["source"] == "nih", "path"].head(4)
    for rel in nih:
        (other / "normal").mkdir(parents=True, exist_ok=True)
        (other / "normal" / Path(rel).name).symlink_to(datasets.abspath(cxr_root, rel))
    unseen, excluded = evaluate.unseen_images(run, tmp_path / "other")
    assert sorted(unseen["path"]) == sorted(f"collection/normal/{Path(r).name}" for r in nih)
    assert excluded == {f"near-duplicate of an image of the run (thumbnail r >= {splits.NEAR_THRESHOLD})": 4}
    found = {p["path"]: p["run_path"] for p in unseen.attrs["near_duplicates"]}
    assert found == copies and all(p["score"] >= splits.NEAR_THRESHOLD for p in unseen.attrs["near_duplicates"])
    assert unseen["group"].tolist() == unseen["patient_id"].tolist()  # no copies among the unseen ones


def test_external_text_and_json_name_the_exclusions():
    r = {"mode": "external", "run": "r", "data": "d", "n": 5, "n_covid": 0, "sources": ["x"],
         "threshold": {"value": 0.5, "target": "sensitivity", "target_value": 0.95},
         "excluded": {"patient seen by the run": 2, "near-duplicate of an image of the run (thumbnail r >= 0.97)": 3}}
    text = evaluate.format_result(r)
    assert "Excluded as seen by the run: 5 (patient seen by the run: 2; near-duplicate" in text


def _seed_run(root: Path, name: str, seed: int, auc: float, **cfg) -> Path:
    run = root / name
    run.mkdir(parents=True)
    runs.write_json(run / "config.json", {"task": "binary", "size": 64, "epochs": 2, "seed": seed, **cfg})
    runs.write_json(run / "metrics.json", {"roc_auc": {"value": auc}, "n_test": 10,
                                          "within_source": {"ieee8023": {"roc_auc": {"value": auc - 0.2}}}})
    return run


def test_seed_runs_are_the_runs_that_differ_only_in_their_seed(tmp_path):
    a = _seed_run(tmp_path, "a", 1, 0.8)
    b = _seed_run(tmp_path, "b", 2, 0.9)
    _seed_run(tmp_path, "other-size", 3, 0.7, size=128)  # another configuration
    no_metrics = tmp_path / "c"
    shutil.copytree(b, no_metrics)
    (no_metrics / "metrics.json").unlink()  # not evaluated: left out
    for name, text in (("d-list", "[1, 2]"), ("e-corrupt", "{"), ("f-classes", '{"classes": "covid"}')):
        bad = tmp_path / name  # malformed siblings are skipped, never break the page of another run
        shutil.copytree(b, bad)
        (bad / "config.json").write_text(text)
    table = evaluate.seed_runs(a, sorted(tmp_path.iterdir()))
    assert table["run"].tolist() == [str(a.resolve()), str(b.resolve())]
    assert table["seed"].tolist() == [1, 2] and table["roc_auc"].tolist() == [0.8, 0.9]
    assert table["within_ieee8023_roc_auc"].tolist() == pytest.approx([0.6, 0.7])
    spread = evaluate.seed_spread([runs.read_metrics(r) for r in table["run"]])
    assert spread["roc_auc"]["n"] == 2 and spread["roc_auc"]["mean"] == pytest.approx(0.85)
    alone = evaluate.seed_runs(a)
    assert alone["run"].tolist() == [str(a.resolve())]
