"""Load: concurrent dashboard sessions each get their own answer; memory stays bounded.

* 8 ``AppTest`` sessions of ``dashboard/app.py`` run in 8 threads of one process (so they share
  ``st.cache_resource`` / ``st.cache_data``, as browser sessions of one server do). Each uploads
  a different real X-ray whose P(covid) was first computed directly with the model; each must
  show its own value and a heatmap overlay (no cross-session mix-up through the caches).
  AppTest installs a fresh mock ``Runtime`` per run in a process-global slot and clears it when
  the run ends, which breaks runs that overlap in time ("Runtime hasn't been created!"); the
  ``one_server`` fixture instead installs ONE runtime (media store, cache storage) shared by all
  sessions, which is what a real ``streamlit run`` server has. AppTest also patches global
  config and page state around each run, so the script runs of the 8 live sessions are
  interleaved under a lock rather than overlapped (measured: overlapping runs fail in AppTest's
  own bookkeeping about 1 time in 4). Truly simultaneous hits on the shared caches are tested
  by ``test_parallel_calls_into_the_case_store`` (8 threads calling the page's analysis at the
  same moment). Analysed films live in each session's own state (``dashboard.state.case``): the
  8 sessions must each hold their own copy of a film two of them uploaded.
* 200 different uploads go through the app's own path (``dashboard.state.case`` ->
  ``core.explain.film_views``, what the Explain page calls) in one process: resident memory after
  a warm-up of 20 must grow by less than a bound.
  (200 full AppTest runs take minutes; ``tests/benchmarks/bench_load.py`` does that and reports it.)

The model is the shipped one when present, else a tiny known-answer run (P(covid) a function
of mean brightness) written by the test.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from core import checks, config, images, runs
from dashboard import state

N_SESSIONS = 8
_RUN_LOCK = threading.Lock()  # AppTest.run is not thread-safe (see the module docstring)


def rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def app_run(tmp_path_factory):
    """(run folder, runs root to point the app at) — the shipped model, or a known-answer run."""
    if (config.DEFAULT_RUN / "model.keras").is_file():
        return config.DEFAULT_RUN.resolve(), None
    from robust_util import brightness_run

    root = tmp_path_factory.mktemp("runs")
    return brightness_run(root).resolve(), root


@pytest.fixture
def one_server(monkeypatch):
    """One shared Streamlit runtime for all AppTest sessions of the test (see the module doc)."""
    from unittest.mock import MagicMock

    import streamlit.testing.v1.app_test as app_test_mod
    from streamlit.components.v2.component_manager import BidiComponentManager
    from streamlit.runtime import Runtime
    from streamlit.runtime.caching.storage.dummy_cache_storage import MemoryCacheStorageManager
    from streamlit.runtime.dataframe_source_manager import DataframeSourceManager
    from streamlit.runtime.media_file_manager import MediaFileManager
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    shared = MagicMock(spec=Runtime)
    shared.media_file_mgr = MediaFileManager(MemoryMediaFileStorage("/mock/media"))
    shared.dataframe_source_mgr = DataframeSourceManager()
    shared.cache_storage_manager = MemoryCacheStorageManager()
    bidi = BidiComponentManager()
    bidi.discover_and_register_components(start_file_watching=False)
    shared.bidi_component_registry = bidi

    class PerRunSlot:  # AppTest writes its per-run mock here instead of the global slot
        _instance = None

    monkeypatch.setattr(app_test_mod, "Runtime", PerRunSlot)
    monkeypatch.setattr(Runtime, "_instance", shared)
    return shared


@pytest.fixture
def app_env(app_run, monkeypatch):
    run, root = app_run
    if root is not None:
        monkeypatch.setenv("CXR_RUNS_DIR", str(root))
    return run


def pool_files(cxr_root: Path, n: int) -> list[Path]:
    """Real X-rays from every source, interleaved (deterministic)."""
    groups = [
        sorted((cxr_root / "nih" / "No_findings").glob("*.png")),
        sorted((cxr_root / "kermany" / "NORMAL").glob("*.jp*g")),
        sorted((cxr_root / "ieee8023" / "images").glob("*.jp*g")),
        sorted((cxr_root / "nih" / "Pneumonia").glob("*.png")),
        sorted((cxr_root / "kermany" / "PNEUMONIA").glob("*.jp*g")),
        sorted((cxr_root / "ieee8023" / "images").glob("*.png")),
    ]
    out = []
    for i in range(max(len(g) for g in groups)):
        for g in groups:
            if i < len(g):
                out.append(g[i])
            if len(out) == n:
                return out
    return out


def distinct_cases(run: Path, files: list[Path], k: int, gap: float = 0.01) -> list[tuple[Path, float]]:
    """k files whose directly computed P(covid) differ pairwise by at least ``gap``."""
    from core import inputs
    from core import model as cmodel

    model = runs.load_model(run)
    size = cmodel.input_size(model)
    crop = inputs.settings(runs.read_config(run))
    chosen: list[tuple[Path, float]] = []
    for f in files:
        native = images.load(f)
        if checks.image_warnings(native, f.read_bytes()):
            continue  # the page withholds the answer for such images
        # the network's input as every path reads it (core.inputs.load: decoded at the needed size)
        p = float(cmodel.probabilities(model, inputs.load(f, size, crop)[0][None])[0, config.COVID_INDEX])
        if all(abs(p - q) >= gap for _, q in chosen):
            chosen.append((f, p))
        if len(chosen) == k:
            break
    assert len(chosen) == k, f"only {len(chosen)} images with distinct P(covid) among {len(files)}"
    return chosen


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _elements(at, kind: str) -> list:
    return [e for e in at.main if type(e).__name__ == kind]


def new_session(run: Path):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(config.REPO_ROOT / "dashboard" / "app.py"), default_timeout=180)
    at.session_state["run"] = str(run)
    with _RUN_LOCK:
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def upload(at, name: str, data: bytes, mime: str = "image/png"):
    at.file_uploader(key="explain_upload").set_value((name, data, mime))
    with _RUN_LOCK:
        at.run()
    return at


def shown_p_covid(at) -> float | None:
    for m in at.metric:
        if m.label == "P(covid)":
            return float(m.value)
    return None


@pytest.mark.slow
def test_concurrent_sessions_get_their_own_result(app_env, cxr_root, one_server):
    run = app_env
    cases = distinct_cases(run, pool_files(cxr_root, 80), N_SESSIONS)
    results: dict[int, dict] = {}
    barrier = threading.Barrier(N_SESSIONS)

    def session(i: int, path: Path) -> None:
        try:
            at = new_session(run)
            barrier.wait(timeout=300)  # all sessions upload at the same moment
            t = time.perf_counter()
            upload(at, path.name, path.read_bytes(), "image/png" if path.suffix == ".png" else "image/jpeg")
            results[i] = {
                "p": shown_p_covid(at),
                "seconds": time.perf_counter() - t,
                "errors": [e.value for e in at.error] + [e.value for e in at.exception],
                "images": len(_elements(at, "Image")) + len(at.get("plotly_chart")),
                "at": at,
            }
        except Exception as exc:  # reported below, with the session number
            import traceback

            results[i] = {"crash": repr(exc), "tb": traceback.format_exc()}

    threads = [threading.Thread(target=session, args=(i, f)) for i, (f, _) in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(results) == N_SESSIONS
    for i, (f, expected) in enumerate(cases):
        r = results[i]
        assert "crash" not in r, r.get("tb")
        assert not r["errors"], (i, f.name, r["errors"])
        assert r["p"] is not None, f"session {i} shows no P(covid) (checks may have withheld it: {f.name})"
        assert abs(r["p"] - expected) <= 0.0011, f"session {i} ({f.name}) shows {r['p']}, expected {expected:.4f}"
        assert r["images"] >= 2, f"session {i}: no heatmap overlay"
    lat = sorted(r["seconds"] for r in results.values())
    print(f"{N_SESSIONS} concurrent uploads: latency p50 {np.percentile(lat, 50):.2f} s, max {lat[-1]:.2f} s")
    # Second round: every session uploads the image of its neighbour; each must follow its own upload,
    # and compute it itself: analysed films live in the session's own state, never shared.
    for i in range(N_SESSIONS):
        j = (i + 1) % N_SESSIONS
        f, expected = cases[j]
        at = upload(results[i]["at"], f.name, f.read_bytes(), "image/png" if f.suffix == ".png" else "image/jpeg")
        shown = shown_p_covid(at)
        assert shown is not None and abs(shown - expected) <= 0.0011, (
            i, j, shown, expected, [e.value for e in list(at.error) + list(at.exception) + list(at.warning)])
    stores = [dict(results[i]["at"].session_state[state.SESSION_CASES]) for i in range(N_SESSIONS)]
    for i, store in enumerate(stores):
        j = (i + 1) % N_SESSIONS
        assert [k[2] for k in store] == [digest(cases[i][0]), digest(cases[j][0])], f"session {i} keeps its own two films"
        mine = next(v for k, v in store.items() if k[2] == digest(cases[j][0]))
        theirs = next(v for k, v in stores[j].items() if k[2] == digest(cases[j][0]))
        assert mine is not theirs and mine.shown is not theirs.shown, "a film is never shared across sessions"
        assert np.array_equal(mine.probs, theirs.probs)


def test_memory_bounded_across_200_uploads(app_env, cxr_root):
    """200 different uploads through the Explain page's path (dashboard.state.case, then the
    redraw's core.explain.film_views): the session keeps its last films only, RSS growth after
    warm-up is bounded."""
    from core import explain
    from dashboard import state

    run = app_env
    files = pool_files(cxr_root, 200)
    assert len(files) == 200
    blobs = [f.read_bytes() for f in files]
    rss = []
    t0 = time.perf_counter()
    for i, data in enumerate(blobs):
        try:
            entry, _ = state.case(run, data, files[i].name, maps=[("gradcam", 0, None)])
        except images.ImageError:
            continue
        heat = entry.maps[("gradcam", 0, None)]["heat"]
        over = explain.film_views(entry.shown, heat, "overlay", 0.4, "jet", entry.lungs, entry.box)[0]
        assert over.shape == (*entry.shown.shape, 3) and np.isfinite(entry.probs).all()
        assert len(state._store()) <= state.CASES_PER_SESSION
        if i in (19, 199) or i % 20 == 19:
            rss.append(rss_mib())
    seconds = time.perf_counter() - t0
    growth = rss[-1] - rss[0]
    print(f"RSS after 20 uploads {rss[0]:.0f} MiB, after 200 {rss[-1]:.0f} MiB (growth {growth:.0f} MiB); "
          f"{seconds / 200 * 1000:.0f} ms per upload; samples {[round(x) for x in rss]}")
    assert growth < 120, f"RSS grew by {growth:.0f} MiB over 180 uploads: {rss}"


def test_parallel_calls_into_the_case_store(app_env, cxr_root):
    """8 threads analyse films through dashboard.state.case at the same moment, twice, with rotated
    images (threads outside a script run share one session's store, so they also evict each
    other's films): each gets exactly its own P(covid) and heatmap (compared with direct calls)."""
    from core import explain, inputs
    from core import model as cmodel
    from dashboard import state

    run = app_env
    model = runs.load_model(run)
    size = cmodel.input_size(model)
    crop = inputs.settings(runs.read_config(run))
    cases = distinct_cases(run, pool_files(cxr_root, 80), N_SESSIONS)
    blobs = [(f.name, f.read_bytes()) for f, _ in cases]
    direct_heat = [explain.explain(model, inputs.load(b, size, crop, name=n)[0], "gradcam") for n, b in blobs]
    barrier = threading.Barrier(N_SESSIONS)
    got: dict[tuple[int, int], tuple[float, np.ndarray]] = {}
    crashes: list[str] = []

    def worker(i: int) -> None:
        try:
            for rnd in range(2):
                k = (i + rnd * 3) % N_SESSIONS
                name, data = blobs[k]
                barrier.wait(timeout=300)
                entry, _ = state.case(run, data, name, maps=[("gradcam", 0, None)])
                got[(i, rnd)] = (k, float(entry.probs[config.COVID_INDEX]), entry.maps[("gradcam", 0, None)]["hmap"])
        except Exception as exc:  # reported below
            crashes.append(f"{i}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not crashes, crashes
    assert len(got) == 2 * N_SESSIONS
    for (i, rnd), (k, p, h) in got.items():
        assert abs(p - cases[k][1]) < 1e-5, (i, rnd, k, p, cases[k][1])
        assert np.allclose(h, direct_heat[k], atol=1e-4), (i, rnd, k, float(np.abs(h - direct_heat[k]).max()))
    assert len(state._store()) <= state.CASES_PER_SESSION
