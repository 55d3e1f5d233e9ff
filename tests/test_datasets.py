"""core.datasets: readers for each upstream layout, on the real data and on synthetic trees."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core import datasets

# ----------------------------------------------------------------------------- synthetic trees
IEEE_ROWS = [
    # patientid, finding, view, modality, filename, age
    ("1", "COVID-19", "PA", "X-ray", "a.png", "50"),
    ("1", "COVID-19", "L", "X-ray", "a_lat.png", "50"),
    ("2", "Pneumonia/Viral/COVID-19", "AP", "X-ray", "b.png", ""),
    ("3", "Streptococcus", "AP Supine", "X-ray", "c.jpg", "10"),
    ("3", "Pneumonia/Bacterial/Klebsiella", "PA", "X-ray", "c2.png", "10"),
    ("4", "ARDS", "PA", "X-ray", "d.png", "40"),
    ("5", "No Finding", "PA", "X-ray", "e.png", "30"),
    ("6", "COVID-19", "Axial", "CT", "f.png", "60"),
    ("7", "Pneumonia", "PA", "X-ray", "shared.png", "70"),
    ("8", "Pneumonia", "PA", "X-ray", "shared.png", "70"),
    ("8", "Pneumonia", "PA", "X-ray", "g.png", "70"),
    ("9", "Lipoid", "PA", "X-ray", "h.png", "45"),
    ("10", "COVID-19", "PA", "X-ray", "missing.png", "45"),
    ("11", "COVID-19, ARDS", "AP", "X-ray", "i.png", "81"),
]
KERMANY_FILES = {
    "NORMAL": ["IM-0001-0001.jpeg", "IM-0001-0001-0002.jpeg", "NORMAL2-IM-0001-0001.jpeg", "IM-0007-0001.jpeg"],
    "PNEUMONIA": ["person1_virus_6.jpeg", "person1_virus_7.jpeg", "person2_bacteria_3.jpeg", "person3_virus_9.jpeg"],
}
NIH_FILES = {
    "No_findings": ["00000001_000.png", "00000001_001.png", "00000003_000.png"],
    "Pneumonia": ["00000002_000.png", "00000004_002.png"],
    "Covid-19": ["covid-x.png"],  # Ozturk et al. copied these from ieee8023: not read
}
# what load_table must make of the synthetic tree
SYNTH_COUNTS = {
    ("ieee8023", "covid"): 3, ("ieee8023", "pneumonia"): 4,
    ("kermany", "normal"): 4, ("kermany", "pneumonia"): 4,
    ("nih", "normal"): 3, ("nih", "pneumonia"): 2,
}


def image_bytes(seed: int, fmt: str = "PNG", size: int = 64) -> bytes:
    """A distinct random grey image (random content: no two are near-duplicates)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size)).astype(np.uint8)
    arr = np.kron(arr[::8, ::8], np.ones((8, 8), np.uint8))  # blocky, so JPEG keeps it recognisable
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _fmt(name: str) -> str:
    return "JPEG" if name.lower().endswith((".jpg", ".jpeg")) else "PNG"


def tree_files(ieee: str = "ieee8023", kermany: str = "kermany", nih: str = "nih",
               kermany_split: bool = False) -> dict[str, bytes]:
    """{relative path: bytes} of a small tree in the three upstream layouts."""
    files: dict[str, bytes] = {}
    seed = 0
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["patientid", "offset", "sex", "age", "finding", "view", "modality", "folder", "filename", "license"])
    for pid, finding, view, modality, fname, age in IEEE_ROWS:
        w.writerow([pid, "0", "M", age, finding, view, modality, "images", fname, ""])
        if fname != "missing.png" and f"{ieee}/images/{fname}" not in files:
            seed += 1
            files[f"{ieee}/images/{fname}"] = image_bytes(seed, _fmt(fname))
    files[f"{ieee}/metadata.csv"] = buf.getvalue().encode()
    for sub, names in KERMANY_FILES.items():
        for i, n in enumerate(names):
            seed += 1
            part = ("train/" if i % 2 == 0 else "test/") if kermany_split else ""
            files[f"{kermany}/{part}{sub}/{n}"] = image_bytes(seed, "JPEG")
    for sub, names in NIH_FILES.items():
        for n in names:
            seed += 1
            files[f"{nih}/{sub}/{n}"] = image_bytes(seed, "PNG")
    return files


