"""Readers for chest X-ray collections, each in its upstream layout, producing one table.

Every reader returns a :class:`pandas.DataFrame` with the columns in :data:`COLUMNS`:

``path``        file path relative to the root given to :func:`load_table` (posix string)
``label``       ``covid`` | ``normal`` | ``pneumonia``
``source``      ``ieee8023`` | ``kermany`` | ``nih`` | ``hannover`` | a user source name
``patient_id``  globally unique, prefixed by the source (``"ieee8023:285"``); one person filed
                under several ids carries all of them joined by ``+`` (see below)
``view``        ``PA`` | ``AP`` | ``AP Supine`` | ``unknown``
``age``         years (float, NaN when unknown)
``age_group``   ``adult`` | ``pediatric`` | ``unknown``
``sex``         ``M`` | ``F`` | ``unknown``
``finding``     the original label text (finding, folder name, ...)

Rows left out are counted by reason in ``df.attrs["dropped"]``. :func:`load_table` finds every
known layout under a data root (several sources side by side, or the root itself being one
source folder) and concatenates them.

**One person, one patient_id.** The patient id is the unit of every split and of every patient
bootstrap, so a person known under several ids gets one id that joins them: ieee8023 patients
that share a file become ``"ieee8023:285+339"``, and a reader may name cross-source links in
``attrs["links"]`` (pairs of single ids, e.g. the hannover crosswalk's
``("hannover:042f06a9", "ieee8023:219")``), which :func:`load_table` applies to the rows of both
sources: ``"hannover:042f06a9+ieee8023:219"``. :func:`patient_parts` splits such an id back into
its single ids.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ["path", "label", "source", "patient_id", "view", "age", "age_group", "sex", "finding"]
LABELS = ("covid", "normal", "pneumonia")
FRONTAL_VIEWS = ("PA", "AP", "AP Supine")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff"}
PEDIATRIC_MAX_AGE = 18  # under 18 years is pediatric

# ieee8023 findings (other than anything containing "COVID-19") that count as pneumonia.
# ARDS, Lipoid and "No Finding" are left out on purpose: the "No Finding" rows are mostly films of
# COVID-19-positive or suspected patients, not healthy controls.
IEEE_PNEUMONIA = {
    "pneumocystis", "streptococcus", "sars", "pneumonia", "klebsiella",
    "mycoplasma bacterial pneumonia", "legionella", "varicella", "e.coli", "bacterial",
    "chlamydophila", "influenza",
}

# Folder names accepted by :func:`read_class_folders` when no label map is given (case-insensitive).
DEFAULT_LABEL_MAP = {
    "covid": "covid", "covid-19": "covid", "covid19": "covid", "covid_19": "covid",
    "normal": "normal", "no_findings": "normal", "no finding": "normal", "healthy": "normal",
    "pneumonia": "pneumonia", "viral pneumonia": "pneumonia", "bacterial pneumonia": "pneumonia",
}

MANIFEST_NAMES = ("manifest.csv",)
_SKIP_DIRS = {"__MACOSX", "annotations", ".git"}
_MAX_DEPTH = 4  # how deep load_table looks for source layouts below the root


def abspath(root: str | os.PathLike, rel: str) -> Path:
    """The path of a table ``path`` under ``root`` (trusted tables only: run-file paths use core.safepath)."""
    return Path(root) / rel


def empty_table() -> pd.DataFrame:
    """A table with the standard columns and no rows."""
    df = pd.DataFrame({c: pd.Series(dtype="float64" if c == "age" else "object") for c in COLUMNS})
    df.attrs["dropped"] = {}
    return df


def _finish(rows: list[dict], dropped: Mapping[str, int], links: Iterable[tuple[str, str]] = ()) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS) if rows else empty_table()
    df["age"] = pd.to_numeric(df["age"], errors="coerce").astype("float64")
    for c in COLUMNS:
        if c != "age":
            df[c] = df[c].astype(object)
    df = df.sort_values("path", kind="stable").reset_index(drop=True)
    df.attrs["dropped"] = {k: int(v) for k, v in dropped.items() if v}
    df.attrs["links"] = sorted(set(links))
    return df


def _count(d: dict, key: str, n: int = 1) -> None:
    d[key] = d.get(key, 0) + n


def _sex(text: str) -> str:
    t = str(text or "").strip().upper()
    return t if t in {"M", "F"} else "unknown"


def _age_group(age: float) -> str:
    if age is None or not np.isfinite(age):
        return "unknown"
    return "pediatric" if age < PEDIATRIC_MAX_AGE else "adult"


def _images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (sorted; hidden files skipped)."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _rel(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # keep the smaller name as the representative so results do not depend on order
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


def ieee_label(finding: str) -> str | None:
    """Label of an ieee8023 ``finding`` text, or None when the finding is not used."""
    text = str(finding or "").strip()
    if "covid-19" in text.lower():
        return "covid"
    # findings look like "Pneumonia/Bacterial/Streptococcus" (newer) or "Streptococcus" (older)
    last = text.split("/")[-1].strip().lower()
    if last in IEEE_PNEUMONIA or text.lower() in IEEE_PNEUMONIA:
        return "pneumonia"
    return None


def _ieee_patient_ids(meta: pd.DataFrame) -> Callable[[str], str]:
    """``patientid -> "ieee8023:<ids>"``, where patients that share a file are one person: their
    ids are merged (union-find) and joined shortest first, e.g. ``"ieee8023:285+339"``."""
    uf = _UnionFind()
    for _, grp in meta.groupby("filename", sort=False):
        pids = grp["patientid"].str.strip().unique().tolist()
        for p in pids[1:]:
            uf.union(pids[0], p)
    members: dict[str, set[str]] = {}
    for p in meta["patientid"].str.strip():
        members.setdefault(uf.find(p), set()).add(p)
    return lambda p: join_patient_parts(f"ieee8023:{m}" for m in members[uf.find(p)])


def read_ieee8023(folder: str | os.PathLike, base: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read the ieee8023 covid-chestxray-dataset layout: ``metadata.csv`` + ``images/``.

    Keeps frontal X-rays (modality X-ray, view PA/AP/AP Supine); a finding containing
    "COVID-19" is covid, the findings in :data:`IEEE_PNEUMONIA` are pneumonia, anything else
    (ARDS, Lipoid, No Finding, ...) is dropped. Several rows may name one file (the same film
    entered under two patient ids): one row is kept, and those patient ids are merged into one
    ``patient_id`` such as ``"ieee8023:285+339"`` so that a split can never separate them.
    Paths are relative to ``base`` (default: ``folder``).
    """
    folder = Path(folder)
    base = Path(base) if base is not None else folder
    meta = pd.read_csv(folder / "metadata.csv", dtype=str, keep_default_na=False)
    dropped: dict[str, int] = {}
    merged_id = _ieee_patient_ids(meta)
    rows, seen = [], set()
    img_dir_default = "images"
    for rec in meta.to_dict("records"):
        modality = rec.get("modality", "").strip()
        view = rec.get("view", "").strip()
        if modality.lower() != "x-ray":
            _count(dropped, f"ieee8023: not an X-ray ({modality or 'blank'})")
            continue
        if view not in FRONTAL_VIEWS:
            reason = "lateral view" if view.upper() in {"L", "LATERAL"} else f"view {view or 'blank'}"
            _count(dropped, f"ieee8023: {reason}")
            continue
        finding = rec.get("finding", "").strip()
        label = ieee_label(finding)
        if label is None:
            _count(dropped, f"ieee8023: finding not used ({finding or 'blank'})")
            continue
        fname = rec.get("filename", "").strip()
        path = folder / (rec.get("folder", "").strip() or img_dir_default) / fname
        if not fname or not path.is_file():
            _count(dropped, "ieee8023: image file missing")
            continue
        if fname in seen:
            _count(dropped, "ieee8023: row shares a file with another row")
            continue
        seen.add(fname)
        age = pd.to_numeric(rec.get("age", ""), errors="coerce")
        pid = rec["patientid"].strip()
        rows.append({
            "path": _rel(path, base), "label": label, "source": "ieee8023",
            "patient_id": merged_id(pid) if pid else f"ieee8023:file:{fname}", "view": view,
            "age": age, "age_group": _age_group(age), "sex": _sex(rec.get("sex", "")), "finding": finding,
        })
    return _finish(rows, dropped)


