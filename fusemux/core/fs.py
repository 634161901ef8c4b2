"""The engine-agnostic filesystem: the file operations of the mount, as plain Python.

This module owns the behaviour of lookups, attributes, opens, I/O, flush/fsync, release and
directory listings. An engine (:mod:`fusemux.engines.pyfuse3` or the own ``/dev/fuse``
engine, :mod:`fusemux.engines.kernel`) converts a kernel request into one call here,
with the types of :mod:`fusemux.core.api`, and converts the result or the
:class:`~fusemux.errors.FusemuxError`/``OSError`` back (:func:`fusemux.errors.reply_errno`).
Nothing here imports a FUSE binding. The admin xattrs are answered by
:mod:`fusemux.core.control` and ``statfs``/capacity by :mod:`fusemux.core.capacity`;
:class:`FileSystem` hands those requests on, so engines talk to one object.

Data flow of an open::

    engine.open -> FileSystem.open -> ExportManager.acquire (mount if needed, in a task
                   of its own) -> open_backing in a worker thread -> Handle registered -> reply

Release walks back: close the backing fds in a worker thread, then ``ExportManager.release``,
which starts the linger when the last holder goes.

Concurrency: all state lives in the trio thread. Every syscall on a backing file or backing
filesystem runs in a worker thread of the export's own pool (:func:`workers.run`), so a hung
export stalls only requests for that export. The operations in
:data:`fusemux.core.api.INTERRUPTIBLE` have no side effects: a cancelled caller abandons
their backing calls instead of waiting for them.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from fusemux.config import Config
from fusemux.core import handles as hio
from fusemux.core import workers
from fusemux.core.api import (
    BLOCK,
    Attr,
    Ctx,
    DirEntry,
    Engine,
    OpenReply,
    SetAttr,
    StatFs,
)
from fusemux.core.capacity import Capacity
from fusemux.core.control import AdminXattrs, xattr_refusal
from fusemux.core.exports import Export, ExportManager
from fusemux.core.handles import DirHandle, Handle, HandleTable
from fusemux.core.health import HealthMonitor
from fusemux.core.images import ImageCache
from fusemux.core.locks import LockManager
from fusemux.core.mappings import MappingManager
from fusemux.core.mounter import Mounter
from fusemux.core.namespace import NAME_MAX, VOLUMES_DIR, VOLUMES_INO, Kind, Namespace, Node
from fusemux.core.namespace import visible_volume_name as _visible
from fusemux.errors import (
    FusemuxError,
    NamespaceReadOnly,
    NotFound,
    ReadOnlyExport,
    errno_of,
)
from fusemux.logfmt import errname, fields

__all__ = ["Attr", "Ctx", "DirEntry", "FileSystem", "OpenReply", "SetAttr", "StatFs"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Cache lifetimes handed to the kernel. Synthetic directories never change while the daemon
# runs; volume attributes may change on the storage side, so they are kept briefly.
DIR_TIMEOUT = 60.0
VOLUME_TIMEOUT = 1.0
# Volume entries built per READDIR call (a kernel buffer holds far fewer; the rest is asked
# for again from the last offset).
READDIR_BATCH = 256
# Errnos of a path lookup on a backing mount that may have been unmounted under us.
_VANISHED = frozenset({errno.ENOENT, errno.ESTALE, errno.ENOTCONN})


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
        self.capacity = Capacity(self.exports, self.namespace)
        self.health = HealthMonitor(self.exports, self.capacity)  # the daemon runs it
        self.admin = AdminXattrs(
            self.namespace,
            self.exports,
            self.handles,
            self.mappings,
            self.images,
            self.capacity,
            self.locks,
        )
        # Synthetic directories carry the daemon's start time.
        self._dir_time_ns = time.time_ns()

    def attach(self, engine: Engine) -> None:
        """Called by the engine that serves this core: its name and ``statistics()`` are
        shown in ``user.fusemux.engine`` and ``engine_stats``."""
        self.admin.engine = engine

    @property
    def engine(self) -> Engine | None:
        """The engine serving this core (None before one attaches)."""
        return self.admin.engine

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
        """A name in a directory. In an export: a transient hold (mounts the export if
        needed; a cancelled caller stops waiting, the mount goes on) and an lstat in the
        export's workers. ENOENT (unknown or hidden name, not a regular file),
        ENAMETOOLONG, ENOTDIR, a mount failure's errno (ENXIO, ETIMEDOUT, ...)."""
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
        """Attributes of a node. Directories: no hold, never blocks. A volume: a transient
        hold and an lstat; if the backing file was deleted while open, an fstat of an open
        handle's fd. ENOENT, a mount failure's errno."""
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
        """Size, times, mode and owner changes, on the backing file (through the open fd
        when *fh* is a writable handle). A transient hold; blocks in the export's workers.
        EPERM on directories, EROFS for a size change on a read-only export."""
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
        """Open a volume: a holder for the handle's life (mounts the export if needed), the
        backing file opened in the export's workers. EISDIR, EROFS (write or O_TRUNC on a
        read-only export), ESHUTDOWN, a mount failure's errno, the backing open's errno.
        *kill_suidgid*: clear set-ID bits (FUSE_OPEN_KILL_SUIDGID)."""
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
        log.debug(
            "open %s/%s fh=%d by %d:%s",
            node.export,
            node.name,
            fh,
            pid,
            comm,
            extra=fields(export=node.export, volume=node.name, op="open", pid=pid, comm=comm),
        )
        # O_DIRECT opens get direct_io replies, so the kernel's page cache is bypassed too.
        # An export with io_timeout is promised that no I/O waits longer than that; only I/O
        # that reaches fusemux can keep the promise, so its fd is not offered for kernel
        # passthrough (reads and writes then come here, through the export's workers).
        offer = None if export.config.io_timeout else fd
        return OpenReply(
            fh=fh, direct_io=bool(flags & os.O_DIRECT), keep_cache=False, backing_fd=offer
        )

    async def read(self, fh: int, off: int, size: int) -> bytes:
        """pread on the handle's backing fd in the export's workers. EBADF, ETIMEDOUT
        (io_timeout), EIO (the export's in-flight cap); a cancelled caller abandons it."""
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
        """fsync/fdatasync of the backing fd in the export's workers; the backing errno
        passes on (write-back errors on NFS). A cancelled caller abandons it."""
        handle = self.handles.file(fh)
        await self._io(handle.export, hio.fsync, handle, datasync, abandonable=True)

    async def release(self, fh: int) -> None:
        """The last close of a handle: close its backing fd in the export's workers, then
        drop its holder (the last one starts the linger). Never fails; an unknown fh is
        ignored. Engines run it shielded: it always completes. The handle's lock owners'
        fds go first (that drops their OFD locks and flocks, see core/locks.py)."""
        await self.locks.release(fh)
        handle = self.handles.files.pop(fh, None)
        if handle is None:
            return
        what = fields(
            export=handle.export.name,
            volume=handle.name,
            op="release",
            pid=handle.opener_pid,
            comm=handle.opener_comm,
        )
        log.debug("release %s/%s fh=%d", handle.export.name, handle.name, fh, extra=what)
        try:
            await self._io(handle.export, hio.close, handle)
        except (OSError, FusemuxError) as e:
            what["errno"] = errname(errno_of(e))
            log.warning("close of %s/%s failed: %s", handle.export.name, handle.name, e, extra=what)
        finally:
            self.exports.release(handle.export)

    # -- directories -------------------------------------------------------------------

    async def opendir(self, ino: int, ctx: Ctx) -> int:
        """A directory handle; in an export directory it is a holder (mounts the export).
        ENOTDIR, a mount failure's errno."""
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
        """Drop a directory handle and its holder (a transient one). Never blocks."""
        dh = self.handles.dirs.pop(fh, None)
        if dh is not None and dh.export is not None:
            self.exports.release(dh.export, transient=True)

    # -- filesystem and xattrs (answered by capacity.py and control.py) -----------------

    async def statfs(self, ctx: Ctx, ino: int | None = None) -> StatFs:
        """statfs: the sum over mounted exports, or one export's own (see
        :meth:`Capacity.statfs`). Never mounts; a sick export costs at most 1 s (EIO when
        *ino* names it)."""
        return await self.capacity.statfs(ctx, ino)

    async def listxattr(self, ino: int, ctx: Ctx) -> list[str]:
        """The node's ``user.fusemux.*`` keys. No hold, never blocks. ENOENT: no such node."""
        return await self.admin.listxattr(ino, ctx)

    @staticmethod
    def xattr_refusal(name: bytes) -> int:
        """0 if the core answers xattr *name*, else the errno an engine may reply at once
        (see :func:`fusemux.core.control.xattr_refusal`)."""
        return xattr_refusal(name)

    async def getxattr(self, ino: int, name: str, ctx: Ctx) -> bytes:
        """A ``user.fusemux.*`` view (control.py). ENODATA for a key the node lacks,
        EOPNOTSUPP for any other name. Image keys take a transient hold and read the
        header in the export's workers; capacity/free wait at most 1 s (EIO)."""
        return await self.admin.getxattr(ino, name, ctx)

    async def setxattr(self, ino: int, name: str, value: bytes, ctx: Ctx) -> None:
        """``ctl`` (pin/unpin, may mount or unmount), ``map``/``unmap`` (root only, EPERM);
        EPERM for the read-only keys, EINVAL for a bad value, EOPNOTSUPP for other names."""
        await self.admin.setxattr(ino, name, value, ctx)

    async def removexattr(self, ino: int, name: str, ctx: Ctx) -> None:
        """EPERM for ``user.fusemux.*``, EOPNOTSUPP for any other name; changes nothing."""
        await self.admin.removexattr(ino, name, ctx)

    # -- namespace changes -------------------------------------------------------------

    def refuse_namespace_change(self, op: str) -> NamespaceReadOnly:
        """create, mknod, mkdir, unlink, rmdir, rename, link, symlink: the storage owns it.

        Returns the error for the engine to raise.
        """
        return NamespaceReadOnly(f"{op} is not allowed: the storage side owns the namespace")

    # -- shutdown ----------------------------------------------------------------------

    def open_volumes(self) -> list[str]:
        """``export/volume`` of every open file handle (the stop policy counts them)."""
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
