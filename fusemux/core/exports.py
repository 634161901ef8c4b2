"""The export mount manager: per-export state machine, lock, holder count and linger.

This module owns the answer to "is export X mounted, and may it be unmounted now?".

State machine per export::

    unmounted --acquire--> mounting --ok--> mounted --last release + linger--> unmounting
        ^                     |                ^                                 |
        |                     +--fail--> failed (next acquire retries)           |
        +-------------------------------------------------- ok ------------------+
                                               +------ busy (retried later) -----+

Concurrency rules (trio, single thread):

* ``holders`` counts open file handles, open directory handles and transient holds. It is
  incremented *before* waiting for the export's lock, so an unmount that is waiting for the
  same lock sees the new holder and gives up.
* Every mount and unmount runs under the export's lock; an unmount re-checks
  ``holders == 0`` under that lock. So no unmount ever runs while a holder exists.
* A release that drops ``holders`` to zero only schedules the linger task; the task does the
  unmount. A new holder during the linger cancels the task (it is shielded only once it holds
  the lock and has started the unmount).
* A mount runs in a task of its own (:class:`MountAttempt`), which every acquirer of the
  unmounted export waits for: a cancelled caller (an interrupted lookup) stops waiting but
  never aborts the mount for the others; the attempt is cancelled only when its last waiter
  has gone, or at shutdown. Every waiter gets the attempt's own error instead of starting
  one mount each (a mount storm against a dead server). After a failure, new
  acquires within a backoff window (1 s, doubling per consecutive failure up to 10 s) get the
  same error at once; the first acquire after the window retries. An admin's ``pin`` (the
  ``ctl`` xattr) skips the window.
* A pin is a holder like an open file, owned by the admin instead of a process.
* A config reload never touches a mounted export's options: a changed export takes its new
  config at its next mount; a removed export keeps serving its holders and disappears once
  it is idle and unmounted.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from fusemux.config import Config, ExportConfig
from fusemux.core import metrics
from fusemux.core.mounter import MNT_DETACH, Mounter, is_mounted, umount2
from fusemux.errors import Busy, FusemuxError, MountError, NotFound, ShuttingDown
from fusemux.logfmt import errname, fields

log = logging.getLogger(__name__)

# Worker threads per export for backing-file syscalls. A hung export can exhaust only its
# own threads.
THREADS_PER_EXPORT = 8
# Minimum idle time after the last holder was a transient hold or a directory handle
# (lookup, getattr, readdir). Without it, linger 0 would mount twice for every first open:
# once for the kernel's LOOKUP and once for the OPEN that follows it.
TRANSIENT_GRACE = 1.0
# Delay before retrying an unmount that failed (EBUSY), doubled up to the maximum.
UNMOUNT_RETRY_MIN = 1.0
UNMOUNT_RETRY_MAX = 60.0
# Against mount storms: after a failed mount, acquires fail fast with the same error until
# the backoff has passed (doubled per consecutive failure, capped).
MOUNT_BACKOFF_MIN = 1.0
MOUNT_BACKOFF_MAX = 10.0


class Health(enum.StrEnum):
    """How a mounted export's backing filesystem answers (core/health.py decides)."""

    OK = "ok"
    SLOW = "slow"  # statvfs answered, but took longer than health.HEALTH_SLOW
    UNRESPONSIVE = "unresponsive"  # statvfs overdue, or failed (ENOTCONN, ESTALE, EIO)


class State(enum.StrEnum):
    UNMOUNTED = "unmounted"
    MOUNTING = "mounting"
    MOUNTED = "mounted"
    UNMOUNTING = "unmounting"
    FAILED = "failed"


@dataclass(frozen=True)
class ExportSnapshot:
    """A frozen view of one export, for xattrs and status."""

    name: str
    source: str
    fstype: str
    state: State
    holders: int
    mount_count: int
    last_error: str
    target: Path
    pinned: bool = False
    retry_in: float = 0.0  # seconds until a failed export may be mounted again
    removed: bool = False  # dropped from the config; disappears once idle
    health: Health = Health.OK


