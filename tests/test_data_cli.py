"""python -m core.data audit|split|download, the download against a local HTTP server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_datasets import SYNTH_COUNTS, image_bytes, tree_files, write_tree

from core import config, data, download
from core.datasets import load_table

PY = sys.executable


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "core.data", *args], cwd=config.REPO_ROOT, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})},
    )


# ----------------------------------------------------------------------------- audit / split
def test_audit_json_on_real_data(cxr_root):
    r = run_cli("audit", "--data", str(cxr_root), "--json", "--no-near")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert rep["counts"] == {"covid": 578, "normal": 300, "pneumonia": 234}
    assert rep["by_source"] == {
        "hannover": {"covid": 166},
        "ieee8023": {"covid": 412, "pneumonia": 74},
        "kermany": {"normal": 120, "pneumonia": 120},
        "nih": {"normal": 180, "pneumonia": 40},
    }
    assert rep["dropped"]["ieee8023: lateral view"] == 44
    assert rep["dropped"]["ieee8023: not an X-ray (CT)"] == 8
    total = sum(n for labels in rep["by_source_label_split"].values() for splits in labels.values()
                for n in splits.values())
    assert total == 1112
    assert set(rep["by_source_label_split"]["hannover"]["covid"]) == {"train", "val", "test"}
    assert rep["views"]["kermany"] == {"AP": 240}
    assert rep["views"]["hannover"] == {"AP": 150, "PA": 16}
    assert rep["sexes"]["hannover"] == {"F": 37, "M": 129}
    assert rep["patients_by_source"]["hannover"] == 43 and rep["patients_linked_across_sources"] == 15
    assert rep["leaks"] == {"patients_across_splits": 0, "duplicates_across_splits": 0}
    assert not any("comes from one source" in w and "covid" in w for w in rep["warnings"])  # two covid sources now
    assert any("source hannover holds only covid images" in w for w in rep["warnings"])
    assert not any("source ieee8023 holds only" in w for w in rep["warnings"])
    assert any("no source holds both covid and normal images" in w for w in rep["warnings"])
    assert rep["source_predictability"]["covid_auc_from_source"] > 0.9


def test_audit_text_and_duplicates(tmp_path, monkeypatch):
    files = tree_files()
    files["nih/No_findings/00000009_000.png"] = files["kermany/NORMAL/IM-0007-0001.jpeg"]
    root = write_tree(tmp_path / "d", files)
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    rep = data.audit(root, seed=2)
    assert rep["duplicates"]["exact"] == 1 and rep["dropped"]["exact duplicate"] == 1
    assert rep["counts"] == {"covid": 3, "normal": 7, "pneumonia": 10}
    text = data.format_audit(rep)
    assert "WARNING: every covid image (3) comes from one source, ieee8023" in text
    assert "exact" in text and "kermany" in text
    json.dumps(rep)  # JSON-ready


def test_audit_finds_leaks_in_a_split_file(tmp_path, monkeypatch):
    files = tree_files()
    files["nih/No_findings/00000009_000.png"] = files["kermany/NORMAL/IM-0007-0001.jpeg"]  # exact copy
    root = write_tree(tmp_path / "d", files)
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    t = load_table(root)
    t["split"] = "train"
    t.loc[t["path"] == "nih/No_findings/00000009_000.png", "split"] = "test"  # the copy leaks into test
    t.loc[t["path"] == "kermany/PNEUMONIA/person1_virus_7.jpeg", "split"] = "val"  # person1 spans two splits
    t[["path", "split"]].to_csv(tmp_path / "split.csv", index=False)
    rep = data.audit(root, split_file=tmp_path / "split.csv", near=False)
    assert rep["leaks"] == {"patients_across_splits": 1, "duplicates_across_splits": 1}
    assert sum("cross splits" in w for w in rep["warnings"]) == 1
    assert sum("more than one split" in w for w in rep["warnings"]) == 1
    fresh = data.audit(root, near=False)
    assert fresh["leaks"] == {"patients_across_splits": 0, "duplicates_across_splits": 0}


def test_split_cli_is_reproducible(tmp_path, monkeypatch, capsys):
    root = write_tree(tmp_path / "d", tree_files())
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert data.main(["split", "--data", str(root), "--out", str(a), "--seed", "5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sum(summary["by_split"].values()) == sum(SYNTH_COUNTS.values())
    monkeypatch.setenv("CXR_DATA_DIR", str(root))  # no --data: the environment variable is used
    assert data.main(["split", "--out", str(b), "--seed", "5"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert a.read_bytes() == b.read_bytes()


def test_cli_label_map_for_own_class_folders(tmp_path, monkeypatch, capsys):
    root = tmp_path / "mine"
    for i, (sub, n) in enumerate([("Positive", 12), ("Negative", 12), ("Other", 3)]):
        (root / sub).mkdir(parents=True)
        for k in range(n):
            (root / sub / f"{k}.png").write_bytes(image_bytes(1000 * i + k))
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["audit", "--data", str(tmp_path), "--json", "--label-map", "Positive=covid,Negative=normal"]
    assert data.main(argv) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["counts"] == {"covid": 12, "normal": 12, "pneumonia": 0}
    assert rep["dropped"] == {"mine: folder Other/ not in label map": 3}
    with pytest.raises(SystemExit):
        data.main(["audit", "--data", str(tmp_path), "--label-map", "Positive=sick"])
    assert "LABEL one of" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert data.main(["audit", "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        data.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "audit" in out and "download" in out


# ----------------------------------------------------------------------------- download
class _Server:
    """A local HTTP server with Range support that can cut a transfer short once."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_once: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("Content-Type", "application/zip")
                self.end_headers()
                payload = body[start:]
                if self.path in server.cut_once:
                    server.cut_once.discard(self.path)
                    self.wfile.write(payload[: len(payload) // 2])  # then drop the connection
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server(monkeypatch):
    monkeypatch.setattr(download, "RETRY_WAIT", 0.0)
    s = _Server()
    yield s
    s.close()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, payload in members.items():
            z.writestr(name, payload)
    return buf.getvalue()


def upstream_archives() -> dict[str, bytes]:
    """Small archives in the real upstream layouts (GitHub archive, Mendeley ChestXRay2017.zip)."""
    files = tree_files(kermany="chest_xray", kermany_split=True)
    top = f"covid-chestxray-dataset-{download.IEEE8023_COMMIT}/"
    ieee = {top + k[len("ieee8023/"):]: v for k, v in files.items() if k.startswith("ieee8023/")}
    ieee[top + "README.md"] = b"# covid-chestxray-dataset\n"
    kermany = {k: v for k, v in files.items() if k.startswith("chest_xray/")}
    kermany["__MACOSX/chest_xray/train/NORMAL/._IM-0001-0001.jpeg"] = b"junk"
    kermany["chest_xray/.DS_Store"] = b"junk"
    nih = {f"COVID-19-{download.NIH_COMMIT}/X-Ray Image DataSet/{k[len('nih/'):]}": v
           for k, v in files.items() if k.startswith("nih/")}
    return {"/ieee.zip": zip_bytes(ieee), "/kermany.zip": zip_bytes(kermany), "/nih.zip": zip_bytes(nih)}


def test_download_extracts_real_layouts_and_resumes(server, tmp_path):
    server.files.update(upstream_archives())
    server.cut_once.add("/kermany.zip")  # the first transfer breaks half-way
    to = tmp_path / "data"
    urls = {"ieee8023": server.url + "/ieee.zip", "kermany": server.url + "/kermany.zip",
            "nih": server.url + "/nih.zip"}
    sha = {"ieee8023": hashlib.sha256(server.files["/ieee.zip"]).hexdigest()}
    summary = download.download(to, ["ieee8023", "kermany", "nih"], urls=urls, sha256=sha, progress=False)
    assert {k: v["status"] for k, v in summary["sources"].items()} == dict.fromkeys(
        ("ieee8023", "kermany", "nih"), "downloaded")
    # the broken transfer was resumed with a Range request for the missing bytes only
    kreqs = [r for p, r in server.requests if p == "/kermany.zip"]
    assert kreqs[0] is None and kreqs[1].startswith("bytes=") and int(kreqs[1][6:-1]) > 0
    assert (to / "ieee8023" / "metadata.csv").is_file() and (to / "ieee8023" / "README.md").is_file()
    assert (to / "kermany" / "train" / "NORMAL").is_dir() and not (to / "kermany" / ".DS_Store").exists()
    assert not (to / "nih" / "Covid-19").exists()  # Ozturk's copies of ieee8023 images are left out
    assert not (to / ".downloads").exists()  # archives removed after extraction
    t = load_table(to)
    assert t.groupby(["source", "label"]).size().to_dict() == SYNTH_COUNTS
    # a second call finds everything in place and asks the server for nothing
    n = len(server.requests)
    again = download.download(to, ["ieee8023", "kermany"], urls=urls, progress=False)
    assert {v["status"] for v in again["sources"].values()} == {"present"} and len(server.requests) == n


def test_download_resumes_a_part_file(server, tmp_path):
    body = zip_bytes({"x/metadata.csv": b"patientid\n", "x/images/a.png": image_bytes(1)})
    server.files["/a.zip"] = body
    dest = tmp_path / "a.zip"
    (tmp_path / "a.zip.part").write_bytes(body[:100])
    download.download_file(server.url + "/a.zip", dest, sha256=hashlib.sha256(body).hexdigest(), progress=False)
    assert dest.read_bytes() == body and not (tmp_path / "a.zip.part").exists()
    assert server.requests == [("/a.zip", "bytes=100-")]
    # a complete .part: the server answers 416 and the file is accepted as it is
    dest.unlink()
    (tmp_path / "a.zip.part").write_bytes(body)
    download.download_file(server.url + "/a.zip", dest, progress=False)
    assert dest.read_bytes() == body


def test_download_errors(server, tmp_path):
    server.files["/bad.zip"] = b"this is not an archive" * 10
    good = upstream_archives()["/ieee.zip"]
    corrupt = bytearray(good)
    i = good.index(b"patientid")  # flip a byte inside a stored member: the CRC check must catch it
    corrupt[i] ^= 0xFF
    server.files["/corrupt.zip"] = bytes(corrupt)
    server.files["/ieee.zip"] = good
    server.files["/kermany.zip"] = upstream_archives()["/kermany.zip"]
    with pytest.raises(download.DownloadError, match="HTTP 404"):
        download.download_file(server.url + "/missing.zip", tmp_path / "m.zip", progress=False)
    with pytest.raises(download.DownloadError, match="not a readable zip or tar"):
        download.download(tmp_path / "d1", ["ieee8023"], urls={"ieee8023": server.url + "/bad.zip"}, progress=False)
    with pytest.raises(download.DownloadError, match="corrupt"):
        download.download(tmp_path / "d2", ["ieee8023"], urls={"ieee8023": server.url + "/corrupt.zip"}, progress=False)
    assert not (tmp_path / "d2" / ".downloads" / "ieee8023.archive").exists()  # a bad archive is never reused
    with pytest.raises(download.DownloadError, match="sha256"):
        download.download(tmp_path / "d3", ["ieee8023"], urls={"ieee8023": server.url + "/ieee.zip"},
                      sha256={"ieee8023": "0" * 64}, progress=False)
    with pytest.raises(download.DownloadError, match="no metadata.csv"):
        download.download(tmp_path / "d4", ["ieee8023"], urls={"ieee8023": server.url + "/kermany.zip"}, progress=False)
    assert not (tmp_path / "d1" / "ieee8023").exists()  # nothing half-extracted is left behind


def test_download_cli_with_env_urls(server, tmp_path, monkeypatch, capsys):
    server.files.update(upstream_archives())
    monkeypatch.setenv("CXR_IEEE8023_URL", server.url + "/ieee.zip")
    monkeypatch.setenv("CXR_KERMANY_URL", server.url + "/kermany.zip")
    assert data.main(["download", "--to", str(tmp_path / "dl"), "--json"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert set(summary["sources"]) == {"ieee8023", "kermany"}
    assert "100%" in err  # a progress bar on stderr
    assert Path(tmp_path / "dl" / "ieee8023" / ".download.json").is_file()
    assert data.main(["download", "--to", str(tmp_path / "dl2"), "--sources", "nope"]) == 2
    assert "unknown source" in capsys.readouterr().err
