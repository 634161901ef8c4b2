"""The engine-agnostic filesystem: every FUSE operation fusemux answers, as plain Python.

This module owns the behaviour of the mount. An engine (pyfuse3 today, a kernel-passthrough
engine later) converts a kernel request into one call here and converts the result or the
:class:`~fusemux.errors.FusemuxError`/``OSError`` back. Nothing here imports a FUSE binding.

Data flow of an open::

    engine.open -> FileSystem.open -> ExportManager.acquire (lock; mount if needed)
                -> open_backing in a worker thread -> Handle registered -> reply

Release walks back: close the backing fds in a worker thread, then ``ExportManager.release``,
which starts the linger when the last holder goes.

Concurrency: all state lives in the trio thread. Every syscall on a backing file or backing
filesystem runs in a worker thread under the export's own ``CapacityLimiter``, so a hung
export stalls only requests for that export.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from fusemux import __version__
from fusemux.config import Config
from fusemux.core import handles as hio
from fusemux.core import workers, xattrs
from fusemux.core.exports import Export, ExportManager, State
from fusemux.core.handles import DirHandle, Handle, HandleTable
from fusemux.core.handles import SetAttr as SetAttr  # part of the engine-facing API
from fusemux.core.images import ImageCache
from fusemux.core.locks import LockManager
from fusemux.core.mappings import MappingManager, parse_request, parse_unmap
from fusemux.core.mounter import Mounter
from fusemux.core.namespace import NAME_MAX, VOLUMES_DIR, VOLUMES_INO, Kind, Namespace, Node
from fusemux.core.namespace import visible_volume_name as _visible
from fusemux.errors import (
    FusemuxError,
    InvalidRequest,
    MapNotPermitted,
    NamespaceReadOnly,
    NoSuchAttribute,
    NotFound,
    NotPermitted,
    ReadOnlyExport,
    XattrNotSupported,
    XattrReadOnly,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Cache lifetimes handed to the kernel. Synthetic directories never change while the daemon
# runs; volume attributes may change on the storage side, so they are kept briefly.
DIR_TIMEOUT = 60.0
VOLUME_TIMEOUT = 1.0
# statvfs of a backing filesystem for xattrs/statfs must not hang an admin's getfattr.
STATVFS_TIMEOUT = 1.0
BLOCK = 4096
# Volume entries built per READDIR call (a kernel buffer holds far fewer; the rest is asked
# for again from the last offset).
READDIR_BATCH = 256
# Errnos of a path lookup on a backing mount that may have been unmounted under us.
_VANISHED = frozenset({errno.ENOENT, errno.ESTALE, errno.ENOTCONN})
_XATTR_PREFIX = xattrs.PREFIX.encode()


@dataclass(frozen=True)
class Attr:
    """Attributes of one node, engine-neutral."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    timeout: float
    blksize: int = BLOCK


@dataclass(frozen=True)
class OpenReply:
    fh: int
    direct_io: bool
    keep_cache: bool
    # The handle's backing fd, for engines that hand it to the kernel (FUSE passthrough);
    # None where I/O must come through the core (an export with io_timeout). It stays open
    # until release(fh); the engine must not close it.
    backing_fd: int | None = None


@dataclass(frozen=True)
class DirEntry:
    name: str
    attr: Attr
    next_offset: int


@dataclass(frozen=True)
class StatFs:
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    namemax: int = 255


@dataclass
class StatvfsProbe:
    """One statvfs of an export's backing filesystem in flight, shared by its callers."""

    done: trio.Event = field(default_factory=trio.Event)
    result: os.statvfs_result | None = None
    overdue: bool = False  # a caller gave up on it; later callers do not wait for it


@dataclass(frozen=True)
class Ctx:
    """Who sent a request (engines fill it from the kernel's request header)."""

    pid: int = 0
    uid: int = 0
    gid: int = 0


