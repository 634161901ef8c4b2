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
* Callers queued behind a mount attempt that failed get that attempt's error instead of
  starting one mount each (a mount storm against a dead server).
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from fusemux.config import Config, ExportConfig
from fusemux.core.mounter import MNT_DETACH, Mounter, is_mounted, umount2
from fusemux.errors import FusemuxError, MountError, NotFound, ShuttingDown

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
            last_error=self.last_error,
            target=self.target,
        )


class ExportManager:
    """Mounts exports on first acquire and unmounts them after the last release."""

    def __init__(
        self, config: Config, mounter: Mounter, nursery: trio.Nursery | None = None
    ) -> None:
        self.config = config
        self.mounter = mounter
        self.nursery = nursery  # where linger tasks run; set before the first request
        self.exports: dict[str, Export] = {
            name: Export(cfg, config.mnt_dir / name) for name, cfg in config.exports.items()
        }
        self.closing = False

    def get(self, name: str) -> Export:
        try:
            return self.exports[name]
        except KeyError:
            raise NotFound(f"no export named {name!r}") from None

    # -- holding -----------------------------------------------------------------------

    async def acquire(self, name: str) -> Export:
        """Add a holder, mounting the export first if needed. Raises MountError on failure."""
        export = self.get(name)
        if self.closing:
            raise ShuttingDown("fusemux is shutting down")
        export.holders += 1
        self._cancel_linger(export)
        try:
            if export.state is State.MOUNTED:
                return export  # fast path: no lock needed to join a mounted export
            seen_attempts = export.attempts
            async with export.lock:
                if export.mounted:  # mounted by the holder we queued behind
                    return export
                if export.state is State.FAILED and export.attempts != seen_attempts:
                    # A mount attempt failed while we queued for the lock: share its result.
                    raise MountError(export.last_error, export.last_errno)
                await self._mount(export)
                return export
        except BaseException:
            self._drop(export)
            raise

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
        if export.state is State.MOUNTED and not self.closing:
            linger = self.config.linger
            self._schedule_unmount(export, max(linger, TRANSIENT_GRACE) if transient else linger)

    # -- mounting ----------------------------------------------------------------------

    async def _mount(self, export: Export) -> None:
        """Mount under the lock. On failure: state failed, last_error set, error raised."""
        export.state = State.MOUNTING
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
            self._failed(export, e.message, e.errno)
            raise
        except OSError as e:
            message = f"cannot prepare {export.target}: {e.strerror}"
            self._failed(export, message, e.errno or MountError.errno)
            raise MountError(message, e.errno) from None
        except BaseException:
            # Cancelled mid-mount (only at shutdown): the helper's process group was killed.
            # Record what the kernel has; shutdown() unmounts whatever is mounted.
            export.state = State.MOUNTED if is_mounted(export.target) else State.UNMOUNTED
            raise
        export.attempts += 1
        export.state = State.MOUNTED
        export.mount_count += 1
        export.last_error = ""
        export.unmount_retry = UNMOUNT_RETRY_MIN
        log.info("export %s: mounted %s at %s", export.name, export.config.source, export.target)

    def _failed(self, export: Export, message: str, err: int) -> None:
        export.attempts += 1
        export.state = State.FAILED
        export.last_error = f"mount failed: {message}"
        export.last_errno = err
        log.warning("export %s: mount of %s failed: %s", export.name, export.config.source, message)

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
                if export.holders or export.state is not State.MOUNTED or self.closing:
                    return
                with trio.CancelScope(shield=True):
                    await self._unmount(export)

    async def _unmount(self, export: Export) -> None:
        """Unmount under the lock with holders == 0. A busy unmount is retried later."""
        export.state = State.UNMOUNTING
        try:
            await self.mounter.umount(export.target, self.config.mount_timeout)
        except FusemuxError as e:
            export.state = State.MOUNTED
            export.last_error = f"unmount failed: {e.message}"
            retry = export.unmount_retry
            export.unmount_retry = min(retry * 2, UNMOUNT_RETRY_MAX)
            log.warning(
                "export %s: unmount failed (%s); retrying in %gs", export.name, e.message, retry
            )
            if not self.closing:
                self._schedule_unmount(export, retry)
            return
        export.state = State.UNMOUNTED
        export.last_error = ""
        export.unmount_retry = UNMOUNT_RETRY_MIN
        log.info("export %s: unmounted %s", export.name, export.target)

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
