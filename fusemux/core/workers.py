"""Per-export worker threads: where every blocking syscall on a backing filesystem runs.

This module owns the offload of blocking calls out of the trio thread. :func:`run` is the
one entry point the core uses (file operations, image headers, mappings): it adds the
per-export in-flight cap and the export's ``io_timeout`` to the pool below. Each export gets its
own small pool of reusable threads (:class:`ExportWorkers`, at most
``exports.THREADS_PER_EXPORT`` threads, created on demand and ended after
:data:`IDLE_TIMEOUT` seconds idle). A call first takes a token of the export's own
``trio.CapacityLimiter`` (the same limiter the rest of the core uses), so the number of
threads busy on one export stays bounded no matter which path offloads: a hung export ties up
only its own threads, and requests for other exports keep running.

Why not ``trio.to_thread.run_sync``: it does the same job, but per call it copies the
context, waits on the limiter with two scheduling checkpoints and goes through trio's global
thread cache. Measured on this project's 2-core machine (4 KiB ``pread`` on tmpfs, one call
at a time) that is about 85-150 µs per call; this pool costs about 35-60 µs (docs/performance.md).
The handoff itself is the same: the job goes to a waiting thread through a queue, and the
result comes back through ``TrioToken.run_sync_soon`` (trio's wakeup fd).

Concurrency: the trio side only calls :meth:`ExportWorkers.run`. The thread bookkeeping
(``_threads``, ``_idle``) is guarded by a ``threading.Lock`` because worker threads change it
when they end. Invariant, under the lock: ``_idle`` = threads waiting for a job minus jobs
queued, so a job is queued only when a waiting thread has been counted for it or a new thread
is started for it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

from fusemux.core.exports import THREADS_PER_EXPORT, Export
from fusemux.errors import FusemuxError, IoTimeout

T = TypeVar("T")

log = logging.getLogger(__name__)

# Calls of one export allowed to wait on its backing filesystem at once. Half the engine's
# concurrent requests (pyfuse3: MAX_TASKS = 512), so other exports always keep the rest.
MAX_INFLIGHT_PER_EXPORT = 256
# A worker thread with nothing to do for this long ends (trio's own thread cache uses 10 s).
IDLE_TIMEOUT = 10.0

# (function, arguments, deliver(outcome) to call in the trio thread, the run's token)
_Job = tuple[
    Callable[..., Any],
    tuple[Any, ...],
    Callable[[outcome.Outcome[Any]], None],
    trio.lowlevel.TrioToken,
]


def _nothing() -> None:
    pass


def _notify(on_cancel: Callable[[], None], _: object) -> trio.lowlevel.Abort:
    on_cancel()  # the caller is cancelled: let the call know, then wait for it all the same
    return trio.lowlevel.Abort.FAILED


def _abort(_: object) -> trio.lowlevel.Abort:
    # Like trio.to_thread.run_sync without abandon_on_cancel: a syscall in flight cannot be
    # abandoned, so the caller waits for it (the export's limiter stays correct).
    return trio.lowlevel.Abort.FAILED


class ExportWorkers:
    """Up to *max_threads* reusable threads running blocking calls for one export."""

    def __init__(self, name: str, limiter: trio.CapacityLimiter, max_threads: int) -> None:
        self.name = name
        self.limiter = limiter
        self.max_threads = max_threads
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    @property
    def threads(self) -> int:
        return self._threads

    async def run(
        self,
        fn: Callable[..., T],
        *args: Any,
        timeout: float | None = None,
        on_abandon: Callable[[], Callable[[], None]] | None = None,
        abandonable: bool = False,
        on_cancel: Callable[[], None] | None = None,
    ) -> T:
        """Run ``fn(*args)`` in one of this export's threads and return (or raise) its result.

        With *timeout*, the caller stops waiting after that many seconds and gets
        :class:`IoTimeout`; the call itself cannot be stopped and goes on in its thread,
        which keeps its limiter token until it returns (so a hung export still ties up at
        most its own threads). Without, the caller waits for as long as the call takes.
        *on_abandon* is called when the caller gives up; what it returns is called once the
        abandoned call has returned. *abandonable*: a cancelled caller also gives up at once
        (without it, and without *timeout*, a cancelled caller waits for the call).
        *on_cancel* (without *timeout* and *abandonable*): called in the trio thread when the
        caller is cancelled while it waits, so that it can make the call return early (a lock
        wait, :mod:`fusemux.core.locks`); the caller still gets the call's own result.
        """
        borrower = object()
        try:
            self.limiter.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            await self.limiter.acquire_on_behalf_of(borrower)
        task = trio.lowlevel.current_task()
        abandoned = False
        finished: Callable[[], None] = _nothing

        def deliver(result: outcome.Outcome[Any]) -> None:
            if abandoned:  # the caller gave up: the thread is free now, so is its token
                self.limiter.release_on_behalf_of(borrower)
                finished()
            else:
                trio.lowlevel.reschedule(task, result)

        def give_up(_: object) -> trio.lowlevel.Abort:
            nonlocal abandoned, finished
            abandoned = True
            if on_abandon is not None:
                finished = on_abandon()
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            self._submit((fn, args, deliver, trio.lowlevel.current_trio_token()))
            if timeout is None:
                abort = give_up if abandonable else _abort
                if on_cancel is not None and not abandonable:
                    abort = functools.partial(_notify, on_cancel)
                result: T = await trio.lowlevel.wait_task_rescheduled(abort)
                return result
            with trio.move_on_after(timeout):
                result = await trio.lowlevel.wait_task_rescheduled(give_up)
                return result
            raise IoTimeout(f"no answer from the backing filesystem within {timeout:g}s")
        finally:
            if not abandoned:
                self.limiter.release_on_behalf_of(borrower)

    def _submit(self, job: _Job) -> None:
        with self._lock:
            self._queue.put(job)
            if self._idle > 0:
                self._idle -= 1
                return
            self._threads += 1
        try:
            threading.Thread(target=self._work, name=f"fusemux-{self.name}", daemon=True).start()
        except BaseException:
            with self._lock:
                self._threads -= 1
            raise

    def _work(self) -> None:
        q = self._queue
        while True:
            try:
                fn, args, deliver, token = q.get(timeout=IDLE_TIMEOUT)
            except queue.Empty:
                with self._lock:
                    if q.empty() and self._idle > 0:
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue  # a job was queued for a waiting thread just now: take it
            result = outcome.capture(fn, *args)
            del fn, args
            with self._lock:
                self._idle += 1
            # If the trio run ended while the call was in flight, nobody waits for it.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(deliver, result)
            del deliver, result


_pools: weakref.WeakKeyDictionary[Export, ExportWorkers] = weakref.WeakKeyDictionary()


async def run(export: Export, fn: Callable[..., T], *args: Any, abandonable: bool = False) -> T:
    """Run a blocking call on *export*'s backing filesystem: the one way the core does it.

    In one of the export's worker threads, with the export's ``io_timeout`` (ETIMEDOUT when
    exceeded; a call abandoned that way stays a holder of the export until it returns, so
    the export is not unmounted under it). At most MAX_INFLIGHT_PER_EXPORT calls of one
    export may be in here at once (in a thread or queued for one): the engine serves a
    bounded number of requests at a time for the whole mount, so without this cap a hung
    export would soak all of them up and stall every other export. Beyond it, calls fail at
    once with EIO.

    *abandonable* (calls without side effects, such as reads): a cancelled caller stops
    waiting at once, and the call is abandoned as at io_timeout. Other calls are waited for.
    """
    if export.inflight >= MAX_INFLIGHT_PER_EXPORT:
        if not export.saturated:
            export.saturated = True
            log.warning(
                "export %s: %d requests are stuck on its backing filesystem; failing "
                "new ones with EIO until they drain",
                export.name,
                export.inflight,
            )
        raise FusemuxError(f"export {export.name} is not answering", errno.EIO)
    export.inflight += 1
    try:
        timeout = export.config.io_timeout or None
        return await for_export(export).run(
            fn, *args, timeout=timeout, on_abandon=export.hold, abandonable=abandonable
        )
    except IoTimeout:
        export.io_timeouts += 1
        raise
    finally:
        export.inflight -= 1
        if export.saturated and export.inflight < MAX_INFLIGHT_PER_EXPORT // 2:
            export.saturated = False
            log.info("export %s: its backing filesystem answers again", export.name)


def for_export(export: Export) -> ExportWorkers:
    """The worker pool of *export* (created on first use, bounded by its limiter)."""
    pool = _pools.get(export)
    if pool is None:
        tokens = export.limiter.total_tokens
        size = int(tokens) if isinstance(tokens, int) else THREADS_PER_EXPORT
        pool = _pools[export] = ExportWorkers(export.name, export.limiter, size)
    return pool
