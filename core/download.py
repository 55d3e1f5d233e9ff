"""Fetching the public sources into their upstream layouts (``python -m core.data download``).

A download goes through a ``.part`` file and resumes with HTTP Range requests; sizes, checksums
and archive integrity are checked before anything is extracted, and extraction swaps a finished
folder in, so a failure never leaves half a source behind.
"""

from __future__ import annotations

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

from tqdm import tqdm

from core import runs


def log(msg: str) -> None:
    """One line on stderr (stdout is kept for ``--json``)."""
    print(msg, file=sys.stderr, flush=True)


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
