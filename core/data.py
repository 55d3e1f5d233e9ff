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
import http.client
import json
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from core import config, runs
from core.datasets import LABELS, abspath
from core.splits import FRACTIONS, SPLITS, find_duplicates, prepare, save_split


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    from PIL import Image

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


def audit(
    root: str | os.PathLike,
    seed: int = config.SEED,
    split_file: str | os.PathLike | None = None,
    near: bool = True,
    progress: bool = False,
    label_map: dict[str, str] | None = None,
) -> dict:
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


# ----------------------------------------------------------------------------- download
IEEE8023_COMMIT = "0f7245db6f5aa4001ea75cf69fe6cfe091928403"  # 2020-06-05, as in ../shared/cxr
NIH_COMMIT = "ee3e2cffc0824711bed675275506b26f19be7198"


def _anchor_ieee(names: list[str]) -> tuple[str, Callable[[str], bool]]:
    metas = sorted((n for n in names if n.rsplit("/", 1)[-1] == "metadata.csv"), key=lambda n: n.count("/"))
    if not metas:
        raise ValueError("archive has no metadata.csv (not the ieee8023 covid-chestxray-dataset layout)")
    prefix = metas[0][: -len("metadata.csv")]
    return prefix, lambda rel: True


def _anchor_kermany(names: list[str]) -> tuple[str, Callable[[str], bool]]:
    hits = sorted(
        (n for n in names if "NORMAL/" in n or "PNEUMONIA/" in n), key=lambda n: n.count("/")
    )
    if not hits:
        raise ValueError("archive has no NORMAL/ or PNEUMONIA/ folder (not the Kermany layout)")
    n = hits[0]
    i = min(j for j in (n.find("NORMAL/"), n.find("PNEUMONIA/")) if j >= 0)
    prefix = n[:i]
    parts = prefix.rstrip("/").split("/")
    if parts and parts[-1].lower() in {"train", "test", "val"}:  # chest_xray/train/NORMAL -> chest_xray/
        prefix = "/".join(parts[:-1]) + "/" if len(parts) > 1 else ""
    return prefix, lambda rel: not rel.lower().startswith(("oct", "__macosx"))


def _anchor_nih(names: list[str]) -> tuple[str, Callable[[str], bool]]:
    hits = sorted((n for n in names if "/No_findings/" in "/" + n), key=lambda n: n.count("/"))
    if not hits:
        raise ValueError("archive has no No_findings/ folder (not the NIH subset layout)")
    prefix = hits[0][: ("/" + hits[0]).find("/No_findings/")]
    # Ozturk et al.'s Covid-19/ folder is copied from ieee8023: leave it out
    return prefix, lambda rel: rel.split("/")[0] in {"No_findings", "Pneumonia"}


DOWNLOADS = {
    "ieee8023": {
        "url": f"https://github.com/ieee8023/covid-chestxray-dataset/archive/{IEEE8023_COMMIT}.zip",
        "env": "CXR_IEEE8023_URL",
        "dest": "ieee8023",
        "anchor": _anchor_ieee,
        "about": "ieee8023 covid-chestxray-dataset, GitHub archive of commit " + IEEE8023_COMMIT[:8] + " (~580 MB)",
    },
    "kermany": {
        # Mendeley Data record 10.17632/rscbjbr9sj.2, file ChestXRay2017.zip (~1.2 GB)
        "url": "https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/"
        "f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded",
        "env": "CXR_KERMANY_URL",
        "dest": "kermany",
        "anchor": _anchor_kermany,
        "about": "Kermany et al. pediatric chest X-rays, Mendeley Data rscbjbr9sj v2, ChestXRay2017.zip (~1.2 GB)",
    },
    "nih": {
        "url": f"https://github.com/muhammedtalo/COVID-19/archive/{NIH_COMMIT}.zip",
        "env": "CXR_NIH_URL",
        "dest": "nih",
        "anchor": _anchor_nih,
        "about": "NIH ChestX-ray8 subset of Ozturk et al. (No_findings, Pneumonia), GitHub archive",
    },
}
DEFAULT_DOWNLOADS = ("ieee8023", "kermany")


RETRY_WAIT = 1.0  # seconds before the first retry; doubles each time (max 30 s)


