"""The passthrough engine: fusemux's own FUSE engine, speaking /dev/fuse directly with trio.

This module owns one FUSE session of the kernel protocol (:mod:`fusemux.engines.fuse_abi`):
the ``mount(2)`` of ``/dev/fuse``, the INIT negotiation, the request loop, the translation of
each request into one call on the engine-agnostic core (:class:`fusemux.core.fs.FileSystem`)
and the kernel-passthrough registrations of backing files. No libfuse, no pyfuse3.

Request loop: the session fd is non-blocking; ``trio.lowlevel.wait_readable`` wakes the loop,
one ``read`` takes one request into a reused buffer, and every request that can wait (all but
FORGET/BATCH_FORGET/INTERRUPT) gets its own task in the session's nursery, which writes its
reply with one ``writev``. The kernel takes replies in any order.

Passthrough: at OPEN the core opens the backing file as usual; its fd is registered with
``FUSE_DEV_IOC_BACKING_OPEN`` and the reply carries ``FOPEN_PASSTHROUGH`` and the backing id.
From then on reads, writes and mmap of that open file go from the kernel straight to the
backing file; only FLUSH, FSYNC, FALLOCATE, LSEEK and RELEASE still reach fusemux. The kernel
wants every passthrough open of one inode to use the same backing id, so registrations are
per inode and counted; the last RELEASE of an inode closes it (``FUSE_DEV_IOC_BACKING_CLOSE``,
in the export's worker threads: dropping the last reference can mean a network round trip).
Where passthrough is refused (the ioctl fails, or the core has no fd to offer), the open is
served here instead: READ and WRITE then come to the engine, with ``FOPEN_DIRECT_IO`` so that
the inode never enters the kernel's cached I/O mode, which would refuse later passthrough
opens.

Lookup counts: every entry the kernel instantiates (LOOKUP, READDIRPLUS) adds one to its
node's count and FORGET takes them back. The core's inode numbers are stable for the daemon's
life, so nothing is freed on FORGET, but a count going below zero means the engine and the
kernel disagree: that is logged at ERROR and counted in ``engine_stats`` (``forget_errors``).

Interrupts: INTERRUPT cancels the named request's task if the core says its operation may
be cancelled (:func:`fusemux.core.api.may_interrupt`: the side-effect-free reads, lookups,
stats, xattr reads, fsync); it is then answered with EINTR. The core abandons a backing call
in flight as it does at ``io_timeout``, so a process killed while it waits on a hung export
can exit, and a mount the request was waiting for goes on for every other caller.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from fusemux import libc
from fusemux.core import metrics
from fusemux.core.api import Attr, Ctx, DirEntry, EngineStatistics, Op, SetAttr, may_interrupt
from fusemux.core.fs import FileSystem
from fusemux.core.mounter import MNT_DETACH, read_mountinfo, umount2
from fusemux.engines import fuse_abi as abi
from fusemux.errors import FusemuxError, reply_errno

log = logging.getLogger(__name__)

NAME = "passthrough"
MAX_PAGES = 256  # FUSE_MAX_MAX_PAGES: 1 MiB requests
MAX_WRITE = MAX_PAGES * 4096
MAX_READAHEAD = 1 << 20
MAX_BACKGROUND = 64
DRAIN_TIMEOUT = 5.0  # at stop: how long requests in flight may take to finish
BUFFER_SIZE = MAX_WRITE + abi.MIN_READ_BUFFER
MOUNT_OPTIONS = "rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
FSTYPE = "fuse.fusemux"
FSNAME = "fusemux"

_MS_NOSUID = 2
_MS_NODEV = 4

# The core's name for each opcode it serves, for the policy questions the engine asks it
# (which requests an INTERRUPT may cancel: fusemux.core.api.INTERRUPTIBLE).
_OPS = {
    abi.LOOKUP: Op.LOOKUP,
    abi.GETATTR: Op.GETATTR,
    abi.SETATTR: Op.SETATTR,
    abi.OPEN: Op.OPEN,
    abi.READ: Op.READ,
    abi.WRITE: Op.WRITE,
    abi.STATFS: Op.STATFS,
    abi.RELEASE: Op.RELEASE,
    abi.FSYNC: Op.FSYNC,
    abi.FLUSH: Op.FLUSH,
    abi.FALLOCATE: Op.FALLOCATE,
    abi.LSEEK: Op.LSEEK,
    abi.ACCESS: Op.ACCESS,
    abi.GETXATTR: Op.GETXATTR,
    abi.LISTXATTR: Op.LISTXATTR,
    abi.SETXATTR: Op.SETXATTR,
    abi.REMOVEXATTR: Op.REMOVEXATTR,
    abi.OPENDIR: Op.OPENDIR,
    abi.READDIR: Op.READDIR,
    abi.READDIRPLUS: Op.READDIR,
    abi.RELEASEDIR: Op.RELEASEDIR,
}
_NAMESPACE_OPS = {
    abi.MKNOD: "mknod",
    abi.MKDIR: "mkdir",
    abi.UNLINK: "unlink",
    abi.RMDIR: "rmdir",
    abi.RENAME: "rename",
    abi.RENAME2: "rename",
    abi.LINK: "link",
    abi.SYMLINK: "symlink",
    abi.CREATE: "create",
    abi.TMPFILE: "tmpfile",
}


class EngineError(Exception):
    """The engine cannot start (no /dev/fuse, mount refused, INIT not as required)."""


@dataclass
class Request:
    opcode: int
    unique: int
    nodeid: int
    ctx: Ctx
    body: bytes  # the request after its header


@dataclass
class Backing:
    """One passthrough registration: a backing file the kernel may use for an inode."""

    backing_id: int
    refs: int
    fh: int  # the handle whose backing fd was registered (the core keeps it open until release)


def kernel_mount(fd: int, mountpoint: str, fsname: str = FSNAME, fstype: str = FSTYPE) -> None:
    """mount(2) a FUSE filesystem served on *fd* at *mountpoint*."""
    try:
        libc.mount(fsname, mountpoint, fstype, _MS_NOSUID | _MS_NODEV, f"fd={fd},{MOUNT_OPTIONS}")
    except OSError as e:
        raise EngineError(f"mount of {mountpoint} refused: {e.strerror}") from None


def kernel_umount(mountpoint: str) -> None:
    """Lazily detach *mountpoint* (the fd close then ends the connection)."""
    try:
        umount2(mountpoint, MNT_DETACH)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            log.warning("umount of %s failed: %s", mountpoint, e.strerror)


def _open_dev() -> int:
    try:
        return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise EngineError(f"cannot open /dev/fuse: {e.strerror}") from None


def _read_init(fd: int, timeout: float) -> tuple[int, int, int, int]:
    """Wait for the kernel's INIT; return (unique, major, minor, flags incl. flags2)."""
    buf = bytearray(BUFFER_SIZE)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise EngineError("the kernel sent no FUSE INIT")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            n = os.readv(fd, [buf])
        except BlockingIOError:
            continue
        length, opcode, unique, *_ = abi.IN_HEADER.unpack_from(buf)
        if opcode != abi.INIT or n < abi.IN_HEADER.size + abi.INIT_IN.size:
            raise EngineError(f"expected FUSE INIT, got opcode {opcode}")
        major, minor, _readahead, flags = abi.INIT_IN.unpack_from(buf, abi.IN_HEADER.size)
        off = abi.IN_HEADER.size + abi.INIT_IN.size
        if flags & abi.INIT_EXT and n >= off + 4:
            (flags2,) = abi.INIT_IN_FLAGS2.unpack_from(buf, off)
            flags |= flags2 << 32
        return unique, major, minor, flags


