"""Bounded model work: at most N model calls run at once in this process, the rest wait in line.

A server that many people use at once (a classroom on one dashboard) must slow down gracefully
instead of running every request at the same moment: TensorFlow already spreads one call over
all cores, so more calls at once than cores only add contention and memory. Every model call
of the dashboard runs inside :func:`slot`::

    with work.slot(on_wait=lambda ahead: ...) as ticket:
        ...  # the model work
    ticket.waited, ticket.ahead, ticket.wait_s

Callers are served first come, first served. The number of slots is ``CXR_MODEL_SLOTS`` (an
integer >= 1) when set, else the number of CPU cores; :func:`configure` changes it at run time.
:func:`queued` and :func:`saturated` tell a page whether a new request would have to wait, so it
can say "queued" before it asks.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

ENV = "CXR_MODEL_SLOTS"


@dataclass
class Ticket:
    """What happened to one caller of :func:`slot`."""

    waited: bool = False  # True when every slot was taken (or others were in line) on arrival
    ahead: int = 0  # callers in line in front of this one on arrival (0 when it did not wait)
    wait_s: float = 0.0  # seconds spent in line


def default_slots() -> int:
    """``$CXR_MODEL_SLOTS`` when set, else the number of CPU cores (at least 1)."""
    raw = os.environ.get(ENV, "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"{ENV}={raw!r} is not an integer; set it to the number of model calls at once") from None
        if n < 1:
            raise ValueError(f"{ENV}={raw!r}: at least 1 model call must be allowed at once")
        return n
    return max(1, os.cpu_count() or 1)


_cond = threading.Condition()
_limit = default_slots()
_running = 0
_line: collections.deque = collections.deque()  # one token per waiting caller, first in line first


def configure(slots: int | None = None) -> int:
    """Set the number of slots (``None``: :func:`default_slots`); returns it. Callers already
    running keep their slot; waiting callers are let in as soon as the new limit allows."""
    global _limit
    n = default_slots() if slots is None else int(slots)
    if n < 1:
        raise ValueError("at least 1 model call must be allowed at once")
    with _cond:
        _limit = n
        _cond.notify_all()
    return n


def slots() -> int:
    """How many model calls may run at once."""
    return _limit


def running() -> int:
    """Model calls running now."""
    return _running


def queued() -> int:
    """Callers waiting in line now."""
    return len(_line)


def saturated() -> bool:
    """True when a caller arriving now would have to wait."""
    with _cond:
        return bool(_line) or _running >= _limit


@contextlib.contextmanager
def slot(on_wait: Callable[[int], None] | None = None) -> Iterator[Ticket]:
    """Run the block in one of the slots, waiting in line (first come, first served) for one.

    ``on_wait(ahead)`` is called once, in the caller's thread and before it blocks, when the
    caller has to wait (``ahead``: callers in line before it). Yields a :class:`Ticket`.
    """
    global _running
    ticket = Ticket()
    token = object()
    with _cond:
        if not _line and _running < _limit:
            _running += 1
        else:
            ticket.waited, ticket.ahead = True, len(_line)
            _line.append(token)
    if ticket.waited:
        t0 = time.perf_counter()
        try:
            if on_wait is not None:
                on_wait(ticket.ahead)
            with _cond:
                while _line[0] is not token or _running >= _limit:
                    _cond.wait()
                _line.popleft()
                _running += 1
                _cond.notify_all()  # the next in line may fit too (after configure() raised the limit)
        except BaseException:
            with _cond:
                if token in _line:  # left the line without a slot (callback failed, interrupted)
                    _line.remove(token)
                    _cond.notify_all()
            raise
        ticket.wait_s = time.perf_counter() - t0
    try:
        yield ticket
    finally:
        with _cond:
            _running -= 1
            _cond.notify_all()