class DownloadError(RuntimeError):
    """A download or extraction that failed; the message names the URL or file and the reason."""


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    size: int | None = None,
    progress: bool = True,
    retries: int = 5,
    timeout: float = 60.0,
    chunk: int = 1 << 16,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming with HTTP Range requests.

    An interrupted transfer (dropped connection, Ctrl-C, crash) leaves ``dest.part``; the next
    call asks the server for the remaining bytes only. The result is checked against the
    server's announced length, ``size`` and ``sha256`` when given, and only then renamed to
    ``dest``. An existing ``dest`` that passes the checks is kept without any request.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and _verify(dest, sha256, size, raise_=False):
        return dest
    attempt = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        try:
            with urllib.request.urlopen(_request(url, have), timeout=timeout) as resp:
                total = _receive(resp, part, have, chunk, dest.name if progress else None)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # nothing left to send: the .part may already be whole
                total = _whole_size(exc, have)
                if total is None:
                    part.unlink()  # an unusable .part: start from scratch
                    attempt = _next_attempt(attempt, retries, f"{url}: server refused the resume request (HTTP 416)")
                    continue
            elif 500 <= exc.code < 600 and attempt < retries:  # a server hiccup: try again
                attempt += 1
                _pause(attempt, f"{url}: HTTP {exc.code}; retrying")
                continue
            else:
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as exc:
            attempt = _next_attempt(attempt, retries, f"{url}: download failed after {retries} retries ({exc})")
            _pause(attempt, f"download interrupted ({exc}); resuming")
            continue
        got = _arrived(url, part, total)
        if got is None:
            break
        attempt = _next_attempt(attempt, retries, f"{url}: only {got} of {total} bytes arrived after {retries} retries")
        log(f"connection closed at {got}/{total} bytes; resuming")  # the connection closed early: resume
    _verify(part, sha256, size)
    os.replace(part, dest)
    return dest


