"""One FUSE connection of the own engine: mount, INIT, the request loop, replies.

This module owns the connection's life: the ``mount(2)`` of ``/dev/fuse``
(:mod:`~fusemux.engines.kernel.device`), the INIT negotiation, the request loop, the replies,
interrupts and the lookup counts the kernel keeps. Each request is handed to its handler in
:mod:`~fusemux.engines.kernel.ops`; passthrough registrations live in
:mod:`~fusemux.engines.kernel.backing`.

Request loop: the session fd is non-blocking; ``trio.lowlevel.wait_readable`` wakes the loop,
one ``read`` takes one request into a reused buffer, and every request that can wait (all but
FORGET/BATCH_FORGET/INTERRUPT, and GETXATTR of names the core refuses at once) gets its own
task in the session's nursery, which writes its reply with one ``writev``. The kernel takes
replies in any order.

Lookup counts: every entry the kernel instantiates (LOOKUP, READDIRPLUS) adds one to its
node's count and FORGET takes them back. The core's inode numbers are stable for the daemon's
life, so nothing is freed on FORGET, but a count going below zero means the engine and the
kernel disagree: that is logged at ERROR and counted in ``engine_stats`` (``forget_errors``).

Interrupts: INTERRUPT asks the core what to do with the named request
(:func:`fusemux.core.api.interrupt_policy`): a waiting SETLKW is cancelled at once; the
side-effect-free requests (reads, lookups, stats, xattr reads, fsync, GETLK) are cancelled
once their caller has a fatal signal pending (polled in ``/proc``), and answered EINTR; all
others run to their end. The core abandons a backing call in flight as it does at
``io_timeout``, so a process killed while it waits on a hung export can exit, and a mount
the request was waiting for goes on for every other caller.

Locks: INIT negotiates ``FUSE_POSIX_LOCKS`` and ``FUSE_FLOCK_LOCKS``, so fcntl and flock
locks on volumes come here (GETLK, SETLK, SETLKW, and the lock owner of FLUSH) instead of
staying in the kernel, for passthrough opens too; the core takes them on the backing file.

Concurrency: everything runs on the trio thread; only the handlers' backing calls go to the
exports' worker threads (through the core).
"""

from __future__ import annotations

import errno
import logging
import os
from collections import Counter

import trio

from fusemux.core import metrics
from fusemux.core.api import Ctx, EngineStatistics, Interrupt, Op, caller_dying, interrupt_policy
from fusemux.core.fs import FileSystem
from fusemux.engines import fuse_abi as abi
from fusemux.engines.kernel.backing import BackingRegistry
from fusemux.engines.kernel.device import (
    BUFFER_SIZE,
    MAX_PAGES,
    MAX_WRITE,
    EngineError,
    kernel_mount,
    kernel_umount,
    open_dev,
    read_init,
)
from fusemux.engines.kernel.ops import Ops
from fusemux.engines.kernel.wire import Request
from fusemux.errors import reply_errno

log = logging.getLogger(__name__)

NAME = "passthrough"
MAX_READAHEAD = 1 << 20
MAX_BACKGROUND = 64
DRAIN_TIMEOUT = 5.0  # at stop: how long requests in flight may take to finish
INTERRUPT_POLL = 0.1  # how often an interrupted request checks whether its caller is dying

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
    abi.GETLK: Op.GETLK,
    abi.SETLK: Op.SETLK,
    abi.SETLKW: Op.SETLKW,
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
        self.backing = BackingRegistry(fs, self.stats)
        # unique -> (opcode, cancel scope of its task, caller's thread id)
        self.inflight: dict[int, tuple[int, trio.CancelScope, int]] = {}
        self._nursery: trio.Nursery | None = None
        self._cancel = trio.CancelScope()
        self._buf = bytearray(BUFFER_SIZE)
        self.ops = Ops(self)
        fs.attach(self)

    # -- lifecycle ------------------------------------------------------------------------

    def mount(self) -> None:
        """Open /dev/fuse, mount it, and answer the kernel's INIT."""
        self.fd = open_dev()
        self.backing.fd = self.fd
        try:
            kernel_mount(self.fd, self.mountpoint)
            self.mounted = True
            unique, major, minor, offered = read_init(self.fd, 10.0)
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
            | abi.POSIX_LOCKS  # locks reach the backing file (fusemux.core.locks)
            | abi.FLOCK_LOCKS
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
        self.write_reply(unique, 0, [out])
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
            self.backing.close_all()
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
            self._nursery = nursery
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
                self.write_reply(unique, 0, [])
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
                self.inflight[unique] = (opcode, scope, pid)
                nursery.start_soon(self._run, req, scope)
            # Yield now and then so replies and the rest of trio keep up with a busy kernel.
            served += 1
            if served % 16 == 0:
                await trio.lowlevel.checkpoint()

    async def _run(self, req: Request, scope: trio.CancelScope) -> None:
        handler = self.ops.handlers.get(req.opcode)
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
                    self.write_reply(req.unique, 0, out if isinstance(out, list) else [out])
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

    def write_reply(self, unique: int, error: int, parts: list[bytes]) -> bool:
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
        self.write_reply(unique, error, [])

    def _interrupt(self, unique: int) -> None:
        """The kernel interrupts request *unique*: do what the core says for its operation."""
        found = self.inflight.get(unique)
        if found is None:
            return  # answered already
        opcode, scope, tid = found
        policy = interrupt_policy(_OPS.get(opcode))
        if policy is Interrupt.NOW:
            scope.cancel()
        elif policy is Interrupt.IF_DYING and self._nursery is not None:
            self._nursery.start_soon(self._cancel_when_caller_dies, unique, scope, tid)

    async def _cancel_when_caller_dies(
        self, unique: int, scope: trio.CancelScope, tid: int
    ) -> None:
        """Cancel request *unique* once its caller has a fatal signal pending; give up when
        the request is answered. The kernel sends one INTERRUPT per request, whatever the
        signal, so a caller killed later is noticed here."""
        while (found := self.inflight.get(unique)) is not None and found[1] is scope:
            if caller_dying(tid):
                scope.cancel()
                return
            await trio.sleep(INTERRUPT_POLL)

    # -- lookup counts ---------------------------------------------------------------------

    def looked_up(self, ino: int) -> None:
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