# patient_id, image_id, sex, projection, ieee8023_patientid (blank: none)
HANNOVER_ROWS = [
    ("hp1", "i1", "m", "ap", "8"),  # ieee8023 patient 8 is merged with 7 there ("ieee8023:7+8")
    ("hp1", "i2", "m", "pa", "8"),
    ("hp2", "i3", "f", "ap", ""),
    ("hp3", "i4", "m", "ll", ""),  # not frontal: dropped
    ("hp4", "gone", "f", "ap", ""),  # no file: dropped
]


def hannover_files(folder: str = "hannover", crosswalk: bool = True) -> dict[str, bytes]:
    """{relative path: bytes} of a small tree in the hannover upstream layout (+ its crosswalk)."""
    meta, cross = io.StringIO(), io.StringIO()
    m, c = csv.writer(meta), csv.writer(cross)
    m.writerow(["patient_id", "image_id", "sex", "age", "size", "modality", "projection", "crp_val"])
    c.writerow(["patient_id", "image_id", "ieee8023_patientid"])
    files = {}
    for k, (pid, iid, sex, proj, ieee) in enumerate(HANNOVER_ROWS):
        m.writerow([pid, iid, sex, "", "", "CR", proj, "3.0"])
        c.writerow([pid, iid, ieee])
        if iid != "gone":
            files[f"{folder}/png/{iid}.png"] = image_bytes(500 + k)
    files[f"{folder}/data.csv"] = meta.getvalue().encode()
    if crosswalk:
        files[f"{folder}/ieee8023_patient_crosswalk.csv"] = cross.getvalue().encode()
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


@pytest.fixture()
def synth(tmp_path) -> Path:
    return write_tree(tmp_path / "data", tree_files())


# ----------------------------------------------------------------------------- real data
REAL_COUNTS = {("hannover", "covid"): 166, ("ieee8023", "covid"): 412, ("ieee8023", "pneumonia"): 74,
               ("kermany", "normal"): 120, ("kermany", "pneumonia"): 120, ("nih", "normal"): 180,
               ("nih", "pneumonia"): 40}


def test_real_counts_and_drops(cxr_root):
    t = datasets.load_table(cxr_root)
    assert t["label"].value_counts().to_dict() == {"covid": 578, "normal": 300, "pneumonia": 234}
    assert t.groupby(["source", "label"]).size().to_dict() == REAL_COUNTS
    dropped = t.attrs["dropped"]
    assert dropped["ieee8023: lateral view"] == 44
    assert dropped["ieee8023: not an X-ray (CT)"] == 8
    assert dropped["ieee8023: row shares a file with another row"] == 4
    assert not any(k.startswith("hannover") for k in dropped)
    assert list(t.columns) == datasets.COLUMNS
    assert not t["path"].duplicated().any()
    assert all((cxr_root / p).is_file() for p in t["path"])
    assert set(t["view"]) == {"PA", "AP", "AP Supine", "unknown"}
    assert set(t.loc[t.source == "kermany", "age_group"]) == {"pediatric"}
    assert set(t.loc[t.source == "nih", "age_group"]) == {"unknown"}
    assert set(t["sex"]) == {"M", "F", "unknown"}
    assert t["patient_id"].str.match(r"^(ieee8023|kermany|nih|hannover):").all()


def test_real_hannover_and_crosswalk(cxr_root):
    t = datasets.load_table(cxr_root)
    h = t[t["source"] == "hannover"]
    assert len(h) == 166 and set(h["label"]) == {"covid"} and set(h["finding"]) == {"COVID-19"}
    assert h["view"].value_counts().to_dict() == {"AP": 150, "PA": 16}
    assert h["sex"].value_counts().to_dict() == {"M": 129, "F": 37}
    assert set(h["age_group"]) == {"unknown"} and h["age"].isna().all()
    assert h["path"].str.match(r"^hannover/png/[0-9a-f]{8}\.png$").all()
    # every hannover patient keeps its own id; the 15 with ieee8023 films share one id with them
    cw = pd.read_csv(cxr_root / "hannover" / "ieee8023_patient_crosswalk.csv", dtype=str, keep_default_na=False)
    assert h["patient_id"].map(lambda p: datasets.patient_parts(p)[0]).nunique() == 43
    linked = cw[cw["ieee8023_patientid"] != ""].drop_duplicates("patient_id")
    assert len(linked) == 15 and t.attrs["linked_patients"] == 15
    ids = dict(zip(t["path"], t["patient_id"], strict=True))
    for pid, ieee in zip(linked["patient_id"], linked["ieee8023_patientid"], strict=True):
        mine = set(h.loc[h["patient_id"].map(lambda p, pid=pid: f"hannover:{pid}" in datasets.patient_parts(p)),
                         "patient_id"])
        theirs = set(t.loc[(t["source"] == "ieee8023") & t["patient_id"].map(
            lambda p, ieee=ieee: f"ieee8023:{ieee}" in datasets.patient_parts(p)), "patient_id"])
        assert len(mine) == 1 and mine == theirs, (pid, ieee, mine, theirs)
    unlinked = set(cw.loc[cw["ieee8023_patientid"] == "", "image_id"])
    assert all(ids[f"hannover/png/{i}.png"].count("+") == 0 for i in unlinked)
    # the link does not depend on which sources are loaded (a run that saw ieee8023 recognises them)
    only = datasets.load_table(cxr_root, sources=["hannover"])
    assert only["patient_id"].tolist() == h["patient_id"].tolist()