def probe(workdir: Path) -> tuple[bool, str]:
    """Can this process serve FUSE passthrough? A throwaway mount asks the kernel.

    Mounts a session on a private directory under *workdir*, reads the kernel's INIT offer
    and unmounts it again, without answering (closing the fd ends the connection).
    """
    if os.geteuid() != 0:
        return False, "passthrough needs root (CAP_SYS_ADMIN registers backing files)"
    _clear_stale_probes(workdir)
    probe_dir = workdir / f"engine-probe.{os.getpid()}"
    try:
        probe_dir.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        return False, f"cannot create {probe_dir}: {e.strerror}"
    fd = -1
    mounted = False
    try:
        fd = _open_dev()
        kernel_mount(fd, str(probe_dir), fsname="fusemux-probe")
        mounted = True
        _, major, minor, flags = _read_init(fd, 5.0)
    except EngineError as e:
        return False, str(e)
    finally:
        if mounted:
            kernel_umount(str(probe_dir))
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            probe_dir.rmdir()
    if (major, minor) < (abi.KERNEL_VERSION, abi.PASSTHROUGH_MINOR):
        return False, f"kernel FUSE protocol {major}.{minor} is older than 7.40"
    if not flags & abi.PASSTHROUGH:
        return False, "the kernel does not offer FUSE_PASSTHROUGH (CONFIG_FUSE_PASSTHROUGH)"
    return True, f"kernel FUSE protocol {major}.{minor} offers passthrough"


