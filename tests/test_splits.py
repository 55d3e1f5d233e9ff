"""core.splits: duplicates, patient-level stratified splits, split files, prepare()."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_datasets import hannover_files, image_bytes, tree_files, write_tree

from core import images, splits
from core.datasets import load_table


@pytest.fixture()
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def real(cxr_root):
    """The real pool with duplicates found once.

    Uses the default on-disk fingerprint cache (``$CXR_CACHE_DIR`` or ``runs/.cache``): the first
    run decodes every image (~8 s CPU), later runs only stat the files.
    """
    cache = splits.cache_path().parent
    table = load_table(cxr_root)
    dups = splits.find_duplicates(table, cxr_root, threshold=0.95, cache_dir=cache)
    return table, dups, cache


def assert_no_leak(t: pd.DataFrame, dups: pd.DataFrame | None = None) -> None:
    assert (t.groupby("patient_id")["split"].nunique() == 1).all(), "a patient crosses splits"
    assert (t.groupby("group")["split"].nunique() == 1).all(), "a group crosses splits"
    if dups is not None and len(dups):
        where = dict(zip(t["path"], t["split"], strict=True))
        for a, b in zip(dups["path_a"], dups["path_b"], strict=True):
            if a in where and b in where:
                assert where[a] == where[b], f"duplicates {a} and {b} cross splits"


# ----------------------------------------------------------------------------- real data
def test_real_split_is_patient_level_and_stratified(real):
    table, dups, _ = real
    # the real pool has near pairs at 0.95 (none at 0.97: upstream removed those)
    assert (dups["kind"] == "near").sum() >= 1 and (dups["kind"] == "exact").sum() == 0
    t = splits.make_split(table, seed=7, duplicates=dups)
    assert_no_leak(t, dups)
    assert set(t["split"]) == {"train", "val", "test"}
    for (_, _), g in t.groupby(["source", "label"]):
        share = g["split"].value_counts(normalize=True)
        assert share["train"] == pytest.approx(0.7, abs=0.05)
        assert share["val"] == pytest.approx(0.1, abs=0.05)
        assert share["test"] == pytest.approx(0.2, abs=0.05)
    again = splits.make_split(table, seed=7, duplicates=dups)
    assert again["split"].tolist() == t["split"].tolist()  # seeded: reproducible
    other = splits.make_split(table, seed=8, duplicates=dups)
    assert other["split"].tolist() != t["split"].tolist()
    assert_no_leak(other, dups)


def test_real_prepare_counts_and_cache(cxr_root, real, monkeypatch):
    _, _, cache = real

    def no_decoding(*a, **k):
        raise AssertionError("fingerprints should come from the cache")

    monkeypatch.setattr(images, "load", no_decoding)
    t = splits.prepare(cxr_root, seed=1, cache_dir=cache)
    assert t["label"].value_counts().to_dict() == {"covid": 578, "normal": 300, "pneumonia": 234}
    assert_no_leak(t, pd.DataFrame(t.attrs["duplicates"], columns=["path_a", "path_b", "kind", "score"]))
    assert t.attrs["dropped"]["ieee8023: lateral view"] == 44
    # the two upstream ids of one person stay together
    assert t.loc[t["patient_id"] == "ieee8023:285+339", "split"].nunique() == 1
    # each of the 15 hannover patients with ieee8023 films is ONE group with them, in one split
    linked = t[t["patient_id"].str.startswith("hannover:") & t["patient_id"].str.contains(r"\+ieee8023:")]
    assert linked["patient_id"].nunique() == 15
    for _, g in linked.groupby("patient_id"):
        assert set(g["source"]) == {"hannover", "ieee8023"}
        assert g["group"].nunique() == 1 and g["split"].nunique() == 1
    # no hannover film is an exact or near (>= 0.97) duplicate of an ieee8023 one (README: removed upstream)
    src = dict(zip(t["path"], t["source"], strict=True))
    assert not [d for d in t.attrs["duplicates"] if {src.get(d["path_a"]), src.get(d["path_b"])} == {"hannover", "ieee8023"}]


# ----------------------------------------------------------------------------- synthetic
def _noisy_jpeg(data: bytes, seed: int) -> bytes:
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("L")).astype(float)
    arr = np.clip(arr + np.random.default_rng(seed).normal(0, 4, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def dup_tree(tmp_path):
    files = tree_files()
    # an exact copy of a kermany normal inside nih (another patient, another source)
    files["nih/No_findings/00000009_000.png"] = files["kermany/NORMAL/IM-0007-0001.jpeg"]
    # a re-encoded, slightly noisy copy of an ieee8023 film filed as a kermany image
    files["kermany/PNEUMONIA/person9_virus_1.jpeg"] = _noisy_jpeg(files["ieee8023/images/a.png"], 1)
    return write_tree(tmp_path / "d", files)


def test_find_duplicates(dup_tree, cache):
    t = load_table(dup_tree)
    d = splits.find_duplicates(t, dup_tree, cache_dir=cache)
    pairs = {(r.path_a, r.path_b): r.kind for r in d.itertuples()}
    assert pairs == {
        ("kermany/NORMAL/IM-0007-0001.jpeg", "nih/No_findings/00000009_000.png"): "exact",
        ("ieee8023/images/a.png", "kermany/PNEUMONIA/person9_virus_1.jpeg"): "near",
    }
    assert d.loc[d.kind == "near", "score"].iloc[0] >= 0.97
    no_near = splits.find_duplicates(t, dup_tree, near=False, cache=False)
    assert no_near["kind"].tolist() == ["exact"]
    hashes = splits.file_hashes(t, dup_tree)
    assert hashes.nunique() == len(t) - 1 and hashes.str.len().eq(64).all()


@pytest.mark.parametrize("seed", range(6))
def test_prepare_drops_exact_and_groups_near(dup_tree, cache, seed):
    t = splits.prepare(dup_tree, seed=seed, cache_dir=cache)
    assert "nih/No_findings/00000009_000.png" not in set(t["path"])
    assert t.attrs["dropped"]["exact duplicate"] == 1
    where = t.set_index("path")
    assert where.loc["ieee8023/images/a.png", "split"] == where.loc["kermany/PNEUMONIA/person9_virus_1.jpeg", "split"]
    assert where.loc["ieee8023/images/a.png", "group"] == where.loc["kermany/PNEUMONIA/person9_virus_1.jpeg", "group"]
    assert_no_leak(t)


def _manifest_tree(root, rows, copies):
    """A manifest source: rows (name, label, patient); ``copies`` maps a name to the name it copies."""
    (root / "img").mkdir(parents=True)
    names = [r[0] for r in rows]
    for name in names:
        (root / "img" / name).write_bytes(image_bytes(700 + names.index(copies.get(name, name))))
    pd.DataFrame({"path": [f"img/{n}" for n, _, _ in rows], "label": [lb for _, lb, _ in rows],
                  "patient_id": [p for _, _, p in rows]}).to_csv(root / "manifest.csv", index=False)
    return root


@pytest.mark.parametrize("seed", range(4))
def test_exact_copy_joins_patients_before_it_is_dropped(tmp_path, cache, seed):
    # A{a1, a2}, B{b1 = a1 byte for byte, b2}: b1 is dropped as a duplicate, yet it proves A's film
    # is in B's record (or A and B are one person), so b2 must stay in A's group and split.
    rows = [("a1.png", "covid", "A"), ("a2.png", "covid", "A"), ("b1.png", "covid", "B"), ("b2.png", "normal", "B")]
    rows += [(f"o{i}.png", ("covid", "normal")[i % 2], f"O{i}") for i in range(12)]
    root = _manifest_tree(tmp_path / "site", rows, {"b1.png": "a1.png"})
    t = splits.prepare(root, seed=seed, cache_dir=cache)
    assert t.attrs["dropped"]["exact duplicate"] == 1 and "img/b1.png" not in set(t["path"])
    g = t.set_index("path")
    assert g.loc["img/a1.png", "group"] == g.loc["img/a2.png", "group"] == g.loc["img/b2.png", "group"]
    assert g.loc[["img/a1.png", "img/a2.png", "img/b2.png"], "split"].nunique() == 1
    assert t["group"].nunique() == 13  # A+B and the 12 others


def test_crosswalk_patients_are_one_split_group(tmp_path, cache):
    root = write_tree(tmp_path / "d", {**tree_files(), **hannover_files()})
    for seed in range(5):
        t = splits.prepare(root, seed=seed, cache_dir=cache).set_index("path")
        one = t.loc[["hannover/png/i1.png", "hannover/png/i2.png", "ieee8023/images/shared.png",
                     "ieee8023/images/g.png"]]
        assert one["group"].nunique() == 1 and one["split"].nunique() == 1


def test_prepare_drops_unreadable(tmp_path, cache):
    root = write_tree(tmp_path / "d", tree_files())
    (root / "nih" / "Pneumonia" / "00000004_002.png").write_bytes(b"broken")
    t = splits.prepare(root, cache_dir=cache)
    assert "nih/Pneumonia/00000004_002.png" not in set(t["path"])
    assert t.attrs["dropped"]["unreadable image"] == 1
    assert "00000004_002.png" in next(iter(t.attrs["unreadable"]))


def test_fingerprint_cache_follows_file_changes(tmp_path, cache, monkeypatch):
    root = write_tree(tmp_path / "d", tree_files())
    t = load_table(root)
    shas, thumbs, _ = splits.fingerprints(t, root, cache_dir=cache)
    assert (cache / "fingerprints.npz").exists()
    calls = []
    real_load = images.load
    monkeypatch.setattr(images, "load", lambda *a, **k: calls.append(a[0]) or real_load(*a, **k))
    shas2, thumbs2, _ = splits.fingerprints(t, root, cache_dir=cache)
    assert calls == [] and shas2 == shas and np.allclose(thumbs2, thumbs)
    changed = root / t["path"][0]
    changed.write_bytes(image_bytes(999, "JPEG" if changed.suffix == ".jpg" else "PNG"))
    os.utime(changed, ns=(1, 1))
    shas3, _, _ = splits.fingerprints(t, root, cache_dir=cache)
    assert len(calls) == 1 and shas3[0] != shas[0] and shas3[1:] == shas[1:]


def test_split_file_round_trip(tmp_path, cache):
    root = write_tree(tmp_path / "d", tree_files())
    f = tmp_path / "split.csv"
    t = splits.prepare(root, seed=3, split_file=f, cache_dir=cache)
    assert f.exists()
    loaded = splits.load_split(f)
    assert list(loaded.columns) == splits.SPLIT_COLUMNS
    again = splits.prepare(root, seed=999, split_file=f, cache_dir=cache)  # the file wins over the seed
    merged = t.merge(again, on="path", suffixes=("", "_2"))
    assert len(merged) == len(t) and (merged["split"] == merged["split_2"]).all()
    # an image the split file does not list is left out (and counted), never silently trained on
    (root / "nih" / "Pneumonia" / "00000005_000.png").write_bytes(image_bytes(4242))
    third = splits.prepare(root, split_file=f, cache_dir=cache)
    assert len(third) == len(t) and third.attrs["dropped"]["not in split file"] == 1


def test_split_file_from_another_root_is_refused(tmp_path, cache):
    root = write_tree(tmp_path / "d", tree_files())
    f = tmp_path / "other.csv"
    f.write_text("path,split\nsomewhere/else.png,train\n")
    with pytest.raises(ValueError, match="lists none of the"):
        splits.prepare(root, split_file=f, cache_dir=cache)


@pytest.mark.parametrize("content,match", [
    ("path,label\na.png,covid\n", "lacks column"),
    ("path,split\na.png,training\n", "unknown split"),
    ("path,split\na.png,train\na.png,test\n", "twice"),
])
def test_load_split_rejects_bad_files(tmp_path, content, match):
    f = tmp_path / "s.csv"
    f.write_text(content)
    with pytest.raises(ValueError, match=match):
        splits.load_split(f)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        splits.load_split(tmp_path / "none.csv")


def _table(groups: list[int], labels: list[str]) -> pd.DataFrame:
    n = len(groups)
    return pd.DataFrame({
        "path": [f"x{i}.png" for i in range(n)], "label": labels, "source": ["s"] * n,
        "patient_id": [f"s:{g}" for g in groups],
    })


def test_make_split_small_and_edge_cases():
    one = splits.make_split(_table([0], ["covid"]))
    assert one["split"].tolist() == ["train"]
    t = splits.make_split(_table([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], ["covid"] * 5 + ["normal"] * 5))
    assert t["split"].value_counts().to_dict() == {"train": 7, "test": 2, "val": 1}
    all_train = splits.make_split(_table([0, 1, 2], ["covid"] * 3), fractions=(1, 0, 0))
    assert set(all_train["split"]) == {"train"}
    with pytest.raises(ValueError, match="fractions"):
        splits.make_split(_table([0], ["covid"]), fractions=(0.5, 0.5))
    empty = splits.make_split(_table([], []))
    assert len(empty) == 0 and "split" in empty.columns


@settings(max_examples=40, deadline=None)
@given(
    groups=st.lists(st.integers(0, 30), min_size=1, max_size=120),
    seed=st.integers(0, 2**31),
    links=st.lists(st.tuples(st.integers(0, 119), st.integers(0, 119)), max_size=10),
)
def test_no_patient_or_duplicate_ever_crosses_splits(groups, seed, links):
    labels = [("covid", "normal", "pneumonia")[g % 3] for g in groups]
    t = _table(groups, labels)
    n = len(t)
    dups = pd.DataFrame(
        [{"path_a": f"x{a % n}.png", "path_b": f"x{b % n}.png", "kind": "near", "score": 0.99} for a, b in links],
        columns=["path_a", "path_b", "kind", "score"],
    )
    out = splits.make_split(t, seed=seed, duplicates=dups)
    assert len(out) == n and set(out["split"]) <= set(splits.SPLITS)
    assert_no_leak(out, dups)
