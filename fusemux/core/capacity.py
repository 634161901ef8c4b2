"""Capacity of the exports: ``statvfs`` probes of backing filesystems, and ``statfs``.

This module owns the answers to "how big is export X, how much is free" (the ``capacity``
and ``free`` xattrs, ``fusemux status``) and to ``statfs``/``df`` on the mount. It never
mounts an export: a probe runs only while the export is mounted, under a peek hold
(:meth:`ExportManager.hold_if_mounted`).

Concurrency: state lives in the trio thread. One probe per export runs at a time, in the
export's own threads (its ``CapacityLimiter``); callers that arrive while it runs share its
result. Each caller waits at most :data:`STATVFS_TIMEOUT`; an overdue probe goes on in the
background, and later callers do not wait for it again until it has answered.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from fusemux.core.api import BLOCK, Ctx, StatFs
from fusemux.core.exports import Export, ExportManager
from fusemux.core.namespace import NAME_MAX, Kind, Namespace
from fusemux.errors import FusemuxError, NotFound

log = logging.getLogger(__name__)

# statvfs of a backing filesystem for xattrs/statfs must not hang an admin's getfattr.
STATVFS_TIMEOUT = 1.0


@dataclass
class StatvfsProbe:
    """One statvfs of an export's backing filesystem in flight, shared by its callers."""

    done: trio.Event = field(default_factory=trio.Event)
    result: os.statvfs_result | None = None
    overdue: bool = False  # a caller gave up on it; later callers do not wait for it
    started: float = 0.0  # trio time the probe was started
    seconds: float = 0.0  # how long the statvfs call itself took, in its thread
    error: OSError | None = None  # what it failed with, if it did


class Capacity:
    """statvfs of the exports' backing filesystems, shared per export and bounded in time."""

    def __init__(self, exports: ExportManager, namespace: Namespace) -> None:
        self.exports = exports
        self.namespace = namespace

    async def statfs(self, ctx: Ctx, ino: int | None = None) -> StatFs:
        """The mount as a whole: the sum over exports that are mounted right now.

        The exports are asked concurrently, so a sick one costs at most STATVFS_TIMEOUT.
        With *ino* inside an export (its directory or a volume; engines whose statfs request
        carries the inode), the answer is that export's own backing filesystem, mounted or
        not: ``df`` on a volume shows the space its image can grow into. An export that does
        not answer gives EIO after STATVFS_TIMEOUT.
        """
        if ino is not None:
            node = self.namespace.node(ino)
            if node.export is not None and node.kind in (Kind.EXPORT, Kind.VOLUME):
                return await self._export_statfs(node.export)
        results: dict[str, os.statvfs_result | None] = {}

        async def one(name: str) -> None:
            with contextlib.suppress(NotFound):  # removed by a reload meanwhile
                results[name] = await self.statvfs(name)

        async with trio.open_nursery() as nursery:
            for name in self.exports.exports:
                nursery.start_soon(one, name)
        total = StatFs(bsize=BLOCK, blocks=0, bfree=0, bavail=0, files=0, ffree=0)
        for st in results.values():
            if st is None:
                continue
            scale = st.f_frsize / BLOCK
            total = StatFs(
                bsize=BLOCK,
                blocks=total.blocks + int(st.f_blocks * scale),
                bfree=total.bfree + int(st.f_bfree * scale),
                bavail=total.bavail + int(st.f_bavail * scale),
                files=total.files + st.f_files,
                ffree=total.ffree + st.f_ffree,
            )
        return total

    async def _export_statfs(self, name: str) -> StatFs:
        async with self.exports.hold(name):
            st = await self.statvfs(name)
        if st is None:
            raise FusemuxError(f"statvfs of export {name} did not answer", errno.EIO)
        return StatFs(
            bsize=st.f_frsize,
            blocks=st.f_blocks,
            bfree=st.f_bfree,
            bavail=st.f_bavail,
            files=st.f_files,
            ffree=st.f_ffree,
            namemax=min(st.f_namemax, NAME_MAX),
        )

    async def statvfs(self, name: str) -> os.statvfs_result | None:
        """statvfs of a mounted export's backing filesystem; None if not mounted or sick.

        One probe per export at a time: callers that arrive while one runs wait for its
        result, so a sick export never collects a pile of stuck threads. Each caller waits at
        most STATVFS_TIMEOUT; the probe itself goes on in the background until the backing
        filesystem answers (or the daemon stops). The answer must come quickly even then: a
        process cannot exit while its request is being served, so ``fusemux status`` and
        ``df`` on a host with a sick export would otherwise hang until the server is back.
        """
        async with self.exports.hold_if_mounted(name) as export:
            if export is None:
                return None
            probe = self.probe(export)
            if probe.overdue:
                return None  # it already timed out for someone: do not wait again
            with trio.move_on_after(STATVFS_TIMEOUT):
                await probe.done.wait()
                return probe.result
            if not probe.overdue:
                probe.overdue = True
                log.warning("export %s: statvfs timed out", export.name)
            return None

    def probe(self, export: Export) -> StatvfsProbe:
        """The statvfs probe of a mounted *export* in flight, started now if there is none.

        The caller holds the export (a peek hold is enough) while it calls this; it may wait
        for ``probe.done`` afterwards without the hold, as an overdue probe goes on alone.
        """
        probe: StatvfsProbe | None = export.statvfs_probe
        if probe is None:
            probe = export.statvfs_probe = StatvfsProbe(started=trio.current_time())
            assert self.exports.nursery is not None
            self.exports.nursery.start_soon(self._run_statvfs, export, probe)
        return probe

    async def _run_statvfs(self, export: Export, probe: StatvfsProbe) -> None:
        def timed(path: Path) -> os.statvfs_result:
            # Timed in the thread: waiting for a free worker thread is not the backend's fault.
            t0 = time.monotonic()
            try:
                return os.statvfs(path)
            finally:
                probe.seconds = time.monotonic() - t0

        try:
            probe.result = await trio.to_thread.run_sync(
                timed, export.target, limiter=export.limiter, abandon_on_cancel=True
            )
        except OSError as e:
            probe.error = e
            log.debug("export %s: statvfs failed: %s", export.name, e)  # health.py reports it
        finally:
            probe.done.set()
            if export.statvfs_probe is probe:
                export.statvfs_probe = None