def _clear_stale_probes(workdir: Path) -> None:
    """Detach probe mounts a killed daemon left behind (never stat()ed: they are dead)."""
    prefix = f"{workdir}/engine-probe."
    for m in read_mountinfo():
        if m.mountpoint.startswith(prefix):
            log.info("detaching a stale engine probe mount at %s", m.mountpoint)
            kernel_umount(m.mountpoint)
            with contextlib.suppress(OSError):
                os.rmdir(m.mountpoint)


def _valid(timeout: float) -> tuple[int, int]:
    sec = int(timeout)
    return sec, int((timeout - sec) * 1e9)


def _attr(a: Attr) -> bytes:
    return abi.ATTR.pack(
        a.ino,
        a.size,
        a.blocks,
        a.atime_ns // 1_000_000_000,
        a.mtime_ns // 1_000_000_000,
        a.ctime_ns // 1_000_000_000,
        a.atime_ns % 1_000_000_000,
        a.mtime_ns % 1_000_000_000,
        a.ctime_ns % 1_000_000_000,
        a.mode,
        a.nlink,
        a.uid,
        a.gid,
        0,
        a.blksize,
        0,
    )


def _entry(a: Attr) -> bytes:
    sec, nsec = _valid(a.timeout)
    return abi.ENTRY_OUT_HEAD.pack(a.ino, 0, sec, sec, nsec, nsec) + _attr(a)


def _attr_out(a: Attr) -> bytes:
    sec, nsec = _valid(a.timeout)
    return abi.ATTR_OUT_HEAD.pack(sec, nsec, 0) + _attr(a)


def _dirent(entry: DirEntry, plus: bool) -> bytes:
    name = os.fsencode(entry.name)
    head = abi.DIRENT_HEAD.pack(
        entry.attr.ino, entry.next_offset, len(name), stat.S_IFMT(entry.attr.mode) >> 12
    )
    raw = head + name
    raw += b"\0" * (-len(raw) % 8)
    return (_entry(entry.attr) + raw) if plus else raw