def test_real_shared_files_merge_patients(cxr_root):
    t = datasets.load_table(cxr_root, sources=["ieee8023"])
    row = t[t["path"] == "ieee8023/images/000001-24.jpg"]
    assert row["patient_id"].tolist() == ["ieee8023:285+339"]
    # every image of 285 or 339 carries the merged id, so a split cannot separate them
    ids = set(t["patient_id"])
    assert "ieee8023:285" not in ids and "ieee8023:339" not in ids
    assert set(t["source"]) == {"ieee8023"}


def test_real_kermany_patients(cxr_root):
    t = datasets.load_table(cxr_root / "kermany")  # the root itself is one source folder
    assert len(t) == 240 and t["path"].str.match(r"^(NORMAL|PNEUMONIA)/").all()
    pid = dict(zip(t["path"], t["patient_id"], strict=True))
    assert pid["NORMAL/IM-0033-0001.jpeg"] == pid["NORMAL/IM-0033-0001-0002.jpeg"] == "kermany:IM-0033"
    assert t.loc[t.label == "pneumonia", "patient_id"].str.match(r"^kermany:person\d+$").all()
    assert set(t.loc[t.label == "pneumonia", "finding"]) <= {"pneumonia/virus", "pneumonia/bacteria"}


# ----------------------------------------------------------------------------- synthetic
def test_ieee8023_rules(synth):
    t = datasets.read_ieee8023(synth / "ieee8023")
    got = dict(zip(t["path"], t["label"], strict=True))
    assert got == {
        "images/a.png": "covid", "images/b.png": "covid", "images/i.png": "covid",
        "images/c.jpg": "pneumonia", "images/c2.png": "pneumonia",
        "images/shared.png": "pneumonia", "images/g.png": "pneumonia",
    }
    d = t.attrs["dropped"]
    assert d["ieee8023: lateral view"] == 1
    assert d["ieee8023: not an X-ray (CT)"] == 1
    assert d["ieee8023: finding not used (ARDS)"] == 1
    assert d["ieee8023: finding not used (No Finding)"] == 1
    assert d["ieee8023: finding not used (Lipoid)"] == 1
    assert d["ieee8023: image file missing"] == 1
    assert d["ieee8023: row shares a file with another row"] == 1
    pid = dict(zip(t["path"], t["patient_id"], strict=True))
    assert pid["images/shared.png"] == pid["images/g.png"] == "ieee8023:7+8"
    assert pid["images/a.png"] == "ieee8023:1"
    row = t.set_index("path")
    assert row.loc["images/c.jpg", "age_group"] == "pediatric" and row.loc["images/c.jpg", "view"] == "AP Supine"
    assert row.loc["images/a.png", "age_group"] == "adult" and row.loc["images/a.png", "age"] == 50
    assert row.loc["images/b.png", "age_group"] == "unknown" and np.isnan(row.loc["images/b.png", "age"])