def _request(url: str, have: int) -> urllib.request.Request:
    """A GET of ``url`` that asks for the bytes after the ``have`` already in the .part file."""
    req = urllib.request.Request(url, headers={"User-Agent": "covid-cxr/1.0"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    return req


def _receive(resp, part: Path, have: int, chunk: int, label: str | None) -> int | None:
    """Write the body of ``resp`` to ``part`` (appended on a 206 resume, else from scratch) with a
    progress bar named ``label`` (None: no bar). Returns the file's full size as the server
    announced it, or None when it did not."""
    if have and resp.status == 206:
        crange = resp.headers.get("Content-Range", "")
        total = int(crange.rsplit("/", 1)[-1]) if "/" in crange and not crange.endswith("*") else None
        mode = "ab"
    else:  # 200: the server ignored Range; start again
        have, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = int(length) if length else None
    bar = None
    if label:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                   file=sys.stderr)
    try:
        with open(part, mode) as f:
            for block in iter(lambda: resp.read(chunk), b""):
                f.write(block)
                if bar:
                    bar.update(len(block))
    finally:
        if bar:
            bar.close()
    return total


def _whole_size(exc: urllib.error.HTTPError, have: int) -> int | None:
    """After a 416 answer to a resume: ``have`` when the server says the file is exactly that long."""
    crange = exc.headers.get("Content-Range", "") if exc.headers else ""
    return have if crange.startswith("bytes */") and int(crange.split("/")[-1]) == have else None


def _next_attempt(attempt: int, retries: int, give_up: str) -> int:
    """``attempt + 1``, or DownloadError(``give_up``) once that exceeds ``retries``."""
    if attempt + 1 > retries:
        raise DownloadError(give_up) from None
    return attempt + 1


def _pause(attempt: int, what: str) -> None:
    """Say why and wait before retry number ``attempt``: RETRY_WAIT, doubling, at most 30 s."""
    wait = min(RETRY_WAIT * 2 ** (attempt - 1), 30.0)
    log(f"{what} in {wait:.0f} s")
    time.sleep(wait)


def _arrived(url: str, part: Path, total: int | None) -> int | None:
    """None when ``part`` holds the whole file (as far as ``total`` tells); else the bytes that
    arrived, fewer than ``total`` (resume). More than announced is a DownloadError."""
    got = part.stat().st_size if part.exists() else 0
    if total is None or got == total:
        return None
    if got > total:
        part.unlink()
        raise DownloadError(f"{url}: received {got} bytes, more than the announced {total}")
    return got


def _verify(path: Path, sha256: str | None, size: int | None, raise_: bool = True) -> bool:
    if size is not None and path.stat().st_size != size:
        if raise_:
            got = path.stat().st_size
            path.unlink()
            raise DownloadError(f"{path}: size {got} bytes, expected {size}")
        return False
    if sha256:
        digest = runs.sha256(path)
        if digest != sha256.lower():
            if raise_:
                path.unlink()
                raise DownloadError(f"{path}: sha256 {digest} does not match the expected {sha256}")
            return False
    return True


def _members(archive: Path) -> tuple[str, list[str]]:
    """('zip'|'tar', member file names); checks integrity (CRCs for zip, a full read for tar)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            bad = z.testzip()
            if bad:
                raise DownloadError(f"{archive}: archive is corrupt (bad CRC in {bad})")
            return "zip", [i.filename for i in z.infolist() if not i.is_dir()]
    try:
        with tarfile.open(archive) as t:
            return "tar", [m.name for m in t.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DownloadError(f"{archive}: not a readable zip or tar archive ({exc})") from None


def _archive_files(archive: Path, kind: str):
    """Yield ``(member name, opener)`` for every regular file of a zip or tar archive."""
    if kind == "zip":
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir():
                    yield info.filename, lambda info=info: z.open(info)
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.isfile():
                    yield m.name, lambda m=m: t.extractfile(m)


def extract(archive: str | os.PathLike, dest: str | os.PathLike, source: str) -> int:
    """Extract the ``source`` layout from ``archive`` into ``dest`` (its upstream folder layout).

    The archive's own top folders (e.g. ``covid-chestxray-dataset-<commit>/``,
    ``chest_xray/``) are stripped; macOS junk, hidden files and members that would land
    outside ``dest`` are skipped. Extracts into a temporary folder first and swaps it in, so a
    failure never leaves a half-written source. Returns the number of files written.
    """
    archive, dest = Path(archive), Path(dest)
    kind, names = _members(archive)
    try:
        prefix, keep = DOWNLOADS[source]["anchor"](names)
    except ValueError as exc:
        raise DownloadError(f"{archive}: {exc}") from None
    tmp = dest.with_name(dest.name + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = 0
    root = tmp.resolve()

    def target(name: str) -> Path | None:
        if not name.startswith(prefix):
            return None
        rel = name[len(prefix):]
        parts = rel.split("/")
        if not rel or any(p in ("", "..") or p.startswith(".") or p == "__MACOSX" for p in parts) or not keep(rel):
            return None
        out = (tmp / rel).resolve()
        if root not in out.parents:
            return None
        return out

    try:
        for name, open_member in _archive_files(archive, kind):
            out = target(name)
            if out is None:
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with open_member() as src, open(out, "wb") as f:
                shutil.copyfileobj(src, f)
            n += 1
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{archive}: extraction failed ({exc})") from None
    if n == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{archive}: no {source} files found in the archive")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return n


def download(
    to: str | os.PathLike,
    sources: Sequence[str] = DEFAULT_DOWNLOADS,
    urls: dict[str, str] | None = None,
    sha256: dict[str, str] | None = None,
    force: bool = False,
    keep_archives: bool = False,
    progress: bool = True,
) -> dict:
    """Download and extract ``sources`` into ``to/<source>/``; returns a JSON-ready summary.

    URLs come from ``urls``, else the ``CXR_<SOURCE>_URL`` environment variables, else the public
    defaults in :data:`DOWNLOADS`. A source already extracted (``to/<source>/.download.json``)
    is skipped unless ``force``. Archives live in ``to/.downloads/`` while downloading (so an
    interrupted run resumes) and are deleted after extraction unless ``keep_archives``.
    """
    to = Path(to)
    urls, sha256 = urls or {}, sha256 or {}
    cache = to / ".downloads"
    summary = {"to": str(to), "sources": {}}
    for src in sources:
        if src not in DOWNLOADS:
            raise ValueError(f"unknown source {src!r}; choose from {sorted(DOWNLOADS)}")
        spec = DOWNLOADS[src]
        url = urls.get(src) or os.environ.get(spec["env"]) or spec["url"]
        dest = to / spec["dest"]
        marker = dest / ".download.json"
        if marker.exists() and not force:
            log(f"{src}: already in {dest} (use --force to fetch again)")
            summary["sources"][src] = {"status": "present", **json.loads(marker.read_text())}
            continue
        log(f"{src}: {spec['about']}\n  from {url}")
        archive = download_file(url, cache / f"{src}.archive", sha256=sha256.get(src), progress=progress)
        digest = runs.sha256(archive)
        try:
            n = extract(archive, dest, src)
        except DownloadError as exc:
            archive.unlink(missing_ok=True)  # never reuse a bad archive: the next run fetches it again
            raise DownloadError(f"{exc}; the archive was deleted, run the command again to re-download") from None
        info = {"url": url, "archive_bytes": archive.stat().st_size, "archive_sha256": digest, "files": n,
                "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        marker.write_text(json.dumps(info, indent=1))
        if not keep_archives:
            archive.unlink()
        log(f"{src}: {n} files in {dest}")
        summary["sources"][src] = {"status": "downloaded", **info}
    if cache.exists() and not any(cache.iterdir()):
        cache.rmdir()
    return summary


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