class FileSystem:
    """The operations of the fusemux mount."""

    def __init__(
        self, config: Config, mounter: Mounter, nursery: trio.Nursery | None = None
    ) -> None:
        self.config = config
        self.exports = ExportManager(config, mounter, nursery)
        self.namespace = Namespace(list(config.exports))
        self.exports.on_removed = self.namespace.remove_export
        self.handles = HandleTable()
        self.locks = LockManager(self.handles)  # fcntl/flock locks, on the backing files
        self.images = ImageCache()
        self.mappings = MappingManager(config, self.exports, self.images)
        # Set by the engine that serves this core: its name (user.fusemux.engine) and a
        # callable rendering its request counters as JSON (user.fusemux.engine_stats).
        self.engine_name = ""
        self.engine_stats: Callable[[], str] = lambda: "{}"
        # Synthetic directories carry the daemon's start time.
        self._dir_time_ns = time.time_ns()

    def bind(self, nursery: trio.Nursery) -> None:
        """Give the core the nursery its linger tasks run in (before any request arrives).

        Backing mounts a dead daemon left at configured exports' targets are adopted here.
        """
        self.exports.nursery = nursery
        self.mappings.nursery = nursery  # qemu-nbd supervisors run there
        self.exports.adopt_existing()

    def reload(self, config: Config) -> list[str]:
        """Apply a validated new config (SIGHUP); returns the changes, one line each."""
        for name in config.exports:
            self.namespace.add_export(name)
        changes = self.exports.reload(config)
        self.config = config
        return changes

    # -- helpers -----------------------------------------------------------------------

    async def _io(
        self, export: Export, fn: Callable[..., T], *args: object, abandonable: bool = False
    ) -> T:
        """Run a blocking call on *export*'s backing filesystem (see :func:`workers.run`).

        *abandonable*: the call has no side effect, so a cancelled caller may stop waiting
        for it (it then holds the export until it returns, as at io_timeout).
        """
        return await workers.run(export, fn, *args, abandonable=abandonable)

    def _dir_attr(self, node: Node) -> Attr:
        now = self._dir_time_ns
        # Export directories are sticky: with default_permissions the kernel then answers a
        # non-root setxattr of user.fusemux.ctl with EPERM (not EACCES) before we see it.
        perms = 0o1755 if node.kind is Kind.EXPORT else 0o755
        return Attr(
            ino=node.ino,
            mode=stat.S_IFDIR | perms,
            nlink=2,
            uid=0,
            gid=0,
            size=0,
            blocks=0,
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
            timeout=DIR_TIMEOUT,
        )

    @staticmethod
    def _volume_attr(node: Node, st: os.stat_result) -> Attr:
        return Attr(
            ino=node.ino,
            mode=st.st_mode,
            nlink=1,
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size,
            blocks=st.st_blocks,
            atime_ns=st.st_atime_ns,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            timeout=VOLUME_TIMEOUT,
            blksize=st.st_blksize or BLOCK,
        )

    def _volume(self, ino: int) -> Node:
        node = self.namespace.node(ino)
        if node.kind is not Kind.VOLUME:
            raise FusemuxError("not a volume", errno.EISDIR)
        return node

    async def _stat_volume(self, export: Export, name: str) -> os.stat_result:
        st = await self._backing(export, os.lstat, export.backing_path(name))
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(f"{name} is not a regular file")
        return st

    async def _backing(self, export: Export, fn: Callable[..., T], *args: object) -> T:
        """A path-based call on the backing mount; if the path is gone because the backing
        mount itself vanished (unmounted from outside), mount it again and retry once."""
        try:
            return await self._io(export, fn, *args)
        except OSError as e:
            if e.errno not in _VANISHED or not await self.exports.recover(export):
                raise
        return await self._io(export, fn, *args)

    # -- lookup and attributes ---------------------------------------------------------

    async def lookup(self, parent: int, name: str, ctx: Ctx) -> Attr:
        node = self.namespace.node(parent)
        if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise FusemuxError(f"name longer than {NAME_MAX} bytes", errno.ENAMETOOLONG)
        if node.kind is Kind.ROOT:
            if name != VOLUMES_DIR:
                raise NotFound(name)
            return self._dir_attr(self.namespace.node(VOLUMES_INO))
        if node.kind is Kind.VOLUMES:
            return self._dir_attr(self.namespace.export_node(name))
        if node.kind is Kind.EXPORT:
            if not _visible(name):
                raise NotFound(name)
            async with self.exports.hold(node.export) as export:
                st = await self._stat_volume(export, name)
            return self._volume_attr(self.namespace.volume_node(node.export, name), st)
        raise FusemuxError("not a directory", errno.ENOTDIR)

    async def getattr(self, ino: int, ctx: Ctx) -> Attr:
        node = self.namespace.node(ino)
        if node.is_dir:
            return self._dir_attr(node)
        async with self.exports.hold(node.export) as export:
            try:
                st = await self._stat_volume(export, node.name)
            except FileNotFoundError:
                # Deleted on the storage side while open: the open handles still have the
                # file, so answer from one of them (else the kernel fails their reads).
                handles = self.handles.for_inode(ino)
                if not handles:
                    raise
                # dup() here, on the trio thread: a handle still in the table has not
                # started its close yet, so its fd cannot be closed under the dup.
                fd = os.dup(handles[0].fd)
                st = await self._io(export, _fstat_and_close, fd)
        return self._volume_attr(node, st)

    async def setattr(self, ino: int, change: SetAttr, fh: int | None, ctx: Ctx) -> Attr:
        node = self.namespace.node(ino)
        if node.is_dir:
            raise NamespaceReadOnly("directories of the fusemux mount cannot be changed")
        handle = self.handles.files.get(fh) if fh is not None else None
        async with self.exports.hold(node.export) as export:
            if change.size is not None and export.config.read_only:
                raise ReadOnlyExport(f"export {export.name} is read-only")
            path = export.backing_path(node.name)
            fd = handle.fd if handle is not None and handle.writable else None
            await self._io(export, hio.setattr_backing, path, change, fd)
            st = await self._stat_volume(export, node.name)
        return self._volume_attr(node, st)

    # -- files -------------------------------------------------------------------------

    async def open(self, ino: int, flags: int, ctx: Ctx, kill_suidgid: bool = False) -> OpenReply:
        node = self._volume(ino)
        export_cfg = self.exports.get(node.export).config
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if export_cfg.read_only and writing:
            raise ReadOnlyExport(f"export {node.export} is read-only")
        pid, comm = hio.opener_of(ctx.pid) if ctx.pid else (0, "?")
        export = await self.exports.acquire(node.export)
        try:
            path = export.backing_path(node.name)
            fd, direct = await self._backing(export, hio.open_backing, path, flags)
            if kill_suidgid:  # O_TRUNC by an unprivileged caller (FUSE_OPEN_KILL_SUIDGID)
                try:
                    await self._io(export, hio.kill_suidgid, fd)
                except BaseException:
                    os.close(fd)
                    raise
        except BaseException:
            self.exports.release(export)
            raise
        fh = self.handles.next_fh()
        self.handles.files[fh] = Handle(
            fh=fh,
            ino=ino,
            export=export,
            name=node.name,
            path=path,
            fd=fd,
            flags=flags,
            direct=direct,
            opener_pid=pid,
            opener_comm=comm,
        )
        log.debug("open %s/%s fh=%d by %d:%s", node.export, node.name, fh, pid, comm)
        # O_DIRECT opens get direct_io replies, so the kernel's page cache is bypassed too.
        # An export with io_timeout is promised that no I/O waits longer than that; only I/O
        # that reaches fusemux can keep the promise, so its fd is not offered for kernel
        # passthrough (reads and writes then come here, through the export's workers).
        offer = None if export.config.io_timeout else fd
        return OpenReply(
            fh=fh, direct_io=bool(flags & os.O_DIRECT), keep_cache=False, backing_fd=offer
        )

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles.file(fh)
        # A read has no side effect: if its caller is cancelled (an interrupted request),
        # it is abandoned like one past io_timeout, so a killed reader is not held up.
        return await self._io(handle.export, hio.read, handle, off, size, abandonable=True)

    async def write(self, fh: int, off: int, data: bytes, kill_suidgid: bool = False) -> int:
        """Write *data*; *kill_suidgid* clears set-ID bits first (FUSE_WRITE_KILL_SUIDGID)."""
        handle = self.handles.file(fh)
        if handle.export.config.read_only:
            raise ReadOnlyExport(f"export {handle.export.name} is read-only")
        handle.dirty = True
        return await self._io(handle.export, hio.write, handle, off, data, kill_suidgid)

    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        """fallocate(2) on the backing file: preallocation, punch-hole (qemu discard),
        zero-range. The backing filesystem's errno (EOPNOTSUPP included) is passed on."""
        handle = self.handles.file(fh)
        if handle.export.config.read_only:
            raise ReadOnlyExport(f"export {handle.export.name} is read-only")
        handle.dirty = True
        await self._io(handle.export, hio.fallocate, handle, mode, off, length)

    async def lseek(self, fh: int, off: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE (and the plain whences) answered by the backing file."""
        handle = self.handles.file(fh)
        return await self._io(handle.export, hio.lseek, handle, off, whence, abandonable=True)

    async def access(self, ino: int, mask: int, ctx: Ctx) -> None:
        """access(2) for engines that get asked; permissions are the kernel's
        (default_permissions), so this only checks that the node exists and that a write
        is not asked of a read-only export's volume."""
        node = self.namespace.node(ino)
        await trio.lowlevel.checkpoint()
        writing = mask & os.W_OK and node.kind is Kind.VOLUME
        if writing and self.exports.get(node.export).config.read_only:
            raise ReadOnlyExport(f"export {node.export} is read-only")

    async def handle_call(self, fh: int, fn: Callable[..., T], *args: object) -> T:
        """Run an engine's blocking call that concerns handle *fh* (such as dropping a kernel
        registration of its backing file) in the handle's export workers, with the same
        isolation and io_timeout as the core's own calls."""
        handle = self.handles.file(fh)
        return await self._io(handle.export, fn, *args)

    async def flush(self, fh: int, written_elsewhere: bool = False) -> None:
        """close()-time flush. *written_elsewhere*: the engine let the kernel write to the
        backing file directly (passthrough), so the handle may be dirty without the core
        having seen a write."""
        handle = self.handles.file(fh)
        if written_elsewhere and handle.writable:
            handle.dirty = True
        if not handle.dirty:
            await trio.lowlevel.checkpoint()
            return  # nothing written through this handle since the last flush: no error to report
        handle.dirty = False
        await self._io(handle.export, hio.flush, handle)

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.handles.file(fh)
        await self._io(handle.export, hio.fsync, handle, datasync, abandonable=True)

    async def release(self, fh: int) -> None:
        await self.locks.release(fh)  # first: the lock fds of the handle's owners
        handle = self.handles.files.pop(fh, None)
        if handle is None:
            return
        try:
            await self._io(handle.export, hio.close, handle)
        except (OSError, FusemuxError) as e:
            log.warning("close of %s/%s failed: %s", handle.export.name, handle.name, e)
        finally:
            self.exports.release(handle.export)

    # -- directories -------------------------------------------------------------------

    async def opendir(self, ino: int, ctx: Ctx) -> int:
        node = self.namespace.node(ino)
        if not node.is_dir:
            raise FusemuxError("not a directory", errno.ENOTDIR)
        export = await self.exports.acquire(node.export) if node.kind is Kind.EXPORT else None
        fh = self.handles.next_fh()
        self.handles.dirs[fh] = DirHandle(fh=fh, ino=ino, export=export)
        return fh

    async def readdir(self, fh: int, offset: int) -> list[DirEntry]:
        """Entries after *offset* (an inode number; 0 = from the start), in inode order."""
        dh = self.handles.dir(fh)
        node = self.namespace.node(dh.ino)
        if node.kind is Kind.ROOT:
            entries = [DirEntry(VOLUMES_DIR, self._dir_attr(self.namespace.node(VOLUMES_INO)), 0)]
        elif node.kind is Kind.VOLUMES:
            entries = [
                DirEntry(n.export, self._dir_attr(n), 0) for n in self.namespace.export_nodes()
            ]
        else:
            assert dh.export is not None
            if dh.entries is None or offset == 0:
                await self.exports.recover(dh.export)  # an empty target if unmounted under us
                listing = await self._io(dh.export, _list_volumes, dh.export.target)
                dh.stats = listing
                dh.entries = sorted(
                    ((name, self.namespace.volume_node(node.export, name).ino) for name in listing),
                    key=lambda e: e[1],
                )
            # Only the next READDIR_BATCH entries after *offset*: the kernel asks again from
            # the last offset it used, so building every entry per call would be O(n^2).
            start = bisect.bisect_right(dh.entries, offset, key=lambda e: e[1])
            return [
                DirEntry(name, attr, attr.ino)
                for name, ino in dh.entries[start : start + READDIR_BATCH]
                for attr in (self._volume_attr(self.namespace.node(ino), dh.stats[name]),)
            ]
        return [
            DirEntry(e.name, e.attr, e.attr.ino)
            for e in sorted(entries, key=lambda e: e.attr.ino)
            if e.attr.ino > offset
        ]

    async def releasedir(self, fh: int) -> None:
        dh = self.handles.dirs.pop(fh, None)
        if dh is not None and dh.export is not None:
            self.exports.release(dh.export, transient=True)

    # -- filesystem ----------------------------------------------------------------------

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
                results[name] = await self._statvfs(name)

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
            st = await self._statvfs(name)
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

    async def _statvfs(self, name: str) -> os.statvfs_result | None:
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
            probe: StatvfsProbe | None = export.statvfs_probe
            if probe is None:
                probe = export.statvfs_probe = StatvfsProbe()
                assert self.exports.nursery is not None
                self.exports.nursery.start_soon(self._run_statvfs, export, probe)
            if probe.overdue:
                return None  # it already timed out for someone: do not wait again
            with trio.move_on_after(STATVFS_TIMEOUT):
                await probe.done.wait()
                return probe.result
            if not probe.overdue:
                probe.overdue = True
                log.warning("export %s: statvfs timed out", export.name)
            return None

    async def _run_statvfs(self, export: Export, probe: StatvfsProbe) -> None:
        try:
            probe.result = await trio.to_thread.run_sync(
                os.statvfs, export.target, limiter=export.limiter, abandon_on_cancel=True
            )
        except OSError as e:
            log.warning("export %s: statvfs failed: %s", export.name, e)
        finally:
            probe.done.set()
            if export.statvfs_probe is probe:
                export.statvfs_probe = None

    # -- xattrs --------------------------------------------------------------------------

    def _status_json(self, export: str) -> str:
        """Open handles and mappings of *export*'s volumes as one JSON object.

        ``fusemux status`` reads this instead of each volume's keys: a volume's keys need a
        lookup of the volume, which stats the backing file and blocks while an NFS server
        is down; this never touches a backing filesystem.
        """
        opened: dict[str, dict[str, Any]] = {}
        for h in self.handles.for_export(export):
            entry = opened.setdefault(h.name, {"open_count": 0, "openers": set()})
            entry["open_count"] += 1
            entry["openers"].add((h.opener_pid, h.opener_comm))
        mapped: dict[str, dict[str, Any]] = {}
        for name in self.mappings.mapped_volumes(export):
            mapping = self.mappings.get(export, name)
            if mapping is not None:
                mapped[name] = {
                    "mapping": [v for v in mapping.value().split(",") if v],
                    "options": mapping.options(),
                    "pid": mapping.pid() or None,
                }
        return json.dumps(
            {
                "open": {
                    name: {
                        "open_count": e["open_count"],
                        "openers": [f"{pid}:{comm}" for pid, comm in sorted(e["openers"])],
                    }
                    for name, e in sorted(opened.items())
                },
                "mappings": dict(sorted(mapped.items())),
                "locks": self.locks.count(export),
            },
            sort_keys=True,
        )

    def _open_volumes(self, export: str) -> list[str]:
        return sorted({h.name for h in self.handles.for_export(export)})

    async def listxattr(self, ino: int, ctx: Ctx) -> list[str]:
        node = self.namespace.node(ino)
        if node.kind is Kind.ROOT:
            return xattrs.full(xattrs.ROOT_KEYS)
        if node.kind is Kind.EXPORT:
            return xattrs.export_keys(self.exports.get(node.export).snapshot())
        if node.kind is Kind.VOLUME:
            return xattrs.full(xattrs.VOLUME_KEYS)
        return []

    @staticmethod
    def has_xattr_name(name: bytes) -> bool:
        """Whether any node could have xattr *name*. Engines may answer ENODATA for other
        names without a call (``ls -l`` asks every file for security.selinux and
        system.posix_acl_access; the kernel probes security.capability before writes)."""
        return name.startswith(_XATTR_PREFIX)

    async def getxattr(self, ino: int, name: str, ctx: Ctx) -> bytes:
        # The kernel probes security.capability before writes: answer it without work.
        if not name.startswith(xattrs.PREFIX):
            raise NoSuchAttribute(name)
        key = name[len(xattrs.PREFIX) :]
        node = self.namespace.node(ino)
        values: dict[str, str] = {}
        if node.kind is Kind.ROOT:
            values = dict(
                xattrs.render_root(__version__, os.getpid(), self.engine_name, self.engine_stats())
            )
        elif node.kind is Kind.EXPORT:
            export = self.exports.get(node.export)
            snap = export.snapshot()
            if key in xattrs.MOUNTED_ONLY:
                if snap.state is not State.MOUNTED:
                    raise NoSuchAttribute(name)
                st = await self._statvfs(node.export)
                if st is None:
                    raise FusemuxError(f"statvfs of {export.target} failed", errno.EIO)
                values = {
                    "capacity": str(st.f_blocks * st.f_frsize),
                    "free": str(st.f_bavail * st.f_frsize),
                }
            else:
                values = xattrs.render_export(
                    snap,
                    export.config.read_only,
                    self._open_volumes(node.export),
                    self.mappings.mapped_volumes(node.export),
                )
                values["status_json"] = self._status_json(node.export)
        elif node.kind is Kind.VOLUME:
            snap = self.exports.get(node.export).snapshot()
            openers = [
                xattrs.Opener(h.opener_pid, h.opener_comm) for h in self.handles.for_inode(ino)
            ]
            values = xattrs.render_volume(snap, node.name, openers)
            values.update(xattrs.render_mapping(self._mapping_view(node)))
            values.update(xattrs.render_locks(self.locks.lines(ino)))
            if key in xattrs.IMAGE_KEYS:
                # Read from the image's own header (cached against mtime and size).
                async with self.exports.hold(node.export) as export:
                    info = await self._io(export, self.images.info, export.target, node.name)
                values.update(xattrs.render_image(info))
        if key not in values:
            raise NoSuchAttribute(name)
        return values[key].encode("utf-8", "surrogateescape")

    def _mapping_view(self, node: Node) -> xattrs.MappingView:
        mapping = self.mappings.get(node.export, node.name)
        if mapping is None:
            return xattrs.MappingView()
        return xattrs.MappingView(mapping.value(), mapping.options(), mapping.pid())

    async def _map_request(self, node: Node, key: str, value: bytes, ctx: Ctx) -> None:
        """``user.fusemux.map`` / ``unmap`` on a volume: root only (the FUSE request's uid)."""
        label = f"{node.export}/{node.name}"
        try:
            if ctx.uid != 0:
                raise MapNotPermitted(f"{key} of {label} refused: uid {ctx.uid} is not root")
            if key == xattrs.MAP_KEY:
                request = parse_request(value)
                await self.mappings.map(node.export, node.name, request)
            else:
                parse_unmap(value)
                await self.mappings.unmap(node.export, node.name)
        except FusemuxError as e:
            log.info("%s request for %s refused: %s", key, label, e.message)
            raise

    async def setxattr(self, ino: int, name: str, value: bytes, ctx: Ctx) -> None:
        node = self.namespace.node(ino)
        if name == xattrs.CTL and node.kind is Kind.EXPORT:
            await self._control(node.export, value, ctx)
            return
        key = name[len(xattrs.PREFIX) :] if name.startswith(xattrs.PREFIX) else ""
        if node.kind is Kind.VOLUME and key in (xattrs.MAP_KEY, xattrs.UNMAP_KEY):
            await self._map_request(node, key, value, ctx)
            return
        if name.startswith(xattrs.PREFIX):
            raise XattrReadOnly(f"{name} is read-only")
        raise XattrNotSupported("fusemux stores no extended attributes")

    async def _control(self, export: str, value: bytes, ctx: Ctx) -> None:
        """``user.fusemux.ctl`` on an export directory: ``mount`` pins, ``unmount`` unpins."""
        if ctx.uid != 0:
            log.warning("export %s: ctl refused for uid %d (root only)", export, ctx.uid)
            raise NotPermitted(f"only root may control export {export}")
        try:
            command = value.decode("ascii").strip()
        except UnicodeDecodeError:
            command = None
        if command not in xattrs.CTL_COMMANDS:
            shown = value[:64].decode("ascii", "backslashreplace")
            log.warning(
                "export %s: ctl value %r refused: expected one of %s",
                export,
                shown,
                ", ".join(xattrs.CTL_COMMANDS),
            )
            raise InvalidRequest(f"unknown ctl value {shown!r}")
        log.info("export %s: ctl %s", export, command)
        if command == "mount":
            await self.exports.pin(export)
        else:
            await self.exports.unpin(export)

    async def removexattr(self, ino: int, name: str, ctx: Ctx) -> None:
        self.namespace.node(ino)
        if name.startswith(xattrs.PREFIX):  # also map/unmap: removing one requests nothing
            raise XattrReadOnly(f"{name} is read-only")
        raise XattrNotSupported("fusemux stores no extended attributes")

    # -- namespace changes -------------------------------------------------------------

    def refuse_namespace_change(self, op: str) -> NamespaceReadOnly:
        """create, mknod, mkdir, unlink, rmdir, rename, link, symlink: the storage owns it.

        Returns the error for the engine to raise.
        """
        return NamespaceReadOnly(f"{op} is not allowed: the storage side owns the namespace")

    # -- shutdown ----------------------------------------------------------------------

    def open_volumes(self) -> list[str]:
        return sorted({f"{h.export.name}/{h.name}" for h in self.handles.files.values()})

    def users(self) -> list[str]:
        """Who uses the mount now, one entry per open volume: ``export/name by pid:comm``."""
        by_volume: dict[str, set[str]] = {}
        for h in self.handles.files.values():
            key = f"{h.export.name}/{h.name}"
            by_volume.setdefault(key, set()).add(f"{h.opener_pid}:{h.opener_comm}")
        return [f"{v} by {', '.join(sorted(o))}" for v, o in sorted(by_volume.items())]

    async def shutdown(self) -> None:
        """Close every backing fd, then unmount every backing mount."""
        for fh in list(self.handles.files):
            await self.release(fh)
        for fh in list(self.handles.dirs):
            await self.releasedir(fh)
        await self.mappings.shutdown()  # before the exports they hold are unmounted
        await self.exports.shutdown()


def _list_volumes(target: Path) -> dict[str, os.stat_result]:
    """The visible regular files at the top level of a backing filesystem, with their stat."""
    out: dict[str, os.stat_result] = {}
    with os.scandir(target) as it:
        for entry in it:
            if not _visible(entry.name):
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    out[entry.name] = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while listing
    return out


def _fstat_and_close(fd: int) -> os.stat_result:
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)
