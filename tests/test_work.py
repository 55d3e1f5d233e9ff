"""core.work: at most N model calls at once, the rest wait first come first served, and say so."""

from __future__ import annotations

import gc
import threading
import time

import pytest

from core import config, work


@pytest.fixture(autouse=True)
def restore_slots():
    before = work.slots()
    yield
    work.configure(before)


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_never_more_than_n_at_once_and_everyone_finishes():
    work.configure(2)
    lock = threading.Lock()
    go = threading.Event()
    now, peak, done, tickets = [0], [0], [], []

    def job(i):
        with work.slot() as t:
            with lock:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
            go.wait(30)
            time.sleep(0.005)
            with lock:
                now[0] -= 1
        tickets.append(t)
        done.append(i)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    wait_until(lambda: work.running() == 2 and work.queued() == 10)
    go.set()
    for t in threads:
        t.join(timeout=30)
    assert sorted(done) == list(range(12))
    assert peak[0] == 2
    assert sum(t.waited for t in tickets) == 10
    assert work.running() == 0 and work.queued() == 0


def test_a_caller_that_waits_is_told_and_queued_counts_it():
    work.configure(1)
    told, got = [], {}
    with work.slot() as mine:
        assert not mine.waited and mine.ahead == 0
        assert work.saturated()
        th = threading.Thread(target=lambda: got.setdefault("t", _take(told)))
        th.start()
        wait_until(lambda: work.queued() == 1)
        time.sleep(0.05)
        assert th.is_alive()  # still waiting for the slot this block holds
    th.join(timeout=10)
    ticket = got["t"]
    assert ticket.waited and ticket.ahead == 0 and ticket.wait_s >= 0.04
    assert told == [0]
    assert not work.saturated() and work.queued() == 0


def _take(told):
    with work.slot(on_wait=told.append) as t:
        return t


def test_first_come_first_served():
    work.configure(1)
    order, aheads = [], []
    threads = []
    with work.slot():
        for i in range(5):
            def job(i=i):
                with work.slot(on_wait=aheads.append):
                    order.append(i)
            th = threading.Thread(target=job)
            th.start()
            threads.append(th)
            wait_until(lambda i=i: work.queued() == i + 1)  # in line before the next one arrives
    for th in threads:
        th.join(timeout=10)
    assert order == [0, 1, 2, 3, 4]
    assert aheads == [0, 1, 2, 3, 4]


def test_a_failing_block_gives_its_slot_back():
    work.configure(1)
    with pytest.raises(RuntimeError), work.slot():
        raise RuntimeError("model failed")
    assert work.running() == 0
    with work.slot() as t:
        assert not t.waited


def test_a_failing_wait_callback_leaves_the_line():
    work.configure(1)
    with work.slot():
        def bad(_):
            raise KeyboardInterrupt

        err = []
        th = threading.Thread(target=lambda: _catch(bad, err))
        th.start()
        th.join(timeout=10)
        assert err == ["left"] and work.queued() == 0
    with work.slot() as t:
        assert not t.waited


def _catch(cb, err):
    try:
        with work.slot(on_wait=cb):
            err.append("ran")
    except KeyboardInterrupt:
        err.append("left")


def test_raising_the_limit_lets_waiting_callers_in():
    work.configure(1)
    entered = threading.Event()
    with work.slot():
        th = threading.Thread(target=lambda: _enter(entered))
        th.start()
        wait_until(lambda: work.queued() == 1)
        work.configure(2)
        assert entered.wait(10)  # got in while the first slot is still held
    th.join(timeout=10)


def _enter(ev):
    with work.slot():
        ev.set()


def test_slots_from_the_environment(monkeypatch):
    monkeypatch.setenv(work.ENV, "3")
    assert work.default_slots() == 3
    assert work.configure() == 3
    monkeypatch.delenv(work.ENV)
    assert work.default_slots() >= 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(work.ENV, bad)
        with pytest.raises(ValueError, match=work.ENV):
            work.default_slots()
    with pytest.raises(ValueError):
        work.configure(0)


def test_dashboard_model_calls_take_a_slot_and_loading_freezes_the_heap():
    """The page's analysis of a film (dashboard.state.case) waits in line and says so before it
    waits; loading the model freezes the heap (Streamlit's full collection after every script
    run then skips TensorFlow's objects) and keeps TensorFlow's kernels across script runs; a
    film already analysed never waits."""
    # lazy: keras and the dashboard cost ~5 s; the other tests here are about core.work alone
    import keras
    from test_dashboard import chest_like_png

    from dashboard import state

    run = config.DEFAULT_RUN
    state.model(run)
    assert gc.get_freeze_count() > 50_000
    # Streamlit's after-run keras.backend.clear_session() no longer empties TensorFlow's kernel cache.
    assert getattr(keras.backend.clear_session, "keeps_kernels", False)
    work.configure(1)
    data = chest_like_png(seed=11)
    got, told = {}, []
    with work.slot():  # every slot is taken: the page's call must wait for it
        th = threading.Thread(target=lambda: got.setdefault("case", state.case(
            run, data, "film.png", maps=[("gradcam", 0, None)], on_wait=told.append)))
        th.start()
        wait_until(lambda: work.queued() == 1)
        assert "case" not in got and told == [0], "told it is queued (nobody ahead) before it waits"
    th.join(timeout=60)
    entry, waited = got["case"]
    assert waited is not None and waited > 0
    assert entry.probs.shape == (len(state.run_classes(run)),) and abs(float(entry.probs.sum()) - 1) < 1e-5
    assert entry.maps[("gradcam", 0, None)]["heat"].shape == entry.shown.shape
    with work.slot():  # a cache hit does not queue
        again, waited = state.case(run, data, "film.png", maps=[("gradcam", 0, None)], on_wait=told.append)
    assert again is entry and waited is None and told == [0]