_KERMANY_PERSON = re.compile(r"^(person\d+)_(virus|bacteria)_\d+", re.IGNORECASE)
_KERMANY_STUDY = re.compile(r"^((?:NORMAL2-)?IM-\d+)", re.IGNORECASE)


def kermany_patient(name: str) -> str:
    """Patient key of a Kermany file name: ``person12`` or the ``IM-0123`` / ``NORMAL2-IM-0123`` prefix."""
    stem = Path(name).stem
    m = _KERMANY_PERSON.match(stem) or _KERMANY_STUDY.match(stem)
    return m.group(1) if m else stem


def read_kermany(folder: str | os.PathLike, base: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read Kermany class folders ``NORMAL/`` and ``PNEUMONIA/`` (pediatric AP films).

    Pneumonia file names say ``person<N>_virus_<k>`` or ``person<N>_bacteria_<k>`` (the finding
    becomes ``pneumonia/virus`` or ``pneumonia/bacteria``); the patient is ``person<N>``, for
    normals the ``IM-XXXX`` (or ``NORMAL2-IM-XXXX``) study prefix.
    """
    folder = Path(folder)
    base = Path(base) if base is not None else folder
    rows = []
    for sub, label in (("NORMAL", "normal"), ("PNEUMONIA", "pneumonia")):
        d = folder / sub
        if not d.is_dir():
            continue
        for p in _images_in(d):
            m = _KERMANY_PERSON.match(p.stem)
            finding = f"pneumonia/{m.group(2).lower()}" if m else sub.lower()
            rows.append({
                "path": _rel(p, base), "label": label, "source": "kermany",
                "patient_id": "kermany:" + kermany_patient(p.name), "view": "AP",
                "age": np.nan, "age_group": "pediatric", "sex": "unknown", "finding": finding,
            })
    return _finish(rows, {})


def read_nih(folder: str | os.PathLike, base: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read the NIH ChestX-ray8 subset: ``No_findings/`` (normal) and ``Pneumonia/``.

    The patient is the first 8 digits of the file name; view and age are not given per image.
    Other folders of that layout (e.g. Ozturk et al.'s ``Covid-19/``, copied from ieee8023) are
    not read and are counted as dropped.
    """
    folder = Path(folder)
    base = Path(base) if base is not None else folder
    rows, dropped = [], {}
    for sub in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        label = {"No_findings": "normal", "Pneumonia": "pneumonia"}.get(sub)
        files = _images_in(folder / sub)
        if label is None:
            if files:
                _count(dropped, f"nih: folder {sub}/ not used", len(files))
            continue
        for p in files:
            digits = re.match(r"^(\d{8})", p.name)
            pid = digits.group(1) if digits else p.stem
            rows.append({
                "path": _rel(p, base), "label": label, "source": "nih",
                "patient_id": "nih:" + pid, "view": "unknown",
                "age": np.nan, "age_group": "unknown", "sex": "unknown", "finding": sub,
            })
    return _finish(rows, dropped)


HANNOVER_CROSSWALK = "ieee8023_patient_crosswalk.csv"
HANNOVER_VIEWS = {"ap": "AP", "pa": "PA"}


def read_hannover(folder: str | os.PathLike, base: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read the Hannover Medical School COVID-19 repository: ``data.csv`` + ``png/<image_id>.png``.

    Every patient tested positive, so every image is covid (finding ``COVID-19``). ``projection``
    ap/pa is the view AP/PA (any other projection is dropped, counted); age is redacted upstream
    (unknown); sex is kept. The patient is ``hannover:<patient_id>``. When the folder holds
    :data:`HANNOVER_CROSSWALK` (columns patient_id, image_id, ieee8023_patientid; blank when the
    patient has no ieee8023 film), each hannover patient with an ieee8023 id is returned as a link
    in ``attrs["links"]`` (``("hannover:<patient_id>", "ieee8023:<patientid>")``), which
    :func:`load_table` applies so that the two ids become one patient.
    """
    folder = Path(folder)
    base = Path(base) if base is not None else folder
    meta = pd.read_csv(folder / "data.csv", dtype=str, keep_default_na=False)
    missing = {"patient_id", "image_id"} - set(meta.columns)
    if missing:
        raise ValueError(f"{folder / 'data.csv'}: hannover data.csv needs columns patient_id,image_id "
                         f"(missing {sorted(missing)})")
    rows, dropped = [], {}
    for rec in meta.to_dict("records"):
        projection = rec.get("projection", "").strip().lower()
        view = HANNOVER_VIEWS.get(projection)
        if view is None:
            _count(dropped, f"hannover: projection {projection or 'blank'}")
            continue
        path = folder / "png" / f"{rec['image_id'].strip()}.png"
        if not path.is_file():
            _count(dropped, "hannover: image file missing")
            continue
        rows.append({
            "path": _rel(path, base), "label": "covid", "source": "hannover",
            "patient_id": "hannover:" + rec["patient_id"].strip(), "view": view,
            "age": np.nan, "age_group": "unknown", "sex": _sex(rec.get("sex", "")), "finding": "COVID-19",
        })
    links = []
    cross = folder / HANNOVER_CROSSWALK
    if cross.is_file():
        cw = pd.read_csv(cross, dtype=str, keep_default_na=False)
        if not {"patient_id", "ieee8023_patientid"} <= set(cw.columns):
            raise ValueError(f"{cross}: needs columns patient_id,image_id,ieee8023_patientid")
        for pid, ieee in zip(cw["patient_id"].str.strip(), cw["ieee8023_patientid"].str.strip(), strict=True):
            if pid and ieee:
                links.append((f"hannover:{pid}", f"ieee8023:{ieee}"))
    return _finish(rows, dropped, links)


def read_class_folders(
    folder: str | os.PathLike,
    label_map: Mapping[str, str] | None = None,
    source: str | None = None,
    base: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Read a folder-per-class tree: ``folder/<class>/<image>``.

    ``label_map`` maps folder names to labels (covid/normal/pneumonia), case-insensitively;
    without it :data:`DEFAULT_LABEL_MAP` is used. Folders not in the map are counted as dropped.
    Each image is its own patient (nothing better is known); ``source`` defaults to the folder
    name.
    """
    folder = Path(folder)
    base = Path(base) if base is not None else folder
    source = source or _source_name(folder)
    lmap = {k.lower(): v for k, v in (label_map or DEFAULT_LABEL_MAP).items()}
    bad = {v for v in lmap.values() if v not in LABELS}
    if bad:
        raise ValueError(f"label map targets must be one of {LABELS}, not {sorted(bad)}")
    rows, dropped = [], {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _images_in(sub)
        label = lmap.get(sub.name.lower())
        if label is None:
            if files:
                _count(dropped, f"{source}: folder {sub.name}/ not in label map", len(files))
            continue
        for p in files:
            rows.append({
                "path": _rel(p, base), "label": label, "source": source,
                "patient_id": f"{source}:{_rel(p, folder)}", "view": "unknown",
                "age": np.nan, "age_group": "unknown", "sex": "unknown", "finding": sub.name,
            })
    return _finish(rows, dropped)


def read_manifest(
    csv_path: str | os.PathLike, base: str | os.PathLike | None = None, source: str | None = None
) -> pd.DataFrame:
    """Read a manifest CSV with columns ``path,label[,patient_id,source,view,age,sex]``.

    ``path`` is relative to the CSV's folder (or absolute); ``label`` must be covid, normal or
    pneumonia (rows with another label or a missing file are counted as dropped). Without a
    ``patient_id`` each image is its own patient. Paths in the table are relative to ``base``
    (default: the CSV's folder).
    """
    csv_path = Path(csv_path)
    folder = csv_path.parent
    base = Path(base) if base is not None else folder
    source = source or _source_name(folder)
    man = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    man.columns = [c.strip().lower() for c in man.columns]
    missing = {"path", "label"} - set(man.columns)
    if missing:
        raise ValueError(f"{csv_path}: manifest needs columns path,label (missing {sorted(missing)})")
    rows, dropped = [], {}
    for rec in man.to_dict("records"):
        label = rec["label"].strip().lower()
        label = DEFAULT_LABEL_MAP.get(label, label)
        if label not in LABELS:
            _count(dropped, f"{source}: label not used ({rec['label'] or 'blank'})")
            continue
        p = Path(rec["path"].strip())
        p = p if p.is_absolute() else folder / p
        if not p.is_file():
            _count(dropped, f"{source}: image file missing")
            continue
        try:
            rel = _rel(p.resolve(), base.resolve())
        except ValueError:
            rel = p.resolve().as_posix()  # outside the root: keep it absolute
        src = rec.get("source", "").strip() or source
        pid = rec.get("patient_id", "").strip() or rel
        view = rec.get("view", "").strip() or "unknown"
        age = pd.to_numeric(rec.get("age", ""), errors="coerce")
        rows.append({
            "path": rel, "label": label, "source": src, "patient_id": f"{src}:{pid}",
            "view": view, "age": age, "age_group": _age_group(age), "sex": _sex(rec.get("sex", "")),
            "finding": rec["label"],
        })
    return _finish(rows, dropped)


def patient_parts(patient_id: str) -> list[str]:
    """The single ids a ``patient_id`` joins: ``"ieee8023:285+339"`` -> ``["ieee8023:285", "ieee8023:339"]``.

    A part without its own ``source:`` prefix takes the one before it, so
    ``"hannover:a1+ieee8023:219+400"`` -> ``["hannover:a1", "ieee8023:219", "ieee8023:400"]``.
    """
    parts, prefix = [], ""
    for piece in str(patient_id).split("+"):
        src, sep, _ = piece.partition(":")
        if sep:
            prefix = src
            parts.append(piece)
        else:
            parts.append(f"{prefix}:{piece}" if prefix else piece)
    return parts


def join_patient_parts(parts: Iterable[str]) -> str:
    """The one ``patient_id`` of several single ids (inverse of :func:`patient_parts`).

    Sources in alphabetical order, each once: ``"hannover:a1+ieee8023:219+400"``; ids within a
    source shortest first, as ieee8023 merges them (``"ieee8023:285+339"``).
    """
    by_source: dict[str, set[str]] = {}
    for p in parts:
        src, _, raw = p.partition(":")
        by_source.setdefault(src, set()).add(raw)
    return "+".join(
        f"{src}:" + "+".join(sorted(raws, key=lambda s: (len(s), s))) for src, raws in sorted(by_source.items())
    )


def link_patients(table: pd.DataFrame, links: Iterable[tuple[str, str]]) -> pd.DataFrame:
    """``table`` with the patients named by ``links`` (pairs of single ids) merged into one id.

    A link end matches every table id that contains it (``"ieee8023:339"`` matches
    ``"ieee8023:285+339"``); a link end absent from the table still becomes part of the id (a
    hannover patient keeps its ieee8023 id when ieee8023 is not loaded), so a run that saw that
    person under the other id recognises it. Ids untouched by a link are left exactly as they are.
    ``attrs["linked_patients"]`` counts the merged persons.
    """
    links = list(links)
    out = table.copy()
    out.attrs = dict(table.attrs)
    out.attrs["linked_patients"] = 0
    if not links or not len(table):
        return out
    uf = _UnionFind()
    ids = out["patient_id"].astype(str).unique()
    for pid in ids:
        parts = patient_parts(pid)
        for p in parts[1:]:
            uf.union(parts[0], p)
    for a, b in links:
        uf.union(a, b)
    members: dict[str, set[str]] = {}
    for part in list(uf.parent):
        members.setdefault(uf.find(part), set()).add(part)
    touched = {uf.find(a) for a, _ in links}
    new_id = {}
    for pid in ids:
        root = uf.find(patient_parts(pid)[0])
        if root in touched:
            new_id[pid] = join_patient_parts(members[root])
    out["patient_id"] = out["patient_id"].astype(str).map(lambda p: new_id.get(p, p)).astype(object)
    spans = [{q.partition(":")[0] for q in patient_parts(p)} for p in set(new_id.values())]
    out.attrs["linked_patients"] = sum(len(s) > 1 for s in spans)
    return out


def _source_name(folder: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.resolve().name).strip("_")
    return name or "data"


def detect(folder: str | os.PathLike, label_map: Mapping[str, str] | None = None) -> str | None:
    """Which layout ``folder`` itself has: ieee8023, hannover, kermany, nih, manifest, class_folders or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / "metadata.csv").is_file() and (folder / "images").is_dir():
        return "ieee8023"
    if (folder / "data.csv").is_file() and (folder / "png").is_dir():
        return "hannover"
    names = {p.name for p in folder.iterdir() if p.is_dir()}
    kermany = {"NORMAL", "PNEUMONIA"} & names
    others = {n for n in names - kermany if n.lower() in DEFAULT_LABEL_MAP}
    if kermany and not others and any(_images_in(folder / n) for n in kermany):
        return "kermany"
    if "No_findings" in names:
        return "nih"
    if any((folder / m).is_file() for m in MANIFEST_NAMES):
        return "manifest"
    lmap = {k.lower() for k in (label_map or DEFAULT_LABEL_MAP)}
    if any(n.lower() in lmap and _images_in(folder / n) for n in names):
        return "class_folders"
    return None


def find_sources(root: str | os.PathLike, label_map: Mapping[str, str] | None = None) -> list[tuple[str, Path]]:
    """Every ``(layout, folder)`` under ``root`` (the root itself included), searched breadth-first.

    A folder that holds a layout is not searched further, so a source's class folders are never
    read twice.
    """
    root = Path(root)
    found, frontier = [], [(root, 0)]
    while frontier:
        folder, depth = frontier.pop(0)
        kind = detect(folder, label_map)
        if kind:
            found.append((kind, folder))
            continue
        if depth >= _MAX_DEPTH:
            continue
        try:
            subs = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError:
            continue
        frontier.extend(
            (p, depth + 1) for p in subs if p.name not in _SKIP_DIRS and not p.name.startswith(".")
        )
    return found


def _read_layout(kind: str, folder: Path, root: Path, label_map: Mapping[str, str] | None) -> pd.DataFrame:
    """The table of one source folder that :func:`find_sources` found as layout ``kind``."""
    readers = {"ieee8023": read_ieee8023, "hannover": read_hannover, "kermany": read_kermany, "nih": read_nih}
    if kind in readers:
        return readers[kind](folder, base=root)
    if kind == "manifest":
        return read_manifest(next(folder / m for m in MANIFEST_NAMES if (folder / m).is_file()), base=root)
    return read_class_folders(folder, label_map, base=root)


def load_table(
    root: str | os.PathLike,
    sources: Iterable[str] | None = None,
    label_map: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Find every source layout under ``root`` and return one table (see the module docstring).

    ``sources`` keeps only those source names (e.g. ``["ieee8023", "kermany"]``). ``label_map``
    is used for generic class-folder trees. Cross-source patient links (``attrs["links"]`` of the
    readers, e.g. the hannover crosswalk) are applied with :func:`link_patients` before ``sources``
    filters. ``attrs["dropped"]`` counts left-out rows by reason; ``attrs["sources"]`` lists the
    folders read; ``attrs["linked_patients"]`` counts persons whose ids span
    two sources. Raises FileNotFoundError when ``root`` does not exist, ValueError when no known
    layout is found under it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist (set --data DIR or CXR_DATA_DIR)")
    found = find_sources(root, label_map)
    if not found:
        raise ValueError(
            f"no chest X-ray source found under {root}: expected ieee8023 metadata.csv + images/, "
            "hannover data.csv + png/, kermany NORMAL/ PNEUMONIA/, nih No_findings/ Pneumonia/, manifest.csv or class folders"
        )
    tables, dropped, read, links = [], {}, [], []
    for kind, folder in found:
        t = _read_layout(kind, folder, root, label_map)
        for k, v in t.attrs.get("dropped", {}).items():
            _count(dropped, k, v)
        links += t.attrs.get("links", [])
        read.append({"layout": kind, "folder": _rel(folder, root) or "."})
        tables.append(t)
    df = pd.concat([t for t in tables if len(t)], ignore_index=True) if any(len(t) for t in tables) else empty_table()
    # before the source filter, so a linked patient's id does not depend on which sources are kept
    df = link_patients(df, links)
    linked = df.attrs["linked_patients"]
    if sources is not None:
        keep = set(sources)
        unknown = keep - set(df["source"])
        if unknown and not len(df[df["source"].isin(keep)]):
            raise ValueError(f"no rows for source(s) {sorted(unknown)}; found {sorted(set(df['source']))}")
        df = df[df["source"].isin(keep)]
    # one file read through two layouts (e.g. a manifest beside class folders) is kept once
    n = len(df)
    df = df.drop_duplicates("path", keep="first")
    if len(df) < n:
        _count(dropped, "same file listed twice", n - len(df))
    df = df.sort_values(["source", "path"], kind="stable").reset_index(drop=True)
    df.attrs["dropped"] = dropped
    df.attrs["sources"] = read
    df.attrs["linked_patients"] = linked
    return df