def test_hannover_reader(tmp_path):
    root = write_tree(tmp_path / "data", hannover_files())
    assert datasets.detect(root / "hannover") == "hannover"
    t = datasets.read_hannover(root / "hannover")
    rows = t.set_index("path")
    assert list(rows.index) == ["png/i1.png", "png/i2.png", "png/i3.png"]
    assert set(t["label"]) == {"covid"} and set(t["source"]) == {"hannover"}
    assert rows["view"].tolist() == ["AP", "PA", "AP"] and rows["sex"].tolist() == ["M", "M", "F"]
    assert rows["patient_id"].tolist() == ["hannover:hp1", "hannover:hp1", "hannover:hp2"]
    assert set(t["age_group"]) == {"unknown"} and t["age"].isna().all()
    assert t.attrs["dropped"] == {"hannover: projection ll": 1, "hannover: image file missing": 1}
    assert t.attrs["links"] == [("hannover:hp1", "ieee8023:8")]
    bare = write_tree(tmp_path / "bare", hannover_files(crosswalk=False))
    assert datasets.read_hannover(bare / "hannover").attrs["links"] == []


def test_hannover_crosswalk_links_to_merged_ieee8023_patient(tmp_path):
    root = write_tree(tmp_path / "data", {**tree_files(), **hannover_files()})
    t = datasets.load_table(root)
    assert t.groupby(["source", "label"]).size().to_dict() == {**SYNTH_COUNTS, ("hannover", "covid"): 3}
    pid = dict(zip(t["path"], t["patient_id"], strict=True))
    # hannover hp1 = ieee8023 patient 8, which ieee8023 itself merged with 7 (shared.png): one person
    one = "hannover:hp1+ieee8023:7+8"
    assert pid["hannover/png/i1.png"] == pid["hannover/png/i2.png"] == one
    assert pid["ieee8023/images/shared.png"] == pid["ieee8023/images/g.png"] == one
    assert datasets.patient_parts(one) == ["hannover:hp1", "ieee8023:7", "ieee8023:8"]
    assert pid["hannover/png/i3.png"] == "hannover:hp2" and pid["ieee8023/images/a.png"] == "ieee8023:1"
    assert t.attrs["linked_patients"] == 1
    # without ieee8023 loaded the link still names the ieee8023 id
    alone = datasets.load_table(root / "hannover")
    assert alone.set_index("path").loc["png/i1.png", "patient_id"] == "hannover:hp1+ieee8023:8"


def test_patient_parts_round_trip():
    for pid in ("ieee8023:285+339", "hannover:a1+ieee8023:219+400", "kermany:person1", "nih:00000001"):
        assert datasets.join_patient_parts(datasets.patient_parts(pid)) == pid
    assert datasets.patient_parts("ieee8023:file:x.png") == ["ieee8023:file:x.png"]


@pytest.mark.parametrize("finding,label", [
    ("COVID-19", "covid"), ("Pneumonia/Viral/COVID-19", "covid"), ("COVID-19, ARDS", "covid"),
    ("Pneumonia/Viral/SARS", "pneumonia"), ("E.Coli", "pneumonia"), ("Pneumonia/Fungal/Pneumocystis", "pneumonia"),
    ("Mycoplasma Bacterial Pneumonia", "pneumonia"), ("Chlamydophila", "pneumonia"),
    ("ARDS", None), ("Lipoid", None), ("No Finding", None), ("", None), ("Tuberculosis", None),
])
def test_ieee_label(finding, label):
    assert datasets.ieee_label(finding) == label


def test_kermany_and_nih(synth):
    k = datasets.read_kermany(synth / "kermany")
    pid = dict(zip(k["path"], k["patient_id"], strict=True))
    assert pid["NORMAL/IM-0001-0001.jpeg"] == pid["NORMAL/IM-0001-0001-0002.jpeg"] == "kermany:IM-0001"
    assert pid["NORMAL/NORMAL2-IM-0001-0001.jpeg"] == "kermany:NORMAL2-IM-0001"  # another study series
    assert pid["PNEUMONIA/person1_virus_6.jpeg"] == pid["PNEUMONIA/person1_virus_7.jpeg"] == "kermany:person1"
    assert set(k["view"]) == {"AP"} and set(k["age_group"]) == {"pediatric"}
    fnd = dict(zip(k["path"], k["finding"], strict=True))
    assert fnd["PNEUMONIA/person2_bacteria_3.jpeg"] == "pneumonia/bacteria"
    n = datasets.read_nih(synth / "nih")
    assert n.groupby("label").size().to_dict() == {"normal": 3, "pneumonia": 2}
    assert n.set_index("path").loc["No_findings/00000001_001.png", "patient_id"] == "nih:00000001"
    assert set(n["view"]) == {"unknown"} and set(n["age_group"]) == {"unknown"}
    assert n.attrs["dropped"] == {"nih: folder Covid-19/ not used": 1}


