"""``python -m core.data audit|split|download``: look at the data before trusting a model.

* ``audit``    counts per source x label x split, views, age groups, dropped rows, duplicates,
               and warnings when a label is confounded with a source (a model can then learn
               the source instead of the disease).
* ``split``    writes a patient-level split file (CSV) for reproducible runs.
* ``download`` fetches the public sources into their upstream layouts, with a progress bar,
               resuming interrupted downloads (HTTP Range) and checking sizes, checksums and
               archive integrity.

Every subcommand takes ``--data DIR`` (default ``$CXR_DATA_DIR`` or ``data/``) and ``--json``
(one JSON object on stdout; progress and logs go to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from core import config
from core.datasets import LABELS, abspath
from core.download import DEFAULT_DOWNLOADS, DOWNLOADS, DownloadError, download, log
from core.splits import FRACTIONS, SPLITS, find_duplicates, prepare, save_split


# ----------------------------------------------------------------------------- audit
def _nested(df: pd.DataFrame, keys: list[str]) -> dict:
    """{k1: {k2: ... count}} of a table, keys as strings, sorted."""
    out: dict = {}
    for idx, n in df.groupby(keys, sort=True).size().items():
        idx = idx if isinstance(idx, tuple) else (idx,)
        d = out
        for k in idx[:-1]:
            d = d.setdefault(str(k), {})
        d[str(idx[-1])] = int(n)
    return out


def _header(path: Path) -> str:
    """'FORMAT WxH' from the file header only (no pixel decoding)."""
    try:
        with Image.open(path) as im:
            return f"{im.format} {im.size[0]}x{im.size[1]}"
    except Exception:
        return path.suffix.lower().lstrip(".") or "unknown"


def _lookup_auc(keys: Sequence[str], y: np.ndarray, folds: int = 5, seed: int = 0) -> float | None:
    """Cross-validated ROC AUC of predicting y from a categorical key alone.

    Each row is scored with P(y=1 | key) estimated on the other folds (the overall rate for a
    key never seen there), so keys unique to one image cannot simply be memorised.
    """
    # lazy: sklearn costs ~1.1 s; `python -m core.data --help` takes 0.5 s without it
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, dtype=float)
    if len(set(y)) < 2 or len(y) < folds:
        return None
    keys = np.asarray(list(keys), dtype=object)
    fold = np.random.default_rng(seed).permutation(len(y)) % folds
    score = np.empty(len(y))
    for k in range(folds):
        tr, te = fold != k, fold == k
        rate = pd.Series(y[tr]).groupby(keys[tr]).mean()
        score[te] = pd.Series(keys[te]).map(rate).fillna(y[tr].mean()).to_numpy()
    return round(float(roc_auc_score(y, score)), 4)


def confounding(table: pd.DataFrame) -> tuple[list[str], dict]:
    """Warnings about labels confounded with source or age group, and how well shortcuts predict.

    Returns ``(warnings, predictability)``; predictability holds cross-validated ROC AUCs for "is it
    covid?" from the source alone, and from the file format and pixel size alone (read from the
    headers). An AUC near 1 means a model can score well without looking at the lungs.
    """
    warnings = []
    for label in LABELS:
        srcs = table.loc[table["label"] == label, "source"].value_counts()
        if len(srcs) == 1:
            warnings.append(
                f"every {label} image ({int(srcs.iloc[0])}) comes from one source, {srcs.index[0]}: "
                f"label and source are confounded, so a model can learn the source instead of {label}; "
                "judge it by within-source AUC and on a held-out source"
            )
    for src, labels in table.groupby("source")["label"].unique().items():
        if len(labels) == 1 and table["source"].nunique() > 1:
            warnings.append(f"source {src} holds only {labels[0]} images: its label is predictable from the source")
    by_label = {lb: set(table.loc[table["label"] == lb, "source"]) for lb in LABELS}
    for i, a in enumerate(LABELS):
        for b in LABELS[i + 1:]:
            if by_label[a] and by_label[b] and not by_label[a] & by_label[b]:
                warnings.append(
                    f"no source holds both {a} and {b} images ({a}: {', '.join(sorted(by_label[a]))}; "
                    f"{b}: {', '.join(sorted(by_label[b]))}): {a} vs {b} can be told apart by the source alone"
                )
    known = table[table["age_group"] != "unknown"]
    share = pd.crosstab(known["label"], known["age_group"], normalize="index") if len(known) else pd.DataFrame()
    for a in share.index:
        for g in share.columns:
            if share.loc[a, g] == 1.0:
                for b in share.index:
                    if b != a and share.loc[b, g] < 0.05:
                        warnings.append(
                            f"all {a} images of known age are {g}, but only {share.loc[b, g]:.0%} of {b} images are: "
                            f"age separates {a} from {b}"
                        )
    y = (table["label"] == "covid").to_numpy().astype(int)
    pred = {"covid_auc_from_source": _lookup_auc(table["source"].tolist(), y)}
    root = table.attrs.get("root")
    if root is not None:
        heads = [_header(abspath(root, p)) for p in table["path"]]
        pred["covid_auc_from_format_and_size"] = _lookup_auc(heads, y)
        pred["distinct_format_sizes"] = len(set(heads))
    pred["note"] = (
        "5-fold cross-validated ROC AUC of 'covid vs not' predicted from that property alone "
        "(0.5 = no shortcut, 1.0 = the property gives the label away)"
    )
    for key, what in (("covid_auc_from_source", "the source alone"),
                      ("covid_auc_from_format_and_size", "the file format and pixel size alone")):
        v = pred.get(key)
        if v is not None and v >= 0.8:
            warnings.append(f"covid vs not is predicted from {what} with ROC AUC {v:.2f} (cross-validated): "
                            "a model can score that high without looking at the lungs")
    return warnings, pred


def leak_check(table: pd.DataFrame, duplicates: Sequence[dict]) -> dict:
    """Patients and duplicate pairs that cross splits (both must be zero for an honest test set)."""
    per_patient = table.groupby("patient_id")["split"].nunique()
    where = dict(zip(table["path"], table["split"], strict=True))
    crossing = [d for d in duplicates if d["path_a"] in where and d["path_b"] in where
                and where[d["path_a"]] != where[d["path_b"]]]
    out = {"patients_across_splits": int((per_patient > 1).sum()), "duplicates_across_splits": len(crossing),
           "warnings": []}
    if out["patients_across_splits"]:
        out["warnings"].append(f"{out['patients_across_splits']} patient(s) have images in more than one split: "
                               "test results are optimistic")
    if crossing:
        out["warnings"].append(f"{len(crossing)} duplicate image pair(s) cross splits "
                               f"(e.g. {crossing[0]['path_a']} ~ {crossing[0]['path_b']}): test results are optimistic")
    return out


def audit(root: str | os.PathLike, seed: int = config.SEED, split_file: str | os.PathLike | None = None,
          near: bool = True, progress: bool = False, label_map: dict[str, str] | None = None) -> dict:
    """The dataset audit as a JSON-ready dict (see the module docstring).

    Keys: counts, by_source, by_split, by_source_label_split, patients_by_source,
    patients_linked_across_sources, views, age_groups, sexes, dropped, duplicates {exact, near,
    pairs}, leaks, unreadable, sources_found, warnings, source_predictability.
    """
    root = Path(root)
    table = prepare(root, seed=seed, split_file=split_file, near=near, progress=progress, label_map=label_map)
    table.attrs["root"] = root
    if "duplicates" not in table.attrs:  # an existing split file: check it for leaks
        table.attrs["duplicates"] = find_duplicates(table, root, near=near, progress=progress).to_dict("records")
    dups = table.attrs["duplicates"]
    warnings, pred = confounding(table)
    leaks = leak_check(table, dups)
    warnings += leaks["warnings"]
    return {
        "data": str(root),
        "seed": int(seed),
        "split_file": str(split_file) if split_file else None,
        "n_images": int(len(table)),
        "n_patients": int(table["patient_id"].nunique()),
        "counts": {label: int((table["label"] == label).sum()) for label in LABELS},
        "by_source": _nested(table, ["source", "label"]),
        "by_split": {s: _nested(table[table["split"] == s], ["label"]) for s in SPLITS},
        "by_source_label_split": _nested(table, ["source", "label", "split"]),
        "patients_by_source": {str(k): int(v) for k, v in table.groupby("source")["patient_id"].nunique().items()},
        "patients_linked_across_sources": int(table.attrs.get("linked_patients", 0)),
        "views": _nested(table, ["source", "view"]),
        "age_groups": _nested(table, ["source", "age_group"]),
        "sexes": _nested(table, ["source", "sex"]) if "sex" in table.columns else {},
        "dropped": dict(sorted(table.attrs.get("dropped", {}).items())),
        "duplicates": {
            "exact": sum(d["kind"] == "exact" for d in dups),
            "near": sum(d["kind"] == "near" for d in dups),
            "pairs": dups,
        },
        "leaks": {k: v for k, v in leaks.items() if k != "warnings"},
        "unreadable": table.attrs.get("unreadable", {}),
        "sources_found": table.attrs.get("sources", []),
        "warnings": warnings,
        "source_predictability": pred,
    }


def format_audit(rep: dict) -> str:
    """A plain-text rendering of :func:`audit` for the terminal."""
    lines = [f"Data: {rep['data']}   images: {rep['n_images']}   patients: {rep['n_patients']}   seed: {rep['seed']}"]
    lines.append("Counts: " + ", ".join(f"{k} {v}" for k, v in rep["counts"].items()))
    lines.append("")
    lines.append(f"{'source':<12}{'label':<11}" + "".join(f"{s:>7}" for s in SPLITS) + f"{'total':>7}")
    for src, labels in rep["by_source_label_split"].items():
        for label, splits in labels.items():
            row = [splits.get(s, 0) for s in SPLITS]
            lines.append(f"{src:<12}{label:<11}" + "".join(f"{n:>7}" for n in row) + f"{sum(row):>7}")
    tot = [sum(rep["by_split"][s].values()) for s in SPLITS]
    lines.append(f"{'all':<23}" + "".join(f"{n:>7}" for n in tot) + f"{sum(tot):>7}")
    lines.append("")
    lines.append("Views:      " + "; ".join(f"{s}: " + ", ".join(f"{k} {v}" for k, v in d.items()) for s, d in rep["views"].items()))
    lines.append("Age groups: " + "; ".join(f"{s}: " + ", ".join(f"{k} {v}" for k, v in d.items()) for s, d in rep["age_groups"].items()))
    lines.append("Sex:        " + "; ".join(f"{s}: " + ", ".join(f"{k} {v}" for k, v in d.items()) for s, d in rep["sexes"].items()))
    if rep["patients_linked_across_sources"]:
        lines.append(f"Linked:     {rep['patients_linked_across_sources']} patients have films in two sources "
                     "(one patient id, one split group)")
    lines.append("Dropped:    " + (", ".join(f"{k}: {v}" for k, v in rep["dropped"].items()) or "none"))
    d = rep["duplicates"]
    lines.append(f"Duplicates: {d['exact']} exact (dropped from fresh splits), {d['near']} near (kept in one split)")
    lk = rep["leaks"]
    lines.append(f"Leaks:      {lk['patients_across_splits']} patients and {lk['duplicates_across_splits']} "
                 "duplicate pairs cross splits")
    for p in d["pairs"][:20]:
        lines.append(f"  {p['kind']:<5} {p['score']:.3f}  {p['path_a']}  ~  {p['path_b']}")
    if rep["unreadable"]:
        lines.append(f"Unreadable (dropped): {len(rep['unreadable'])}")
    pred = rep["source_predictability"]
    lines.append(
        "Shortcuts:  covid AUC from source alone "
        f"{pred.get('covid_auc_from_source')}, from file format+size alone {pred.get('covid_auc_from_format_and_size')}"
    )
    for w in rep["warnings"]:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def _label_map(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(","):
        folder, sep, label = item.partition("=")
        if not sep or label.strip() not in LABELS:
            raise argparse.ArgumentTypeError(f"{item!r}: expected FOLDER=LABEL with LABEL one of {', '.join(LABELS)}")
        out[folder.strip()] = label.strip()
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data", help="data root (default: $CXR_DATA_DIR, else data/ in the repo)")
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    a = sub.add_parser("audit", help="counts per source x label x split, duplicates, confounding warnings")
    common(a)
    a.add_argument("--seed", type=int, default=config.SEED, help=f"split seed (default {config.SEED})")
    a.add_argument("--split", help="audit an existing split file instead of a fresh split")
    a.add_argument("--no-near", action="store_true", help="skip the near-duplicate check (no image decoding)")
    a.add_argument("--label-map", type=_label_map, metavar="FOLDER=LABEL,...",
                   help="class-folder names for your own folder-per-class data, e.g. 'COVID=covid,Healthy=normal'")

    s = sub.add_parser("split", help="write a patient-level, label-stratified split file")
    common(s)
    s.add_argument("--out", required=True, help="split CSV to write")
    s.add_argument("--seed", type=int, default=config.SEED, help=f"split seed (default {config.SEED})")
    s.add_argument("--fractions", type=float, nargs=3, default=FRACTIONS, metavar=("TRAIN", "VAL", "TEST"),
                   help="split fractions (default 0.7 0.1 0.2)")
    s.add_argument("--no-near", action="store_true", help="skip the near-duplicate check (no image decoding)")
    s.add_argument("--label-map", type=_label_map, metavar="FOLDER=LABEL,...",
                   help="class-folder names for your own folder-per-class data, e.g. 'COVID=covid,Healthy=normal'")

    d = sub.add_parser("download", help="fetch the public sources into their upstream layouts")
    d.add_argument("--to", help="target folder (default: --data, $CXR_DATA_DIR or data/)")
    d.add_argument("--data", help=argparse.SUPPRESS)
    d.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    d.add_argument("--sources", default=",".join(DEFAULT_DOWNLOADS),
                   help=f"comma-separated, from {','.join(DOWNLOADS)} (default {','.join(DEFAULT_DOWNLOADS)})")
    for name, spec in DOWNLOADS.items():
        d.add_argument(f"--{name}-url", help=f"override the {name} URL (env {spec['env']})")
        d.add_argument(f"--{name}-sha256", help=f"expected sha256 of the {name} archive")
    d.add_argument("--force", action="store_true", help="download again even if already present")
    d.add_argument("--keep-archives", action="store_true", help="keep the downloaded archives")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "audit":
            root = config.data_dir(args.data)
            t0 = time.perf_counter()
            rep = audit(root, seed=args.seed, split_file=args.split, near=not args.no_near, progress=not args.json,
                        label_map=args.label_map)
            rep["seconds"] = round(time.perf_counter() - t0, 2)
            print(json.dumps(rep, indent=1) if args.json else format_audit(rep))
        elif args.cmd == "split":
            root = config.data_dir(args.data)
            table = prepare(root, seed=args.seed, fractions=args.fractions, near=not args.no_near,
                            progress=not args.json, label_map=args.label_map)
            out = save_split(table, args.out)
            summary = {"split_file": str(out), "seed": args.seed, "n_images": len(table),
                       "by_split": {s: int((table["split"] == s).sum()) for s in SPLITS},
                       "dropped": table.attrs.get("dropped", {})}
            if args.json:
                print(json.dumps(summary, indent=1))
            else:
                print(f"wrote {out}: " + ", ".join(f"{s} {n}" for s, n in summary["by_split"].items()))
        else:
            to = Path(args.to).expanduser().resolve() if args.to else config.data_dir(args.data)
            names = [s.strip() for s in args.sources.split(",") if s.strip()]
            urls = {n: getattr(args, f"{n}_url") for n in DOWNLOADS if getattr(args, f"{n}_url")}
            sums = {n: getattr(args, f"{n}_sha256") for n in DOWNLOADS if getattr(args, f"{n}_sha256")}
            summary = download(to, names, urls=urls, sha256=sums, force=args.force,
                               keep_archives=args.keep_archives, progress=True)
            if args.json:
                print(json.dumps(summary, indent=1))
            else:
                for n, info in summary["sources"].items():
                    print(f"{n}: {info['status']} ({info.get('files', '?')} files) in {to / DOWNLOADS[n]['dest']}")
    except (FileNotFoundError, ValueError, DownloadError) as exc:
        log(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        log("interrupted; run the same command again to resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