class Session:
    """One FUSE connection: the mount, the negotiated parameters and the request loop."""

    name = NAME

    def __init__(
        self, fs: FileSystem, mountpoint: str, passthrough: bool = True, debug: bool = False
    ) -> None:
        self.fs = fs
        self.debug = debug  # serve -d: one DEBUG line per request
        self.mountpoint = mountpoint
        self.want_passthrough = passthrough
        self.fd = -1
        self.mounted = False
        self.passthrough = False  # negotiated
        self.proto = (0, 0)
        self.flags = 0
        self.stats: Counter[str] = Counter()
        self.lookups: dict[int, int] = {}
        self.backing: dict[int, Backing] = {}  # ino -> registration
        self.fh_backing: dict[int, int] = {}  # fh -> ino, for passthrough opens
        self.inflight: dict[int, tuple[int, trio.CancelScope]] = {}
        self._cancel = trio.CancelScope()
        self._buf = bytearray(BUFFER_SIZE)
        self._handlers: dict[int, Callable[[Request], Awaitable[bytes | list[bytes] | None]]] = {
            abi.LOOKUP: self._lookup,
            abi.GETATTR: self._getattr,
            abi.SETATTR: self._setattr,
            abi.OPEN: self._open,
            abi.READ: self._read,
            abi.WRITE: self._write,
            abi.STATFS: self._statfs,
            abi.RELEASE: self._release,
            abi.FSYNC: self._fsync,
            abi.SETXATTR: self._setxattr,
            abi.GETXATTR: self._getxattr,
            abi.LISTXATTR: self._listxattr,
            abi.REMOVEXATTR: self._removexattr,
            abi.FLUSH: self._flush,
            abi.OPENDIR: self._opendir,
            abi.READDIR: self._readdir,
            abi.READDIRPLUS: self._readdirplus,
            abi.RELEASEDIR: self._releasedir,
            abi.ACCESS: self._access,
            abi.FALLOCATE: self._fallocate,
            abi.LSEEK: self._lseek,
        }
        fs.attach(self)

    # -- lifecycle ------------------------------------------------------------------------

    def mount(self) -> None:
        """Open /dev/fuse, mount it, and answer the kernel's INIT."""
        self.fd = _open_dev()
        try:
            kernel_mount(self.fd, self.mountpoint)
            self.mounted = True
            unique, major, minor, offered = _read_init(self.fd, 10.0)
            self._init_reply(unique, major, minor, offered)
        except BaseException:
            self.close()
            raise

    def _init_reply(self, unique: int, major: int, minor: int, offered: int) -> None:
        if major != abi.KERNEL_VERSION:
            self._reply_error(unique, errno.EPROTO)
            raise EngineError(f"unsupported FUSE protocol {major}.{minor}")
        want = (
            abi.ASYNC_READ
            | abi.ATOMIC_O_TRUNC
            | abi.BIG_WRITES
            | abi.AUTO_INVAL_DATA
            | abi.DO_READDIRPLUS
            | abi.ASYNC_DIO
            | abi.PARALLEL_DIROPS
            | abi.MAX_PAGES
            | abi.HANDLE_KILLPRIV_V2
            | abi.INIT_EXT
        )
        if self.want_passthrough and minor >= abi.PASSTHROUGH_MINOR:
            want |= abi.PASSTHROUGH
        flags = want & offered
        self.flags = flags
        self.passthrough = bool(flags & abi.PASSTHROUGH)
        self.proto = (major, min(minor, abi.KERNEL_MINOR_VERSION))
        out = abi.INIT_OUT.pack(
            abi.KERNEL_VERSION,
            abi.KERNEL_MINOR_VERSION,
            MAX_READAHEAD,
            flags & 0xFFFFFFFF,
            MAX_BACKGROUND,
            MAX_BACKGROUND * 3 // 4,
            MAX_WRITE,
            1,  # time_gran: nanoseconds
            MAX_PAGES,
            0,
            flags >> 32,
            abi.MAX_STACK_DEPTH if self.passthrough else 0,
            0,
        )
        self._write_reply(unique, 0, [out])
        log.info(
            "FUSE protocol %d.%d, flags %s, max_write %d%s",
            *self.proto,
            ",".join(abi.flag_names(flags)),
            MAX_WRITE,
            f", max_stack_depth {abi.MAX_STACK_DEPTH}" if self.passthrough else "",
        )
        if self.want_passthrough and not self.passthrough:
            log.warning("the kernel did not grant FUSE passthrough: I/O is served by fusemux")

    def terminate(self) -> None:
        self._cancel.cancel()

    def close(self, unmount: bool = True) -> None:
        """Drop every passthrough registration, unmount, close the session fd.

        Registrations left here belong to files still open at a forced stop. The core still
        holds their backing fds (it closes them later, in FileSystem.shutdown), so dropping a
        registration is never the file's last reference and does no I/O on the event loop.
        """
        if self.fd >= 0:
            for ino, b in list(self.backing.items()):
                self._backing_close(b.backing_id)
                del self.backing[ino]
        if unmount and self.mounted:
            kernel_umount(self.mountpoint)
            self.mounted = False
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def statistics(self) -> EngineStatistics:
        """The negotiated connection and the request counters (``engine_stats``)."""
        return EngineStatistics(
            passthrough=self.passthrough,
            requests=dict(self.stats),
            protocol=f"{self.proto[0]}.{self.proto[1]}",
            flags=tuple(abi.flag_names(self.flags)),
            max_write=MAX_WRITE,
            max_stack_depth=abi.MAX_STACK_DEPTH if self.passthrough else 0,
            backing_registered=len(self.backing),
            nodes_looked_up=len(self.lookups),
        )

    # -- the request loop -----------------------------------------------------------------

    async def serve(self) -> None:
        """Serve requests until terminate(), DESTROY or the unmount of the mountpoint.

        Then no new request is read; those in flight get up to DRAIN_TIMEOUT to finish (a
        RELEASE on its way, say), and the rest is cancelled (the close that follows ends the
        connection, so their callers get ENOTCONN rather than waiting).
        """
        async with trio.open_nursery() as nursery:
            try:
                with self._cancel:
                    await self._loop(nursery)
                with trio.move_on_after(DRAIN_TIMEOUT):
                    while self.inflight:  # noqa: ASYNC110 - a short poll at shutdown only
                        await trio.sleep(0.01)
            finally:
                nursery.cancel_scope.cancel()

    async def _loop(self, nursery: trio.Nursery) -> None:
        fd = self.fd
        buf = self._buf
        view = memoryview(buf)
        served = 0
        while True:
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            except OSError as e:
                if e.errno == errno.ENODEV:  # unmounted: the session is over
                    log.info("FUSE connection closed by the kernel")
                    return
                if e.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                    continue
                raise
            length, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = abi.IN_HEADER.unpack_from(
                buf
            )
            name = abi.OPCODE_NAMES.get(opcode, str(opcode))
            self.stats[name] += 1
            if self.debug:
                log.debug("request %d: %s node %d from pid %d", unique, name, nodeid, pid)
            body = bytes(view[abi.IN_HEADER.size : min(n, length)])
            req = Request(opcode, unique, nodeid, Ctx(pid=pid, uid=uid, gid=gid), body)
            if opcode == abi.FORGET:
                self._forget_one(nodeid, abi.FORGET_IN.unpack_from(body)[0])
            elif opcode == abi.BATCH_FORGET:
                self._batch_forget(body)
            elif opcode == abi.INTERRUPT:
                self._interrupt(abi.INTERRUPT_IN.unpack_from(body)[0])
            elif opcode == abi.DESTROY:
                self._write_reply(unique, 0, [])
                log.info("FUSE DESTROY received")
                return
            elif opcode == abi.INIT:
                self._reply_error(unique, errno.EPROTO)
            elif opcode == abi.GETXATTR and (
                refusal := self.fs.xattr_refusal(abi.split_name(body[abi.GETXATTR_IN.size :]))
            ):
                # Answered in the loop, no task: ls -l asks every file for two such names.
                if body.startswith(b"security.", abi.GETXATTR_IN.size):
                    self.stats["GETXATTR_security"] += 1
                self._reply_error(unique, refusal)
            else:
                scope = trio.CancelScope()
                self.inflight[unique] = (opcode, scope)
                nursery.start_soon(self._run, req, scope)
            # Yield now and then so replies and the rest of trio keep up with a busy kernel.
            served += 1
            if served % 16 == 0:
                await trio.lowlevel.checkpoint()

    async def _run(self, req: Request, scope: trio.CancelScope) -> None:
        handler = self._handlers.get(req.opcode)
        started = metrics.now()
        try:
            with scope:
                if handler is None:
                    if req.opcode in _NAMESPACE_OPS:
                        raise self.fs.refuse_namespace_change(_NAMESPACE_OPS[req.opcode])
                    self._reply_error(req.unique, errno.ENOSYS)
                    return
                out = await handler(req)
                if out is not None:  # None: the handler replied itself
                    self._write_reply(req.unique, 0, out if isinstance(out, list) else [out])
                return
            # Only an INTERRUPT cancels this scope.
            self.stats["interrupted"] += 1
            self._reply_error(req.unique, errno.EINTR)
        except Exception as e:
            op = abi.OPCODE_NAMES.get(req.opcode, str(req.opcode))
            self._reply_error(req.unique, reply_errno(e, op, log))
        finally:
            self.inflight.pop(req.unique, None)
            metrics.request_done(abi.OPCODE_NAMES.get(req.opcode, str(req.opcode)), started)

    def _write_reply(self, unique: int, error: int, parts: list[bytes]) -> bool:
        """One reply; False if the kernel no longer waits for it (interrupted, aborted)."""
        size = abi.OUT_HEADER.size + sum(len(p) for p in parts)
        header = abi.OUT_HEADER.pack(size, -error, unique)
        try:
            os.writev(self.fd, [header, *parts])
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                self.stats["replies_dropped"] += 1
                return False
            raise
        return True

    def _reply_error(self, unique: int, error: int) -> None:
        self._write_reply(unique, error, [])

    def _interrupt(self, unique: int) -> None:
        found = self.inflight.get(unique)
        if found is not None and may_interrupt(_OPS.get(found[0])):
            found[1].cancel()

    # -- lookup counts ---------------------------------------------------------------------

    def _looked_up(self, ino: int) -> None:
        self.lookups[ino] = self.lookups.get(ino, 0) + 1

    def _forget_one(self, ino: int, n: int) -> None:
        left = self.lookups.get(ino, 0) - n
        if left < 0:
            self.stats["forget_errors"] += 1
            log.error(
                "FORGET accounting: node %d forgotten %d time(s) but looked up only %d: "
                "the engine and the kernel disagree (bug)",
                ino,
                n,
                n + left,
            )
            self.lookups.pop(ino, None)
        elif left == 0:
            self.lookups.pop(ino, None)
        else:
            self.lookups[ino] = left

    def _batch_forget(self, body: bytes) -> None:
        count, _ = abi.BATCH_FORGET_IN.unpack_from(body)
        off = abi.BATCH_FORGET_IN.size
        for _ in range(count):
            ino, n = abi.FORGET_ONE.unpack_from(body, off)
            off += abi.FORGET_ONE.size
            self._forget_one(ino, n)

    # -- handlers: each returns the reply payload, or raises -------------------------------

    async def _lookup(self, req: Request) -> bytes:
        name = os.fsdecode(abi.split_name(req.body))
        attr = await self.fs.lookup(req.nodeid, name, req.ctx)
        self._looked_up(attr.ino)  # counted now: a reply write cannot fail after this
        return _entry(attr)

    async def _getattr(self, req: Request) -> bytes:
        return _attr_out(await self.fs.getattr(req.nodeid, req.ctx))

    async def _setattr(self, req: Request) -> bytes:
        (valid, _, fh, size, _lo, atime, mtime, _ct, atimens, mtimens, _ctn, mode, _u4, uid,
         gid, _u5) = abi.SETATTR_IN.unpack_from(req.body)  # fmt: skip
        now = time.time_ns()
        change = SetAttr(
            size=size if valid & abi.FATTR_SIZE else None,
            atime_ns=(
                now
                if valid & abi.FATTR_ATIME_NOW
                else atime * 1_000_000_000 + atimens
                if valid & abi.FATTR_ATIME
                else None
            ),
            mtime_ns=(
                now
                if valid & abi.FATTR_MTIME_NOW
                else mtime * 1_000_000_000 + mtimens
                if valid & abi.FATTR_MTIME
                else None
            ),
            mode=mode if valid & abi.FATTR_MODE else None,
            uid=uid if valid & abi.FATTR_UID else None,
            gid=gid if valid & abi.FATTR_GID else None,
            kill_suidgid=bool(valid & abi.FATTR_KILL_SUIDGID),
        )
        handle = fh if valid & abi.FATTR_FH else None
        return _attr_out(await self.fs.setattr(req.nodeid, change, handle, req.ctx))

    async def _open(self, req: Request) -> None:
        flags, open_flags = abi.OPEN_IN.unpack_from(req.body)
        # Passthrough writes never reach fusemux, and under HANDLE_KILLPRIV_V2 the kernel
        # leaves clearing set-ID bits to the server, so an unprivileged writer gets them
        # cleared at open (stricter than at the first write, never looser).
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY
        kill = bool(open_flags & abi.OPEN_KILL_SUIDGID) or (
            self.passthrough and writing and req.ctx.uid != 0
        )
        reply = await self.fs.open(req.nodeid, flags, req.ctx, kill_suidgid=kill)
        backing_id = 0
        if self.passthrough:
            backing_id = self._register(req.nodeid, reply.fh, reply.backing_fd)
        if backing_id:
            fopen = abi.FOPEN_PASSTHROUGH
            self.stats["open_passthrough"] += 1
        elif self.passthrough:
            # Served here; direct I/O keeps the inode out of the cached mode the kernel
            # would refuse later passthrough opens of the same inode in.
            fopen = abi.FOPEN_DIRECT_IO
            self.stats["open_fallback"] += 1
        else:
            fopen = (abi.FOPEN_DIRECT_IO if reply.direct_io else 0) | (
                abi.FOPEN_KEEP_CACHE if reply.keep_cache else 0
            )
            self.stats["open_fallback"] += 1
        out = abi.OPEN_OUT.pack(reply.fh, fopen, backing_id)
        if not self._write_reply(req.unique, 0, [out]):
            # The kernel gave up on this open: nobody will ever release the handle.
            await self._drop_open(reply.fh)

    def _register(self, ino: int, fh: int, fd: int | None) -> int:
        """The inode's backing id (registering *fd* if it has none); 0 if refused."""
        if fd is None:
            return 0
        existing = self.backing.get(ino)
        if existing is not None:
            existing.refs += 1
            self.fh_backing[fh] = ino
            return existing.backing_id
        arg = bytearray(abi.BACKING_MAP.pack(fd, 0, 0))
        try:
            backing_id = int(fcntl.ioctl(self.fd, abi.DEV_IOC_BACKING_OPEN, arg, True))
        except OSError as e:
            self.stats["passthrough_refused"] += 1
            log.info("passthrough refused for inode %d (%s): served by fusemux", ino, e.strerror)
            return 0
        if backing_id <= 0:
            return 0
        self.backing[ino] = Backing(backing_id=backing_id, refs=1, fh=fh)
        self.fh_backing[fh] = ino
        return backing_id

    def _backing_close(self, backing_id: int) -> None:
        arg = bytearray(abi.BACKING_ID.pack(backing_id))
        try:
            fcntl.ioctl(self.fd, abi.DEV_IOC_BACKING_CLOSE, arg, True)
        except OSError as e:
            log.warning("closing passthrough registration %d failed: %s", backing_id, e)

    async def _unregister(self, fh: int) -> None:
        ino = self.fh_backing.pop(fh, None)
        if ino is None:
            return
        b = self.backing[ino]
        b.refs -= 1
        if b.refs == 0:
            del self.backing[ino]
            if b.fh == fh:
                # The registered fd is this handle's, still open in the core: dropping the
                # registration cannot drop the file's last reference, so it does no I/O.
                self._backing_close(b.backing_id)
            else:
                # The registration may hold the last reference (its handle is gone): the
                # final fput can mean a round trip to the backing filesystem.
                await self.fs.handle_call(fh, self._backing_close, b.backing_id)

    async def _drop_open(self, fh: int) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self._unregister(fh)
            finally:
                await self.fs.release(fh)

    async def _read(self, req: Request) -> bytes:
        fh, off, size, *_ = abi.READ_IN.unpack_from(req.body)
        return await self.fs.read(fh, off, size)

    async def _write(self, req: Request) -> bytes:
        fh, off, size, write_flags, *_ = abi.WRITE_IN.unpack_from(req.body)
        data = req.body[abi.WRITE_IN.size : abi.WRITE_IN.size + size]
        kill = bool(write_flags & abi.WRITE_KILL_SUIDGID)
        n = await self.fs.write(fh, off, data, kill_suidgid=kill)
        return abi.WRITE_OUT.pack(n, 0)

    async def _statfs(self, req: Request) -> bytes:
        st = await self.fs.statfs(req.ctx, req.nodeid)
        return abi.KSTATFS.pack(
            st.blocks, st.bfree, st.bavail, st.files, st.ffree, st.bsize, st.namemax, st.bsize, 0
        )

    async def _release(self, req: Request) -> bytes:
        fh, *_ = abi.RELEASE_IN.unpack_from(req.body)
        with trio.CancelScope(shield=True):  # a release always completes
            try:
                await self._unregister(fh)
            finally:
                await self.fs.release(fh)
        return b""

    async def _flush(self, req: Request) -> bytes:
        fh, *_ = abi.FLUSH_IN.unpack_from(req.body)
        await self.fs.flush(fh, written_elsewhere=fh in self.fh_backing)
        return b""

    async def _fsync(self, req: Request) -> bytes:
        fh, fsync_flags, _ = abi.FSYNC_IN.unpack_from(req.body)
        await self.fs.fsync(fh, bool(fsync_flags & abi.FSYNC_FDATASYNC))
        return b""

    async def _fallocate(self, req: Request) -> bytes:
        fh, off, length, mode, _ = abi.FALLOCATE_IN.unpack_from(req.body)
        await self.fs.fallocate(fh, mode, off, length)
        return b""

    async def _lseek(self, req: Request) -> bytes:
        fh, off, whence, _ = abi.LSEEK_IN.unpack_from(req.body)
        return abi.LSEEK_OUT.pack(await self.fs.lseek(fh, off, whence))

    async def _access(self, req: Request) -> bytes:
        mask, _ = abi.ACCESS_IN.unpack_from(req.body)
        await self.fs.access(req.nodeid, mask, req.ctx)
        return b""

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        """getxattr/listxattr: the length when asked with size 0, ERANGE if it does not fit."""
        if size == 0:
            return abi.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise FusemuxError("value larger than the caller's buffer", errno.ERANGE)
        return value

    async def _getxattr(self, req: Request) -> bytes:
        size, _ = abi.GETXATTR_IN.unpack_from(req.body)
        name = os.fsdecode(abi.split_name(req.body[abi.GETXATTR_IN.size :]))
        if name.startswith("security."):  # the kernel's capability probe, if it probes
            self.stats["GETXATTR_security"] += 1
        value = await self.fs.getxattr(req.nodeid, name, req.ctx)
        return self._sized(value, size)

    async def _listxattr(self, req: Request) -> bytes:
        size, _ = abi.GETXATTR_IN.unpack_from(req.body)
        names = await self.fs.listxattr(req.nodeid, req.ctx)
        return self._sized(b"".join(os.fsencode(n) + b"\0" for n in names), size)

    async def _setxattr(self, req: Request) -> bytes:
        size, _flags = abi.SETXATTR_IN.unpack_from(req.body)
        rest = req.body[abi.SETXATTR_IN.size :]
        name = abi.split_name(rest)
        value = rest[len(name) + 1 : len(name) + 1 + size]
        await self.fs.setxattr(req.nodeid, os.fsdecode(name), value, req.ctx)
        return b""

    async def _removexattr(self, req: Request) -> bytes:
        name = os.fsdecode(abi.split_name(req.body))
        await self.fs.removexattr(req.nodeid, name, req.ctx)
        return b""

    async def _opendir(self, req: Request) -> bytes:
        fh = await self.fs.opendir(req.nodeid, req.ctx)
        return abi.OPEN_OUT.pack(fh, 0, 0)

    async def _readdir(self, req: Request) -> list[bytes]:
        return await self._dir(req, plus=False)

    async def _readdirplus(self, req: Request) -> list[bytes]:
        return await self._dir(req, plus=True)

    async def _dir(self, req: Request, plus: bool) -> list[bytes]:
        fh, off, size, *_ = abi.READ_IN.unpack_from(req.body)
        parts: list[bytes] = []
        used = 0
        offset = off
        while True:
            entries = await self.fs.readdir(fh, offset)
            if not entries:
                break
            for entry in entries:
                raw = _dirent(entry, plus)
                if used + len(raw) > size:
                    return parts
                parts.append(raw)
                used += len(raw)
                offset = entry.next_offset
                if plus and entry.name not in (".", ".."):  # the kernel skips those two
                    self._looked_up(entry.attr.ino)
        return parts

    async def _releasedir(self, req: Request) -> bytes:
        fh, *_ = abi.RELEASE_IN.unpack_from(req.body)
        with trio.CancelScope(shield=True):
            await self.fs.releasedir(fh)
        return b""