@dataclass
class MountAttempt:
    """One mount of an export under way, shared by every acquire that waits for it."""

    done: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    waiters: int = 0
    mounted: bool = False
    error: FusemuxError | None = None


class Export:
    """Mutable state of one export. Mutated only by :class:`ExportManager`."""

    def __init__(self, config: ExportConfig, target: Path) -> None:
        self.config = config
        self.target = target
        self.state = State.UNMOUNTED
        self.holders = 0
        self.mount_count = 0
        self.last_error = ""
        self.attempts = 0  # mount attempts finished
        self.lock = trio.Lock()
        self.limiter = trio.CapacityLimiter(THREADS_PER_EXPORT)
        self.linger_scope: trio.CancelScope | None = None
        self.last_errno = 0
        self.unmount_retry = UNMOUNT_RETRY_MIN
        self.failures = 0  # consecutive failed mounts
        self.retry_at = 0.0  # trio time before which acquires fail fast after a failure
        self.pinned = False  # an admin pin (ctl=mount) is one of the holders
        self.next_config: ExportConfig | None = None  # applied at the next mount
        self.removed = False  # dropped from the config by a reload
        self.inflight = 0  # requests in (or queued for) a worker thread on this export
        self.statvfs_probe: Any = None  # fs.StatvfsProbe in flight, shared by its callers
        # Set by ExportManager: take a holder now; returns the function that drops it.
        self.hold: Callable[[], Callable[[], None]] = lambda: lambda: None
        self.saturated = False  # inflight hit the cap; new requests fail with EIO
        self.mount_attempt: MountAttempt | None = None  # a mount under way, if any
        # For metrics (core/metrics.py): failed mounts by errno name, abandoned backing calls.
        self.mount_failures: dict[str, int] = {}
        self.io_timeouts = 0
        # Set by core/health.py while mounted; reset to ok when unmounted.
        self.health = Health.OK
        self.health_error = ""  # what last_error shows while health is not ok
        self.probe_seconds = 0.0  # duration of the last statvfs health probe

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def mounted(self) -> bool:
        return self.state is State.MOUNTED

    def backing_path(self, name: str) -> Path:
        return self.target / name

    def snapshot(self) -> ExportSnapshot:
        return ExportSnapshot(
            name=self.name,
            source=self.config.source,
            fstype=self.config.fstype,
            state=self.state,
            holders=self.holders,
            mount_count=self.mount_count,
            last_error=self.last_error or self.health_error,
            target=self.target,
            pinned=self.pinned,
            retry_in=self._retry_in(),
            removed=self.removed,
            health=self.health,
        )

    def reset_health(self) -> None:
        """Nothing to probe (not mounted): ok again, and no health error shown."""
        self.health = Health.OK
        self.health_error = ""

    def _retry_in(self) -> float:
        if self.state is not State.FAILED:
            return 0.0
        try:
            now = trio.current_time()
        except RuntimeError:  # outside trio (a snapshot taken by a test)
            return 0.0
        return max(0.0, self.retry_at - now)


