"""Tier (a): the per-export worker pools that run blocking backing-filesystem calls.

Covers results and exceptions crossing back into trio, the bound set by the export's limiter,
isolation (a hung export does not delay another one), thread reuse and idle threads ending.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from fusemux.config import ExportConfig
from fusemux.core import workers
from fusemux.core.exports import THREADS_PER_EXPORT, Export
from fusemux.errors import IoTimeout


async def tokens_returned(export: Export, timeout: float = 5.0) -> None:
    """Wait until every limiter token of *export* is back (the abandoned call has ended)."""
    with trio.fail_after(timeout):
        while export.limiter.borrowed_tokens:  # noqa: ASYNC110 - polls a thread-side effect
            await trio.sleep(0.01)


def _export(name: str) -> Export:
    return Export(ExportConfig(name=name, source=f"/src/{name}"), Path("/nonexistent") / name)


async def test_returns_results_and_raises_errors() -> None:
    pool = workers.for_export(_export("gold"))
    assert await pool.run(lambda a, b: a + b, 2, 3) == 5
    assert await pool.run(threading.get_ident) != threading.get_ident()
    with pytest.raises(FileNotFoundError):
        await pool.run(open, "/nonexistent/file")
    other = _export("silver")
    assert workers.for_export(other) is workers.for_export(other) is not pool


async def test_concurrency_is_bounded_by_the_export_limiter() -> None:
    export = _export("gold")
    pool = workers.for_export(export)
    lock = threading.Lock()
    running = peak = 0

    def job() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(THREADS_PER_EXPORT * 4):
            nursery.start_soon(pool.run, job)
    assert peak == THREADS_PER_EXPORT
    assert pool.threads <= THREADS_PER_EXPORT
    assert export.limiter.borrowed_tokens == 0


async def test_hung_export_does_not_stall_another() -> None:
    hung, healthy = _export("hung"), _export("healthy")
    release = threading.Event()
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(THREADS_PER_EXPORT * 2):  # every thread of "hung" blocked, more queued
                nursery.start_soon(workers.for_export(hung).run, release.wait)
            await trio.sleep(0.05)
            with trio.fail_after(5):
                for i in range(50):
                    assert await workers.for_export(healthy).run(abs, -i) == i
            assert hung.limiter.borrowed_tokens == THREADS_PER_EXPORT
            release.set()
    finally:
        release.set()


async def test_threads_are_reused_and_end_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "IDLE_TIMEOUT", 0.05)
    pool = workers.for_export(_export("gold"))
    idents = {await pool.run(threading.get_ident) for _ in range(20)}
    assert len(idents) == 1  # one call at a time: one thread, reused
    for _ in range(500):  # the count changes in the worker thread: poll it
        if not pool.threads:
            break
        await trio.sleep(0.01)
    assert pool.threads == 0
    assert await pool.run(abs, -7) == 7  # a new thread starts on demand


async def test_timeout_gives_up_waiting_but_keeps_the_token_until_the_call_ends() -> None:
    export = _export("gold")
    pool = workers.for_export(export)
    release = threading.Event()
    start = time.monotonic()
    with pytest.raises(IoTimeout) as info:
        await pool.run(release.wait, 10, timeout=0.2)
    assert info.value.errno == errno.ETIMEDOUT
    assert 0.2 <= time.monotonic() - start < 2
    # The call goes on in its thread and keeps its limiter token: the export's bound holds.
    assert export.limiter.borrowed_tokens == 1
    release.set()
    await tokens_returned(export)
    assert export.limiter.borrowed_tokens == 0
    # A call that returns in time is unaffected by the timeout.
    assert await pool.run(lambda: 42, timeout=5) == 42
    assert export.limiter.borrowed_tokens == 0


async def test_cancelling_a_timed_call_does_not_leak_its_token() -> None:
    export = _export("gold")
    pool = workers.for_export(export)
    release = threading.Event()
    with trio.move_on_after(0.1):
        await pool.run(release.wait, 10, timeout=5)
    assert export.limiter.borrowed_tokens == 1
    release.set()
    await tokens_returned(export)
    assert export.limiter.borrowed_tokens == 0


async def test_an_abandoned_call_reports_when_it_ends() -> None:
    export = _export("gold")
    pool = workers.for_export(export)
    release = threading.Event()
    events: list[str] = []

    def on_abandon() -> Callable[[], None]:
        events.append("abandoned")
        return lambda: events.append("ended")

    with pytest.raises(IoTimeout):
        await pool.run(release.wait, 10, timeout=0.1, on_abandon=on_abandon)
    assert events == ["abandoned"]
    release.set()
    await tokens_returned(export)
    assert events == ["abandoned", "ended"]
    # In time: neither is called.
    assert await pool.run(lambda: 1, timeout=5, on_abandon=on_abandon) == 1
    assert events == ["abandoned", "ended"]


async def test_io_timeouts_are_counted_for_the_metrics() -> None:
    """workers.run counts each call abandoned at the export's io_timeout (metrics)."""
    export = Export(
        ExportConfig(name="gold", source="/src/gold", io_timeout=0.1), Path("/nonexistent/gold")
    )
    release = threading.Event()
    assert export.io_timeouts == 0
    with pytest.raises(IoTimeout):
        await workers.run(export, release.wait, 10)
    assert export.io_timeouts == 1
    assert await workers.run(export, abs, -1) == 1  # in time: not counted
    assert export.io_timeouts == 1
    release.set()
    await tokens_returned(export)