def test_load_table_combines_sources(synth):
    t = datasets.load_table(synth)
    assert t.groupby(["source", "label"]).size().to_dict() == SYNTH_COUNTS
    assert t["path"].str.match(r"^(ieee8023|kermany|nih)/").all()
    assert [s["layout"] for s in t.attrs["sources"]] == ["ieee8023", "kermany", "nih"]
    assert t.attrs["dropped"]["nih: folder Covid-19/ not used"] == 1
    only = datasets.load_table(synth, sources=["nih", "kermany"])
    assert set(only["source"]) == {"nih", "kermany"}
    with pytest.raises(ValueError, match="no rows"):
        datasets.load_table(synth, sources=["nope"])
    assert datasets.abspath(synth, t["path"][0]).is_file()


def test_nested_and_renamed_layouts(tmp_path):
    # full downloads: kermany under chest_xray/train|test, ieee8023 under its archive name
    files = tree_files(ieee="covid-chestxray-dataset-master", kermany="downloads/chest_xray", kermany_split=True)
    root = write_tree(tmp_path / "d", files)
    t = datasets.load_table(root)
    assert t.groupby(["source", "label"]).size().to_dict() == SYNTH_COUNTS
    assert t.loc[t.source == "kermany", "path"].str.match(r"^downloads/chest_xray/(train|test)/").all()


def test_root_is_one_source(synth):
    t = datasets.load_table(synth / "ieee8023")
    assert len(t) == 7 and t["path"].str.startswith("images/").all()


def test_class_folders_with_label_map(tmp_path):
    root = tmp_path / "mine"
    for i, sub in enumerate(["COVID", "Healthy", "Viral Pneumonia", "Lung_Opacity"]):
        (root / sub).mkdir(parents=True)
        (root / sub / f"x{i}.png").write_bytes(image_bytes(i))
        (root / sub / "notes.txt").write_text("not an image")
    t = datasets.read_class_folders(root, {"covid": "covid", "healthy": "normal", "viral pneumonia": "pneumonia"})
    assert dict(zip(t["path"], t["label"], strict=True)) == {
        "COVID/x0.png": "covid", "Healthy/x1.png": "normal", "Viral Pneumonia/x2.png": "pneumonia"}
    assert set(t["source"]) == {"mine"} and t["patient_id"].str.startswith("mine:").all()
    assert t.attrs["dropped"] == {"mine: folder Lung_Opacity/ not in label map": 1}
    with pytest.raises(ValueError, match="label map"):
        datasets.read_class_folders(root, {"covid": "sick"})
    # load_table finds it with the default map (covid / healthy / viral pneumonia are known names)
    t2 = datasets.load_table(tmp_path)
    assert len(t2) == 3 and t2["path"].str.startswith("mine/").all()


def test_manifest(tmp_path):
    root = tmp_path / "site"
    (root / "img").mkdir(parents=True)
    for i in range(4):
        (root / "img" / f"{i}.png").write_bytes(image_bytes(100 + i))
    pd.DataFrame({
        "path": ["img/0.png", "img/1.png", "img/2.png", "img/3.png", "img/gone.png"],
        "label": ["COVID", "normal", "pneumonia", "tuberculosis", "covid"],
        "patient_id": ["p1", "p1", "", "p3", "p4"],
        "source": ["hospA", "hospA", "", "", ""],
    }).to_csv(root / "manifest.csv", index=False)
    t = datasets.load_table(tmp_path)
    rows = t.set_index("path")
    assert rows.loc["site/img/0.png", "label"] == "covid" and rows.loc["site/img/0.png", "source"] == "hospA"
    assert rows.loc["site/img/0.png", "patient_id"] == rows.loc["site/img/1.png", "patient_id"] == "hospA:p1"
    assert rows.loc["site/img/2.png", "source"] == "site"
    assert rows.loc["site/img/2.png", "patient_id"] == "site:site/img/2.png"  # no id: its own patient
    assert t.attrs["dropped"] == {"site: label not used (tuberculosis)": 1, "site: image file missing": 1}
    (root / "manifest.csv").write_text("file,class\nimg/0.png,covid\n")
    with pytest.raises(ValueError, match="path,label"):
        datasets.read_manifest(root / "manifest.csv")


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.load_table(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no chest X-ray source"):
        datasets.load_table(tmp_path / "empty")
