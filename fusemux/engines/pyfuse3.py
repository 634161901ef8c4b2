"""The pyfuse3 engine: a thin adapter from pyfuse3's Operations to the core FileSystem.

This module owns the translation only: inode/bytes/flags in, ``EntryAttributes``/``FileInfo``
out, and every failure turned into ``FUSEError`` with the errno chosen by
:func:`fusemux.errors.reply_errno`. No mount logic, locking or I/O policy lives here. It is the
only module of fusemux that imports pyfuse3.

pyfuse3 3.5 limits, handled by omission: it has no fallocate or lseek handler (the kernel
gets EOPNOTSUPP/ENOSYS and falls back), and its statfs gets no inode, so statfs answers for
the mount as a whole.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3

from fusemux.core import metrics
from fusemux.core.api import Attr, Ctx, EngineStatistics, SetAttr
from fusemux.core.fs import FileSystem
from fusemux.errors import reply_errno

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

FUSE_OPTIONS = frozenset(
    {"fsname=fusemux", "subtype=fusemux", "allow_other", "default_permissions"}
)


def _errors(
    fn: Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]:
    """Count the request and turn core errors into FUSEError (errors.reply_errno)."""
    op = fn.__name__.upper()

    async def wrapper(self: Operations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        self.stats[op] += 1
        started = metrics.now()
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise pyfuse3.FUSEError(reply_errno(e, fn.__name__, log)) from None
        finally:
            metrics.request_done(op, started)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _ctx(ctx: pyfuse3.RequestContext | None) -> Ctx:
    if ctx is None:
        return Ctx()
    return Ctx(pid=ctx.pid, uid=ctx.uid, gid=ctx.gid)


def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = pyfuse3.InodeT(attr.ino)
    e.generation = 0
    e.entry_timeout = attr.timeout
    e.attr_timeout = attr.timeout
    e.st_mode = pyfuse3.ModeT(attr.mode)
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = 0
    e.st_size = attr.size
    e.st_blksize = attr.blksize
    e.st_blocks = attr.blocks
    e.st_atime_ns = attr.atime_ns
    e.st_mtime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.ctime_ns
    return e


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


class Operations(pyfuse3.Operations):
    """pyfuse3 callbacks, each a one-line hand-off to :class:`FileSystem`."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: FileSystem) -> None:
        super().__init__()
        self.fs = fs
        self.stats: Counter[str] = Counter()  # requests served, by operation

    @_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self.fs.lookup(parent_inode, _name(name), _ctx(ctx)))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.stats["FORGET"] += 1
        # Inodes are derived from paths and kept for the daemon's life; nothing to drop.
        return None

    @_errors
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self.fs.getattr(inode, _ctx(ctx)))

    @_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        change = SetAttr(
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
        )
        return _entry(await self.fs.setattr(inode, change, fh, _ctx(ctx)))

    @_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        reply = await self.fs.open(inode, flags, _ctx(ctx))
        return pyfuse3.FileInfo(
            fh=pyfuse3.FileHandleT(reply.fh),
            direct_io=reply.direct_io,
            keep_cache=reply.keep_cache,
        )

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)

    @_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @_errors
    async def flush(self, fh: int) -> None:
        await self.fs.flush(fh)

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh, datasync)

    @_errors
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    @_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return pyfuse3.FileHandleT(await self.fs.opendir(inode, _ctx(ctx)))

    @_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for entry in await self.fs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(
                token, os.fsencode(entry.name), _entry(entry.attr), entry.next_offset
            ):
                break

    @_errors
    async def releasedir(self, fh: int) -> None:
        await self.fs.releasedir(fh)

    @_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await self.fs.statfs(_ctx(ctx))
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.bsize
        out.f_frsize = st.bsize
        out.f_blocks = st.blocks
        out.f_bfree = st.bfree
        out.f_bavail = st.bavail
        out.f_files = st.files
        out.f_ffree = st.ffree
        out.f_favail = st.ffree
        out.f_namemax = st.namemax
        return out

    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name.startswith(b"security."):  # the kernel's capability probe before writes
            self.stats["GETXATTR_security"] += 1
        return await self.fs.getxattr(inode, _name(name), _ctx(ctx))

    @_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in await self.fs.listxattr(inode, _ctx(ctx))]

    @_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.fs.setxattr(inode, _name(name), value, _ctx(ctx))

    @_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.removexattr(inode, _name(name), _ctx(ctx))

    # Namespace changes: refused, the storage side owns the namespace.

    @_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise self.fs.refuse_namespace_change("create")

    @_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise self.fs.refuse_namespace_change("mknod")

    @_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise self.fs.refuse_namespace_change("mkdir")

    @_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise self.fs.refuse_namespace_change("unlink")

    @_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise self.fs.refuse_namespace_change("rmdir")

    @_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise self.fs.refuse_namespace_change("rename")

    @_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise self.fs.refuse_namespace_change("link")

    @_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise self.fs.refuse_namespace_change("symlink")


class _AbortedReplyFilter(logging.Filter):
    """Demote pyfuse3's "fuse_reply_* failed with No such file or directory" to DEBUG.

    libfuse reports ENOENT from a reply when the kernel no longer waits for that request:
    it was interrupted, or the connection went away at unmount while a RELEASE was in flight.
    Nothing is lost and nothing needs an operator, so it is not an error.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "fuse_reply_* failed with No such file" in (
            record.getMessage()
        ):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("pyfuse3").isEnabledFor(logging.DEBUG)
        return True


def mount(fs: FileSystem, mountpoint: str, debug: bool = False) -> Operations:
    """Create the FUSE session on *mountpoint* (fstype ``fuse.fusemux``)."""
    logging.getLogger("pyfuse3").addFilter(_AbortedReplyFilter())
    ops = Operations(fs)
    options = set(FUSE_OPTIONS)
    if debug:
        options.add("debug")
    pyfuse3.init(ops, mountpoint, options)
    return ops


# pyfuse3 starts a worker task per concurrent request up to this many. Requests stuck on a
# hung export each hold one, so the ceiling sits well above the per-export thread limits.
MAX_TASKS = 512


async def serve() -> None:
    """Serve requests until terminate() or an external unmount."""
    await pyfuse3.main(max_tasks=MAX_TASKS)


def terminate() -> None:
    pyfuse3.terminate()


def close(unmount: bool = True) -> None:
    pyfuse3.close(unmount=unmount)


class Pyfuse3Engine:
    """The :class:`fusemux.engines.Engine` life cycle over this module's functions."""

    name = "pyfuse3"

    def __init__(self, fs: FileSystem, mountpoint: str, debug: bool = False) -> None:
        self.fs = fs
        self.mountpoint = mountpoint
        self.debug = debug
        self.ops: Operations | None = None
        fs.attach(self)

    def statistics(self) -> EngineStatistics:
        """Requests served, by operation (``user.fusemux.engine_stats``)."""
        stats = self.ops.stats if self.ops is not None else {}
        return EngineStatistics(passthrough=False, requests=dict(stats))

    def mount(self) -> None:
        try:
            self.ops = mount(self.fs, self.mountpoint, self.debug)
        except RuntimeError as e:
            # pyfuse3.init raises RuntimeError when the kernel refuses the FUSE mount.
            raise OSError(f"cannot mount {self.mountpoint}: {e}") from None

    async def serve(self) -> None:
        await serve()

    def terminate(self) -> None:
        terminate()

    def close(self, unmount: bool = True) -> None:
        close(unmount)
