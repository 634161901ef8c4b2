"""Tier (a): a model-based (hypothesis stateful) test of the export mount manager.

A :class:`hypothesis.stateful.RuleBasedStateMachine` drives one
:class:`~fusemux.core.exports.ExportManager` over a :class:`~tests.fakes.FakeMounter` through
random sequences of: opens (plain, several at once, cancelled part-way), closes, transient
holds, peeks (``hold_if_mounted``), the passing of time (linger expiry, backoff windows,
unmount retries), mount failures, hanging mounts (killed at ``mount_timeout``), busy unmounts,
and the admin's pin/unpin, over three exports with a linger of 0, below the transient grace
time, or above it.

The manager's lock, tasks and clock belong to one trio run, so each example hosts one trio run
(:class:`TrioHost`) in a background thread with a :class:`trio.testing.MockClock`. Each rule
hands one coroutine to that run with ``trio.from_thread.run``. While a rule runs, the clock
jumps whenever every task is blocked (so a hanging mount times out in no real time); before
the rule returns, the run settles (every task blocked) and the clock is frozen again, so
between rules no timer fires and the state can be compared with the model.

Invariants after every step, as in the storm: no target is ever mounted twice and no unmount
ever happens while the export has holders (the fake records both), ``holders`` equals the
model's open handles plus one for a pin, holders are never negative, an export with holders is
mounted, ``failed`` with its backoff (``retry_in``) exactly when the model says so, and an
export idle for longer than its linger (no busy unmount meanwhile) is unmounted. At teardown,
after everything is released and every fault is cleared, time passes beyond every linger,
backoff and retry: every export is then unmounted (or failed) with no holder and no pending
linger task, and every successful mount was matched by one successful unmount.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

import fusemux.core.exports as exports_mod
from fusemux.core.exports import (
    MOUNT_BACKOFF_MAX,
    MOUNT_BACKOFF_MIN,
    TRANSIENT_GRACE,
    UNMOUNT_RETRY_MAX,
    Export,
    ExportManager,
    State,
)
from fusemux.errors import Busy, MountError, MountTimeout
from tests.fakes import FakeMounter, make_config

T = TypeVar("T")
NAMES = ("alpha", "beta", "gamma")
MOUNT_TIMEOUT = 3.0
# Amounts of time a rule lets pass; chosen around the lingers, the grace time, the mount
# timeout, the backoff window and the unmount retry maximum.
ADVANCES = (0.1, 0.5, 1.0, 1.5, 2.0, 2.01, 3.5, 11.0, UNMOUNT_RETRY_MAX + 1)


async def _inline_run_sync(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """trio.to_thread.run_sync, inline: a worker thread would let the mock clock jump."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