class ExportManager:
    """Mounts exports on first acquire and unmounts them after the last release."""

    def __init__(
        self, config: Config, mounter: Mounter, nursery: trio.Nursery | None = None
    ) -> None:
        self.config = config
        self.mounter = mounter
        self.nursery = nursery  # where linger tasks run; set before the first request
        self.exports: dict[str, Export] = {
            name: self._new_export(cfg) for name, cfg in config.exports.items()
        }
        self.closing = False
        # Called with an export's name when a removed export has gone idle and is dropped.
        self.on_removed: Callable[[str], None] = lambda name: None

    def _new_export(self, cfg: ExportConfig) -> Export:
        export = Export(cfg, self.config.mnt_dir / cfg.name)

        def hold() -> Callable[[], None]:
            # A backing call still running after its caller gave up (io_timeout): it uses
            # the backing mount like a lookup does, so it holds the export until it returns.
            export.holders += 1
            self._cancel_linger(export)
            return lambda: self.release(export, transient=True)

        export.hold = hold
        return export

    def get(self, name: str) -> Export:
        try:
            return self.exports[name]
        except KeyError:
            raise NotFound(f"no export named {name!r}") from None

    # -- holding -----------------------------------------------------------------------

    async def acquire(self, name: str, retry_now: bool = False) -> Export:
        """Add a holder, mounting the export first if needed. Raises MountError on failure.

        Within the backoff window after a failed mount the failure is repeated at once,
        unless *retry_now* (an admin's explicit mount request).
        """
        export = self.get(name)
        if self.closing:
            raise ShuttingDown("fusemux is shutting down")
        if export.state is State.FAILED and not retry_now and trio.current_time() < export.retry_at:
            raise MountError(export.last_error, export.last_errno)
        export.holders += 1
        self._cancel_linger(export)
        try:
            if export.state is State.MOUNTED:
                return export  # fast path: no lock needed to join a mounted export
            await self._wait_for_mount(export)
            return export
        except BaseException:
            self._drop(export)
            raise

    async def _wait_for_mount(self, export: Export) -> None:
        """Wait for the export's mount attempt, starting one if none is under way.

        The attempt runs as a task of its own in the manager's nursery, not in any caller's:
        a caller that is cancelled (an interrupted LOOKUP, a killed opener) only stops
        waiting, and the mount goes on for everyone else who waits for it. Only when the
        last waiter has gone is the attempt itself cancelled (its helper's process group is
        killed), since then nobody needs it. Every waiter gets the attempt's own result, so
        a failure is shared instead of starting one mount per caller (a mount storm).
        """
        attempt = export.mount_attempt
        if attempt is None:
            attempt = export.mount_attempt = MountAttempt()
            if self.nursery is None:  # used before bind(): unit tests only
                await self._run_attempt(export, attempt)
            else:
                self.nursery.start_soon(self._run_attempt, export, attempt)
        attempt.waiters += 1
        try:
            await attempt.done.wait()
        finally:
            attempt.waiters -= 1
            if attempt.waiters == 0 and not attempt.done.is_set():
                attempt.scope.cancel()
        if attempt.error is not None:  # a fresh copy per waiter, of the same class
            raise type(attempt.error)(attempt.error.message, attempt.error.errno)
        if not attempt.mounted:
            raise ShuttingDown(f"export {export.name}: the mount was cancelled")

    async def _run_attempt(self, export: Export, attempt: MountAttempt) -> None:
        try:
            with attempt.scope:
                async with export.lock:
                    if not export.mounted:  # an adopted or recovered mount needs none
                        await self._mount(export)
                    attempt.mounted = True
        except FusemuxError as e:
            attempt.error = e
        finally:
            if export.mount_attempt is attempt:
                export.mount_attempt = None
            attempt.done.set()
            # Every waiter gave up meanwhile, or the attempt was cancelled after the kernel
            # had mounted: nobody holds it, so it lingers and goes like any idle export.
            if export.holders == 0 and export.mounted:
                self._drop_to_idle(export, transient=True)

    def release(self, export: Export, transient: bool = False) -> None:
        """Drop a holder; the last one schedules the unmount after the linger time.

        *transient* marks holds that are not open files (lookups, stats, directory handles):
        when one of those is the last to go, the export waits at least TRANSIENT_GRACE.
        """
        self._drop(export, transient)

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[Export]:
        """A transient hold, for lookups and stats that need the backing filesystem."""
        export = await self.acquire(name)
        try:
            yield export
        finally:
            self.release(export, transient=True)

    @asynccontextmanager
    async def hold_if_mounted(self, name: str) -> AsyncIterator[Export | None]:
        """A transient hold only if the export is mounted now (never mounts); else None.

        Used by statfs and the capacity xattrs: they must not mount anything, and the export
        must not be unmounted under their statvfs.
        """
        export = self.get(name)
        if export.state is not State.MOUNTED or self.closing:
            yield None
            return
        # A peek: it blocks an unmount while it runs but leaves a running linger alone, so
        # polling `df` or `fusemux status` never keeps an idle export mounted.
        export.holders += 1
        try:
            yield export
        finally:
            export.holders -= 1
            if export.holders == 0 and export.linger_scope is None:
                self._drop_to_idle(export, transient=True)

    def _drop(self, export: Export, transient: bool = False) -> None:
        if export.holders <= 0:
            log.error("export %s: release without a holder (bug)", export.name)
            return
        export.holders -= 1
        if export.holders == 0:
            self._drop_to_idle(export, transient)

    def _drop_to_idle(self, export: Export, transient: bool) -> None:
        if self.closing:
            return
        if export.removed:
            # Dropped from the config: no linger; unmount (if mounted) and forget it.
            self._schedule_unmount(export, 0.0)
        elif export.state is State.MOUNTED:
            linger = self.config.linger
            self._schedule_unmount(export, max(linger, TRANSIENT_GRACE) if transient else linger)

    # -- mounting ----------------------------------------------------------------------

    async def _mount(self, export: Export) -> None:
        """Mount under the lock. On failure: state failed, last_error set, error raised."""
        if export.next_config is not None:
            log.info("export %s: applying its new configuration", export.name)
            export.config, export.next_config = export.next_config, None
        export.state = State.MOUNTING
        started = trio.current_time()
        try:
            await trio.to_thread.run_sync(
                lambda: os.makedirs(export.target, mode=0o700, exist_ok=True)
            )
            if is_mounted(export.target):
                # Left over from an earlier run that died: adopt it as ours.
                log.warning("export %s: adopting existing mount at %s", export.name, export.target)
            else:
                await self.mounter.mount(export.config, export.target, self.config.mount_timeout)
        except FusemuxError as e:
            metrics.mount_done(export.name, trio.current_time() - started, ok=False)
            self._failed(export, e.message, e.errno)
            raise
        except OSError as e:
            metrics.mount_done(export.name, trio.current_time() - started, ok=False)
            message = f"cannot prepare {export.target}: {e.strerror}"
            self._failed(export, message, e.errno or MountError.errno)
            raise MountError(message, e.errno) from None
        except BaseException:
            # Cancelled mid-mount (at shutdown, or every waiter gave up): the helper's
            # process group was killed. Record what the kernel has; an idle mount lingers
            # and goes (see _run_attempt), shutdown() unmounts whatever is mounted.
            export.state = State.MOUNTED if is_mounted(export.target) else State.UNMOUNTED
            raise
        metrics.mount_done(export.name, trio.current_time() - started, ok=True)
        export.attempts += 1
        export.state = State.MOUNTED
        export.reset_health()
        export.mount_count += 1
        export.last_error = ""
        export.unmount_retry = UNMOUNT_RETRY_MIN
        export.failures = 0
        log.info(
            "export %s: mounted %s at %s",
            export.name,
            export.config.source,
            export.target,
            extra=fields(export=export.name, op="mount"),
        )

    def _failed(self, export: Export, message: str, err: int) -> None:
        export.attempts += 1
        export.state = State.FAILED
        export.last_error = f"mount failed: {message}"
        export.last_errno = err
        reason = errname(err)
        export.mount_failures[reason] = export.mount_failures.get(reason, 0) + 1
        backoff = min(MOUNT_BACKOFF_MIN * 2**export.failures, MOUNT_BACKOFF_MAX)
        export.failures += 1
        export.retry_at = trio.current_time() + backoff
        log.warning(
            "export %s: mount of %s failed: %s (next attempt allowed in %gs)",
            export.name,
            export.config.source,
            message,
            backoff,
            extra=fields(export=export.name, op="mount", errno=reason),
        )

    # -- unmounting --------------------------------------------------------------------

    def _cancel_linger(self, export: Export) -> None:
        if export.linger_scope is not None:
            export.linger_scope.cancel()
            export.linger_scope = None

    def _schedule_unmount(self, export: Export, delay: float) -> None:
        self._cancel_linger(export)
        scope = trio.CancelScope()
        export.linger_scope = scope
        assert self.nursery is not None, "ExportManager used before it got a nursery"
        self.nursery.start_soon(self._linger_then_unmount, export, scope, delay)

    async def _linger_then_unmount(
        self, export: Export, scope: trio.CancelScope, delay: float
    ) -> None:
        with scope:
            if delay > 0:
                await trio.sleep(delay)
            async with export.lock:
                if export.linger_scope is scope:
                    export.linger_scope = None
                if export.holders or self.closing:
                    return
                if export.state is State.MOUNTED:
                    with trio.CancelScope(shield=True):
                        await self._unmount(export)
                if export.removed and export.state is not State.MOUNTED:
                    self._forget(export)

    async def _unmount(self, export: Export) -> bool:
        """Unmount under the lock with holders == 0. A busy unmount is retried later.

        Returns whether the export is unmounted now.
        """
        export.state = State.UNMOUNTING
        try:
            await self.mounter.umount(export.target, self.config.mount_timeout)
        except FusemuxError as e:
            export.state = State.MOUNTED
            export.last_error = f"unmount failed: {e.message}"
            retry = export.unmount_retry
            export.unmount_retry = min(retry * 2, UNMOUNT_RETRY_MAX)
            log.warning(
                "export %s: unmount failed (%s); retrying in %gs",
                export.name,
                e.message,
                retry,
                extra=fields(export=export.name, op="unmount", errno=errname(e.errno)),
            )
            if not self.closing:
                self._schedule_unmount(export, retry)
            return False
        export.state = State.UNMOUNTED
        export.reset_health()
        export.last_error = ""
        export.unmount_retry = UNMOUNT_RETRY_MIN
        log.info(
            "export %s: unmounted %s",
            export.name,
            export.target,
            extra=fields(export=export.name, op="unmount"),
        )
        return True

    # -- a backing mount that vanished -----------------------------------------------------

    async def recover(self, export: Export) -> bool:
        """Remount *export* if it is ``mounted`` but its backing mount is gone.

        Someone unmounted it from outside (``umount -l``). Handles opened before keep their
        detached mount; new lookups and opens need the export mounted again. Returns whether
        a new mount was made (the caller then retries once); raises MountError if it failed.
        """
        if export.state is not State.MOUNTED:
            return False
        if await trio.to_thread.run_sync(is_mounted, export.target):
            return False
        async with export.lock:
            if export.state is not State.MOUNTED or is_mounted(export.target):
                return export.state is State.MOUNTED
            log.warning(
                "export %s: the backing mount at %s vanished (unmounted from outside); "
                "mounting it again",
                export.name,
                export.target,
            )
            export.state = State.UNMOUNTED
        # As any first mount: a cancelled caller must not abort it for the others.
        await self._wait_for_mount(export)
        return True

    # -- admin control (the ctl xattr) ---------------------------------------------------

    async def pin(self, name: str) -> Export:
        """Mount *name* now (skipping a failure backoff) and keep it mounted until unpinned.

        The pin is one holder. Pinning a pinned export changes nothing.
        """
        export = await self.acquire(name, retry_now=True)
        if export.pinned:
            self._drop(export)  # already pinned: give back the holder we just took
        else:
            export.pinned = True
            log.info("export %s: pinned by the admin", export.name, extra=fields(export=name))
        return export

    async def unpin(self, name: str) -> None:
        """Remove the admin's pin and unmount now. EBUSY, changing nothing, if anything else
        holds the export; EBUSY also if the backing mount itself is busy (retried later)."""
        export = self.get(name)
        others = export.holders - (1 if export.pinned else 0)
        if others > 0:
            raise Busy(f"export {name} has {others} other holder(s); nothing changed")
        async with export.lock:
            others = export.holders - (1 if export.pinned else 0)
            if others > 0:
                raise Busy(f"export {name} has {others} other holder(s); nothing changed")
            if export.pinned:
                export.pinned = False
                export.holders -= 1
                log.info("export %s: unpinned by the admin", export.name, extra=fields(export=name))
            self._cancel_linger(export)
            if export.state is State.MOUNTED and not self.closing:
                with trio.CancelScope(shield=True):
                    unmounted = await self._unmount(export)
                if not unmounted:
                    raise Busy(f"export {name}: {export.last_error}; retried later")
            if export.removed and export.state is not State.MOUNTED:
                self._forget(export)

    # -- configuration reload ------------------------------------------------------------

    def reload(self, config: Config) -> list[str]:
        """Adopt a new (already validated) config; returns one line per change.

        Added exports appear at once. A changed export takes its new options at its next
        mount (at once if it is not mounted). A removed export keeps serving its holders,
        loses its pin, and disappears once idle and unmounted.
        """
        changes: list[str] = []
        old = self.exports
        for name, cfg in config.exports.items():
            export = old.get(name)
            if export is None:
                self.exports[name] = self._new_export(cfg)
                changes.append(f"export {name}: added")
                continue
            if export.removed:
                export.removed = False
                changes.append(f"export {name}: kept (it was being removed)")
            if _same(export.config, cfg) and export.next_config is None:
                continue
            if _same(export.config, cfg):
                export.next_config = None
            elif export.state in (State.UNMOUNTED, State.FAILED):
                export.config = cfg
                export.next_config = None
                export.retry_at = 0.0  # a new config deserves a new attempt
                changes.append(f"export {name}: changed")
            else:
                export.next_config = cfg
                changes.append(f"export {name}: changed; applied at its next mount")
        for name, export in list(old.items()):
            if name in config.exports or export.removed:
                continue
            export.removed = True
            if export.pinned:
                export.pinned = False
                self._drop(export)
            if export.holders == 0:
                self._drop_to_idle(export, transient=False)
                changes.append(f"export {name}: removed")
            else:
                changes.append(
                    f"export {name}: removed; it disappears once its {export.holders} "
                    "holder(s) are gone"
                )
        self.config = config
        return changes

    def _forget(self, export: Export) -> None:
        if self.exports.get(export.name) is export:
            del self.exports[export.name]
            log.info("export %s: removed from the configuration and now gone", export.name)
            self.on_removed(export.name)

    # -- restart ---------------------------------------------------------------------------

    def adopt_existing(self) -> list[str]:
        """Exports already mounted at their targets (a daemon died): adopt them as idle.

        Each gets its linger and is then unmounted the normal way (busy: retried). Returns
        the adopted names.
        """
        adopted = []
        for export in self.exports.values():
            if export.state is State.UNMOUNTED and is_mounted(export.target):
                export.state = State.MOUNTED
                export.mount_count += 1
                adopted.append(export.name)
                log.warning(
                    "export %s: adopted the backing mount left at %s", export.name, export.target
                )
                self._drop_to_idle(export, transient=False)
        return adopted

    # -- shutdown ----------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Unmount every export fusemux mounted, whatever the holders (handles are closed).

        A backing mount that stays busy (another process has its cwd in it) is detached
        lazily as a last resort, with a warning: the daemon must not leave mounts behind.
        """
        self.closing = True
        for export in self.exports.values():
            self._cancel_linger(export)
        async with trio.open_nursery() as nursery:
            for export in self.exports.values():
                nursery.start_soon(self._shutdown_one, export)

    async def _shutdown_one(self, export: Export) -> None:
        with trio.move_on_after(self.config.mount_timeout + 5):
            async with export.lock:
                if not is_mounted(export.target):
                    export.state = State.UNMOUNTED
                    return
                await self._unmount(export)
        if is_mounted(export.target):
            log.warning(
                "export %s: %s is still busy at shutdown; detaching it lazily",
                export.name,
                export.target,
            )
            try:
                await trio.to_thread.run_sync(umount2, export.target, MNT_DETACH)
                export.state = State.UNMOUNTED
            except OSError as e:
                log.error("export %s: cannot detach %s: %s", export.name, export.target, e)


def _same(a: ExportConfig, b: ExportConfig) -> bool:
    """Whether two configs of an export mount the same thing the same way."""
    fields = ("source", "fstype", "options", "read_only", "io_timeout")
    return all(getattr(a, f) == getattr(b, f) for f in fields)