class TrioHost:
    """One trio run with a MockClock in a background thread, driven from the test thread."""

    def __init__(self) -> None:
        self.clock = trio.testing.MockClock()  # frozen between steps: autojump off
        self.error: BaseException | None = None
        self.nursery: trio.Nursery | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="trio-host", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self.token is None:
            raise RuntimeError(f"trio host did not start: {self.error!r}")

    def _run(self) -> None:
        try:
            trio.run(self._main, clock=self.clock)
        except BaseException as e:  # reported by check_alive() in the test thread
            self.error = e
        finally:
            self._ready.set()

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self.token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def check_alive(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the trio run crashed: {self.error!r}") from self.error

    def step(self, afn: Callable[[], Awaitable[T]]) -> T:
        """Run *afn* in the trio run (time jumps while all tasks wait), then settle."""
        self.check_alive()

        async def wrapped() -> T:
            self.clock.autojump_threshold = 0
            try:
                return await afn()
            finally:
                # Let every task that can run finish what it can; the clock stands still
                # while a task waits in wait_all_tasks_blocked.
                await trio.testing.wait_all_tasks_blocked()
                self.clock.autojump_threshold = math.inf

        try:
            return trio.from_thread.run(wrapped, trio_token=self.token)
        except (trio.RunFinishedError, trio.Cancelled) as e:
            # The run is going down (a task crashed it): report why, as a plain failure.
            self._thread.join(10)
            self.check_alive()
            raise AssertionError(f"the trio run ended during a step: {e!r}") from None

    def sync(self, fn: Callable[[], T]) -> T:
        """Run *fn* in the trio thread (for reads that need trio.current_time())."""
        self.check_alive()
        try:
            return trio.from_thread.run_sync(fn, trio_token=self.token)
        except (trio.RunFinishedError, trio.Cancelled) as e:
            self._thread.join(10)
            self.check_alive()
            raise AssertionError(f"the trio run ended: {e!r}") from None

    def close(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join(10)
        assert not self._thread.is_alive(), "the trio host did not stop"


@dataclass
class Handle:
    """An open file (or, if transient, a directory handle / lookup) in the model."""

    export: str
    transient: bool
    released: bool = False


@dataclass
class ModelExport:
    handles: int = 0  # holders from successful acquires (the pin not included)
    pinned: bool = False
    failures: int = 0  # consecutive failed mounts
    retry_at: float | None = None  # set while the export is failed: end of its backoff
    idle_at: float | None = None  # when the last holder went (while mounted)
    idle_delay: float = 0.0  # the linger that applies to that idle period
    tainted: bool = False  # an unmount may have been busy during the idle period


class ExportManagerMachine(RuleBasedStateMachine):
    """The model: holders per export, pins, failure backoff and idle periods."""

    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.host: TrioHost | None = None
        self.patches = pytest.MonkeyPatch()
        self.tmp = Path(tempfile.mkdtemp(prefix="fusemux-model-"))
        self.model = {name: ModelExport() for name in NAMES}
        self.held: list[Handle] = []
        self.failing: set[str] = set()
        self.linger = 0.0
        self.stats: dict[str, int] = {}

    # -- plumbing ----------------------------------------------------------------------

    @property
    def fake(self) -> FakeMounter:
        return self._fake

    def now(self) -> float:
        assert self.host is not None
        return self.host.clock.current_time()

    def export(self, name: str) -> Export:
        return self.manager.exports[name]

    def step(self, afn: Callable[[], Awaitable[T]]) -> T:
        assert self.host is not None
        return self.host.step(afn)

    def count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def in_backoff(self, name: str, now: float) -> bool:
        retry_at = self.model[name].retry_at
        return retry_at is not None and now < retry_at

    def expect_failure(self, name: str) -> bool:
        return self.fake.hang or name in self.failing

    def mounted_ok(self, name: str) -> None:
        m = self.model[name]
        m.failures = 0
        m.retry_at = None
        m.idle_at = None

    def mount_failed(self, name: str, now: float) -> None:
        m = self.model[name]
        m.retry_at = now + min(MOUNT_BACKOFF_MIN * 2**m.failures, MOUNT_BACKOFF_MAX)
        m.failures += 1
        m.idle_at = None

    def went_idle(self, name: str, transient: bool) -> None:
        m = self.model[name]
        if m.handles == 0 and not m.pinned:
            m.idle_at = self.now()
            m.idle_delay = max(self.linger, TRANSIENT_GRACE) if transient else self.linger
            m.tainted = self.fake.busy

    # -- setup ---------------------------------------------------------------------------

    @initialize(
        linger=st.sampled_from([0.0, 0.5, 2.0]),
        mount_delay=st.sampled_from([0.0, 0.25]),
        umount_delay=st.sampled_from([0.0, 0.25]),
    )
    def setup(self, linger: float, mount_delay: float, umount_delay: float) -> None:
        self.linger = linger
        config = make_config(self.tmp / "state", NAMES, linger=linger, mount_timeout=MOUNT_TIMEOUT)
        self._fake = FakeMounter(mount_delay=mount_delay, umount_delay=umount_delay)
        self.patches.setattr(trio.to_thread, "run_sync", _inline_run_sync)
        self.patches.setattr(exports_mod, "is_mounted", self._fake.is_mounted)
        self.patches.setattr(exports_mod, "umount2", self._fake.umount2)
        self.host = TrioHost()
        self.manager = ExportManager(config, self._fake, self.host.nursery)
        self._fake.manager = self.manager

    # -- holders -------------------------------------------------------------------------

    def _predict(self, name: str, now: float, retry_now: bool = False) -> str:
        """How an acquire starting now must end.

        'joined' (mounted already: success without a mount), 'ok' (one mount, success),
        'fail' (one mount, fails), 'timeout' (one mount, killed at mount_timeout),
        'backoff' (fails at once, no mount) or 'unsure' (a slow unmount is running).
        """
        state = self.export(name).state
        if state is State.MOUNTED:
            return "joined"
        if state is State.UNMOUNTING:
            return "unsure"  # a slow unmount is running; it may turn out busy
        if not retry_now and self.in_backoff(name, now):
            return "backoff"
        if self.fake.hang:
            return "timeout"
        return "fail" if name in self.failing else "ok"

    def _check_outcome(
        self, name: str, expected: str, outcome: str, calls_before: int, started: float
    ) -> None:
        """Compare an acquire's *outcome* ('ok' or 'fail') with the prediction; update the
        model's failure state."""
        calls = self.fake.mount_count(name) - calls_before
        if expected != "unsure":
            want = "ok" if expected in ("joined", "ok") else "fail"
            assert outcome == want, (name, expected, outcome)
            assert calls == (0 if expected in ("joined", "backoff") else 1), (expected, calls)
        else:
            assert calls <= 1, f"{calls} mount calls for one acquire"
        if expected == "backoff":
            assert self.now() == started
        elif expected == "timeout":
            assert self.now() == pytest.approx(started + MOUNT_TIMEOUT)
        if outcome == "ok":
            if calls:
                self.mounted_ok(name)
            self.model[name].idle_at = None
            assert self.export(name).state is State.MOUNTED
        elif calls:
            self.mount_failed(name, self.now())

    @rule(target=handles, name=st.sampled_from(NAMES), transient=st.booleans())
    def open(self, name: str, transient: bool) -> Any:
        """An open (or a lookup/opendir, if transient) that keeps its holder."""
        started = self.now()
        expected = self._predict(name, started)
        calls_before = self.fake.mount_count(name)

        async def go() -> str:
            try:
                await self.manager.acquire(name)
            except MountError as e:
                assert e.message and e.errno
                if expected == "timeout":
                    assert isinstance(e, MountTimeout)
                return "fail"
            return "ok"

        outcome = self.step(go)
        self.count(f"open:{outcome}")
        self._check_outcome(name, expected, outcome, calls_before, started)
        if outcome != "ok":
            return multiple()
        self.model[name].handles += 1
        handle = Handle(name, transient)
        self.held.append(handle)
        return handle

    @rule(target=handles, name=st.sampled_from(NAMES), n=st.integers(2, 5))
    def open_many(self, name: str, n: int) -> Any:
        """Several concurrent opens of one export: one mount attempt, one shared outcome."""
        started = self.now()
        expected = self._predict(name, started)
        calls_before = self.fake.mount_count(name)
        outcomes: list[str] = []

        async def one() -> None:
            try:
                await self.manager.acquire(name)
                outcomes.append("ok")
            except MountError:
                outcomes.append("fail")

        async def go() -> None:
            async with trio.open_nursery() as tasks:
                for _ in range(n):
                    tasks.start_soon(one)

        self.step(go)
        assert len(outcomes) == n
        assert len(set(outcomes)) == 1, f"concurrent opens disagree: {outcomes}"
        self.count(f"open_many:{outcomes[0]}")
        self._check_outcome(name, expected, outcomes[0], calls_before, started)
        if outcomes[0] != "ok":
            return multiple()
        self.model[name].handles += n
        handles = [Handle(name, False) for _ in range(n)]
        self.held.extend(handles)
        return multiple(*handles)

    @rule(target=handles, name=st.sampled_from(NAMES), patience=st.sampled_from([0.1, 1.0]))
    def open_cancelled(self, name: str, patience: float) -> Any:
        """An open whose caller gives up after *patience* seconds (e.g. an interrupted open)."""
        started = self.now()
        expected = self._predict(name, started)
        calls_before = self.fake.mount_count(name)
        slow = self.fake.hang or self.fake.mount_delay > patience
        if expected in ("fail", "ok", "timeout") and slow:
            expected = "cancelled"

        async def go() -> str:
            with trio.move_on_after(patience):
                try:
                    await self.manager.acquire(name)
                except MountError:
                    return "fail"
                return "ok"
            return "cancelled"

        outcome = self.step(go)
        self.count(f"open_cancelled:{outcome}")
        if expected == "cancelled" or outcome == "cancelled":
            assert outcome == "cancelled" and expected in ("cancelled", "unsure"), (
                expected,
                outcome,
            )
            export = self.export(name)
            allowed = {State.UNMOUNTED} | ({State.UNMOUNTING} if expected == "unsure" else set())
            assert export.state in allowed, export.snapshot()
            if export.state is not State.MOUNTED:
                self.model[name].retry_at = None  # no longer "failed": no backoff applies
            return multiple()
        self._check_outcome(name, expected, outcome, calls_before, started)
        if outcome != "ok":
            return multiple()
        self.model[name].handles += 1
        handle = Handle(name, False)
        self.held.append(handle)
        return handle

    @rule(handle=consumes(handles))
    def close(self, handle: Handle) -> None:
        """Release a holder (the last one starts the linger)."""
        assert not handle.released
        handle.released = True
        self.held.remove(handle)
        export = self.export(handle.export)
        assert export.state is State.MOUNTED  # invariant: held exports are mounted

        async def go() -> None:
            self.manager.release(export, transient=handle.transient)

        self.step(go)
        self.model[handle.export].handles -= 1
        self.went_idle(handle.export, handle.transient)

    @rule(name=st.sampled_from(NAMES), duration=st.sampled_from([0.0, 0.3, 2.0]))
    def hold(self, name: str, duration: float) -> None:
        """A transient hold (a lookup or stat) that lasts *duration* seconds."""
        started = self.now()
        expected = self._predict(name, started)
        calls_before = self.fake.mount_count(name)

        async def go() -> str:
            try:
                async with self.manager.hold(name) as export:
                    assert export.mounted and self.fake.is_mounted(export.target)
                    await trio.sleep(duration)
                    assert export.mounted and export.holders >= 1
            except MountError:
                return "fail"
            return "ok"

        outcome = self.step(go)
        self.count(f"hold:{outcome}")
        # Outcome and mount calls are decided at the acquire, before the sleep.
        if outcome == "fail":
            self._check_outcome(name, expected, outcome, calls_before, started)
        else:
            self._check_outcome(name, expected, outcome, calls_before, started)
            self.went_idle(name, transient=True)

    @rule(name=st.sampled_from(NAMES), duration=st.sampled_from([0.0, 0.3, 2.0]))
    def peek(self, name: str, duration: float) -> None:
        """hold_if_mounted (statfs, capacity xattrs) for *duration* seconds: never mounts.

        It blocks an unmount while it runs but leaves a running linger alone; a linger that
        expires during the peek finds a holder and gives up, and the end of the peek starts a
        new (transient) idle period.
        """
        calls_before = self.fake.mount_count(name)
        was_mounted = self.export(name).state is State.MOUNTED
        started = self.now()

        async def go() -> bool:
            async with self.manager.hold_if_mounted(name) as export:
                if export is None:
                    return False
                assert export.mounted and self.fake.is_mounted(export.target)
                await trio.sleep(duration)
                assert export.mounted and export.holders >= 1
                return True

        got = self.step(go)
        assert got == was_mounted
        assert self.fake.mount_count(name) == calls_before
        m = self.model[name]
        if got and m.idle_at is not None and m.handles == 0 and not m.pinned:
            expiry = m.idle_at + m.idle_delay
            ended = started + duration
            if started <= expiry < ended:
                m.idle_at = ended
                m.idle_delay = max(self.linger, TRANSIENT_GRACE)
                m.tainted = m.tainted or self.fake.busy
            elif expiry == ended:
                m.tainted = True  # the linger and the peek end at one instant: either order

    # -- time ----------------------------------------------------------------------------

    @rule(seconds=st.sampled_from(ADVANCES))
    def advance(self, seconds: float) -> None:
        """Let time pass: lingers expire, backoffs end, busy unmounts are retried."""

        async def go() -> None:
            await trio.sleep(seconds)

        self.step(go)

    @rule()
    def advance_past_linger(self) -> None:
        """Exactly past the longest linger that is running now."""
        pending = [m.idle_at + m.idle_delay for m in self.model.values() if m.idle_at is not None]
        until = max(pending, default=self.now()) + self.fake.umount_delay + 0.001

        async def go() -> None:
            await trio.sleep_until(until)

        self.step(go)

    # -- faults ------------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES))
    def fail(self, name: str) -> None:
        self.fake.fail(name)
        self.failing.add(name)

    @rule()
    def stop_failing(self) -> None:
        self.fake.stop_failing()
        self.failing.clear()

    @rule(on=st.booleans())
    def hang(self, on: bool) -> None:
        """Mounts hang until mount_timeout (then the helper is killed), or not."""
        self.fake.hang = on

    @rule(on=st.booleans())
    def busy(self, on: bool) -> None:
        """Unmounts answer EBUSY (someone has a cwd in the backing mount), or not."""
        self.fake.busy = on
        if on:
            for m in self.model.values():
                m.tainted = True

    # -- admin ---------------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES))
    def pin(self, name: str) -> None:
        """ctl=mount: mount now (skipping a backoff) and hold until unpinned."""
        started = self.now()
        expected = self._predict(name, started, retry_now=True)
        calls_before = self.fake.mount_count(name)

        async def go() -> str:
            try:
                await self.manager.pin(name)
            except MountError:
                return "fail"
            return "ok"

        outcome = self.step(go)
        self.count(f"pin:{outcome}")
        self._check_outcome(name, expected, outcome, calls_before, started)
        if outcome == "ok":
            self.model[name].pinned = True
            assert self.export(name).pinned

    @rule(name=st.sampled_from(NAMES))
    def unpin(self, name: str) -> None:
        """ctl=unmount: EBUSY if others hold it; else drop the pin and unmount now."""
        m = self.model[name]
        export = self.export(name)
        was_mounted = export.state in (State.MOUNTED, State.UNMOUNTING)
        umounts_before = self.fake.umount_count(export.target)

        async def go() -> str:
            try:
                await self.manager.unpin(name)
            except Busy:
                return "busy"
            return "ok"

        outcome = self.step(go)
        self.count(f"unpin:{outcome}")
        if m.handles > 0:
            assert outcome == "busy"
            assert self.fake.umount_count(export.target) == umounts_before  # nothing changed
            return
        m.pinned = False
        assert not export.pinned
        if was_mounted and self.fake.busy:
            assert outcome == "busy" and export.state is State.MOUNTED
            m.idle_at, m.tainted = self.now(), True
        else:
            assert outcome == "ok"
            assert export.state is not State.MOUNTED
            assert not self.fake.is_mounted(export.target)
            m.idle_at = None

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def model_invariants(self) -> None:
        if self.host is None:
            return
        self.host.check_alive()
        assert self.fake.violations == [], self.fake.violations
        now = self.now()
        snaps = self.host.sync(lambda: {n: e.snapshot() for n, e in self.manager.exports.items()})
        for name, m in self.model.items():
            snap = snaps[name]
            export = self.export(name)
            target_mounted = self.fake.is_mounted(export.target)
            assert snap.holders >= 0
            assert snap.holders == m.handles + (1 if m.pinned else 0), (name, snap, m)
            assert snap.pinned == m.pinned
            assert snap.state is not State.MOUNTING, snap  # no mount runs between steps
            if snap.holders > 0:
                assert snap.state is State.MOUNTED and target_mounted, snap
            if snap.state in (State.MOUNTED, State.UNMOUNTING):
                assert target_mounted, snap
            else:
                assert not target_mounted, snap
            assert (snap.state is State.FAILED) == (m.retry_at is not None), (snap, m)
            if m.retry_at is not None:
                assert snap.retry_in == pytest.approx(max(0.0, m.retry_at - now)), (snap, m)
            if m.idle_at is not None and not m.tainted and snap.holders == 0:
                done_at = m.idle_at + m.idle_delay + self.fake.umount_delay
                if now >= done_at:
                    assert snap.state is State.UNMOUNTED, (name, snap, m, now)
                    m.idle_at = None
                elif now < m.idle_at + m.idle_delay:
                    assert snap.state is State.MOUNTED, (name, snap, m, now)

    # -- teardown ------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.host is not None and self.host.error is None:
                self._final_checks()
        finally:
            if self.host is not None:
                self.host.close()
            self.patches.undo()
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self.host is not None:
            self.host.check_alive()

    def _final_checks(self) -> None:
        self.fake.stop_failing()
        self.fake.busy = False
        self.fake.hang = False
        self.failing.clear()
        held, self.held = self.held, []

        async def release_all() -> None:
            for handle in held:
                handle.released = True
                self.manager.release(self.export(handle.export), transient=handle.transient)
            for name in NAMES:
                if self.export(name).pinned:
                    await self.manager.unpin(name)
            await trio.sleep(
                max(self.linger, TRANSIENT_GRACE)
                + UNMOUNT_RETRY_MAX
                + MOUNT_BACKOFF_MAX
                + MOUNT_TIMEOUT
                + 5
            )

        self.step(release_all)
        assert self.fake.violations == []
        assert self.fake.mounted == set()
        for export in self.manager.exports.values():
            assert export.holders == 0 and not export.pinned, export.snapshot()
            assert export.state in (State.UNMOUNTED, State.FAILED), export.snapshot()
            assert export.linger_scope is None, export.snapshot()
            assert not export.lock.locked()
        assert sum(e.mount_count for e in self.manager.exports.values()) == self.fake.mounts_ok
        assert self.fake.mounts_ok == self.fake.umounts_ok


ExportManagerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestExportManagerModel = ExportManagerMachine.TestCase
