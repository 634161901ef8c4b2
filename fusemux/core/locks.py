"""File locks taken through fusemux, held as real locks on the backing files.

This module owns everything about ``fcntl``/``flock`` locks on volumes: the mapping of a FUSE
lock owner onto an open file description of the backing file, the lock calls on it (Linux
open-file-description locks, ``F_OFD_*``, and ``flock``), the wait of a blocking request and
its interruption, the errno policy of lock requests, which of them an INTERRUPT may end, and
the table of the locks held through this daemon (``user.fusemux.locks``, ``fusemux status``).
docs/design.md ("Locks") describes the mapping and where it cannot be exact.

The mapping: the kernel names a lock's owner with an opaque ``lock_owner`` (its scrambled
``fl_owner``: the ``struct file`` for OFD locks and ``flock``, the process's ``files_struct``
for classic POSIX locks) and does not say which kind a byte-range lock is. fusemux gives
each (inode, lock_owner) its own backing open file description, a reopen of the handle's
backing fd through ``/proc/self/fd`` (the same inode, never a path lookup), and takes the
owner's locks on it with ``F_OFD_SETLK(W)`` or ``flock``. So locks of different owners
conflict with each other on the backing file exactly as they would between two processes
(or two hosts) on it, the locks of one owner merge and split as the kernel does for that
owner, and they are released by ``FLUSH`` (a close by the owning process: its POSIX locks
on the inode go, through whichever fd it closed) or by the ``RELEASE`` of the last handle
that used the owner (the open file description of the caller is gone: OFD locks and flock
go, by closing the owner's backing fd). No other code path closes an owner fd, and a lock is
never dropped to be taken again.

Concurrency: the table lives in the trio thread. Every lock call runs in a worker thread of
the volume's export (:func:`fusemux.core.workers.run`, with its ``io_timeout``), except the
wait of a blocking request (SETLKW): that runs in a second, small per-export pool kept for
waits (:data:`MAX_WAITS_PER_EXPORT` threads), so waiters never take the threads the export's
I/O needs and hold no other request or export lock while they wait. An INTERRUPT (or the
daemon stopping) ends a wait by sending :data:`KICK_SIGNAL` to the waiting thread (a no-op
Python handler, installed without ``SA_RESTART``, so the ``fcntl``/``flock`` there returns
``EINTR``); the kick repeats until the call has returned, so a signal that lands just before
the call is not lost. The result the call really had is what the caller gets: a lock granted
in the same instant as the interrupt is reported as granted, never silently held.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import signal
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import trio

from fusemux.core import handles as hio
from fusemux.core import workers
from fusemux.core.exports import Export
from fusemux.core.handles import Handle, HandleTable
from fusemux.errors import FusemuxError, errno_of

log = logging.getLogger(__name__)

OFFSET_MAX: Final = (1 << 63) - 1  # the kernel's "to the end of the file"
F_OFD_GETLK: Final = 36
F_OFD_SETLK: Final = 37
F_OFD_SETLKW: Final = 38
READ: Final = fcntl.F_RDLCK
WRITE: Final = fcntl.F_WRLCK
UNLOCK: Final = fcntl.F_UNLCK
# struct flock on x86_64/aarch64: l_type l_whence l_start l_len l_pid (+ padding)
FLOCK_STRUCT: Final = struct.Struct("<hh4xqqi4x")

# Threads per export that may sit in a blocking lock wait at once; further waiters queue in
# trio (interruptible) for one of them.
MAX_WAITS_PER_EXPORT: Final = 16
# The signal that ends a wait in a worker thread. SIGURG: ignored by default, so a kick can
# never kill the process, and nothing else in fusemux uses it.
KICK_SIGNAL: Final = signal.SIGURG
KICK_INTERVAL: Final = 0.05
# Without the signal handler (trio not in the main thread): how often a wait polls.
POLL_INTERVAL: Final = 0.1

# Errnos of a lock call that are the answer itself (a conflict, a bad range, a backing
# filesystem without locks): passed to the caller unchanged, logged at DEBUG only.
ANSWERS: Final = frozenset(
    {
        errno.EAGAIN,
        errno.EACCES,
        errno.EINTR,
        errno.EDEADLK,
        errno.ENOLCK,
        errno.EBADF,
        errno.EINVAL,
        errno.EOVERFLOW,
        errno.EOPNOTSUPP,
    }
)


def lock_error(e: OSError, what: str) -> FusemuxError:
    """The errno policy of lock requests: the backing filesystem's answer, as it gave it."""
    err = e.errno if e.errno in ANSWERS else errno_of(e)
    return FusemuxError(f"{what}: {e.strerror or e}", err)


class InvalidLock(FusemuxError):
    errno = errno.EINVAL


@dataclass(frozen=True)
class Lock:
    """One lock request as the kernel sends it: an inclusive range (end OFFSET_MAX: to EOF)."""

    type: int  # READ, WRITE or UNLOCK
    start: int
    end: int
    pid: int = 0  # the caller's process (0 for an unlock, or unknown)

    def check(self) -> None:
        if self.type not in (READ, WRITE, UNLOCK):
            raise InvalidLock(f"unknown lock type {self.type}")
        if not 0 <= self.start <= OFFSET_MAX or not 0 <= self.end <= OFFSET_MAX:
            raise InvalidLock(f"lock range {self.start}-{self.end} beyond 2^63-1")
        if self.end < self.start:
            raise InvalidLock(f"lock range {self.start}-{self.end} ends before it starts")

    @property
    def length(self) -> int:
        """fcntl's l_len: 0 for "to the end of the file"."""
        return 0 if self.end >= OFFSET_MAX else self.end - self.start + 1


@dataclass(frozen=True)
class Range:
    start: int
    end: int  # inclusive; OFFSET_MAX: to EOF
    type: int


def apply(held: Iterable[Range], lock: Lock) -> list[Range]:
    """One owner's ranges after *lock*, merged and split the way the kernel does it."""
    out: list[Range] = []
    for r in held:
        if r.end < lock.start or r.start > lock.end:
            out.append(r)
            continue
        if r.start < lock.start:
            out.append(Range(r.start, lock.start - 1, r.type))
        if r.end > lock.end:
            out.append(Range(lock.end + 1, r.end, r.type))
    if lock.type != UNLOCK:
        out.append(Range(lock.start, lock.end, lock.type))
    out.sort(key=lambda r: r.start)
    merged: list[Range] = []
    for r in out:
        last = merged[-1] if merged else None
        if last is not None and last.type == r.type and last.end + 1 >= r.start:
            merged[-1] = Range(last.start, max(last.end, r.end), r.type)
        else:
            merged.append(r)
    return merged


@dataclass
class Owner:
    """One lock owner on one inode, and the backing open file description carrying its locks."""

    ino: int
    owner: int
    fd: int
    export: Export
    fhs: set[int] = field(default_factory=set)  # handles it came through (closed with the last)
    ranges: list[Range] = field(default_factory=list)  # byte-range (OFD/POSIX) locks held
    flock: int = UNLOCK  # READ/WRITE while it holds a flock
    pid: int = 0
    comm: str = "?"

    def count(self) -> int:
        return len(self.ranges) + (self.flock != UNLOCK)


# -- the wait and its interruption -------------------------------------------------------------

_handler_installed = False


def _noop(signum: int, frame: object) -> None:
    pass


def install_kick_handler() -> bool:
    """Install the no-op KICK_SIGNAL handler (only possible in the main thread)."""
    global _handler_installed
    if not _handler_installed and threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, _noop)
        signal.siginterrupt(KICK_SIGNAL, True)
        _handler_installed = True
    return _handler_installed


class Waiter:
    """A blocking lock call in a worker thread, and the means to end it with EINTR."""

    def __init__(self, kick: bool) -> None:
        self.kick = kick  # False: poll instead (no signal handler)
        self.cancelled = False
        self.done = False
        self._lock = threading.Lock()
        self._thread: int | None = None  # set while the thread is in (or about to enter) the call

    def enter(self) -> bool:
        """In the worker, before the call: False if it was already interrupted."""
        with self._lock:
            if self.cancelled:
                return False
            self._thread = threading.get_ident()
            return True

    def leave(self) -> None:
        with self._lock:
            self._thread = None

    def interrupt(self) -> None:
        """In the trio thread: end the wait (repeat until *done*)."""
        with self._lock:
            self.cancelled = True
            if self.kick and self._thread is not None:
                signal.pthread_kill(self._thread, KICK_SIGNAL)


async def _kick_until_done(waiter: Waiter) -> None:
    while not waiter.done:
        waiter.interrupt()
        await trio.sleep(KICK_INTERVAL)


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fcntl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        libc.fcntl.restype = ctypes.c_int
        libc.flock.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.flock.restype = ctypes.c_int
        _LIBC = libc
    return _LIBC


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


# -- blocking calls, run in worker threads -------------------------------------------------------


def reopen(fd: int, writable: bool) -> int:
    """A new open file description of the file behind *fd* (the same inode, no path lookup).

    Read-write where the backing filesystem allows it, so an owner whose first lock came
    through a read-only handle can still take a write lock through a writable one.
    """
    path = f"/proc/self/fd/{fd}"
    flags = os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    if writable:
        try:
            return os.open(path, flags | os.O_RDWR)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
    return os.open(path, flags | os.O_RDONLY)


def _flock_buf(lock: Lock) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(
        FLOCK_STRUCT.pack(lock.type, os.SEEK_SET, lock.start, lock.length, 0), FLOCK_STRUCT.size
    )


def getlk(fd: int, lock: Lock) -> Lock:
    """F_OFD_GETLK on *fd*: the first conflicting lock, or an UNLOCK if none conflicts."""
    buf = _flock_buf(lock)
    if _libc().fcntl(fd, F_OFD_GETLK, buf) != 0:
        _raise_errno()
    typ, _whence, start, length, pid = FLOCK_STRUCT.unpack(buf.raw)
    if typ == UNLOCK:
        return Lock(UNLOCK, lock.start, lock.end)
    end = OFFSET_MAX if length == 0 else start + length - 1
    return Lock(typ, start, end, max(pid, 0))  # an OFD (or remote) holder has no pid: 0


def setlk(fd: int, lock: Lock, waiter: Waiter | None = None) -> None:
    """F_OFD_SETLK on *fd*, or with *waiter* the blocking F_OFD_SETLKW (EINTR when ended)."""
    buf = _flock_buf(lock)
    libc = _libc()
    if waiter is None:
        if libc.fcntl(fd, F_OFD_SETLK, buf) != 0:
            _raise_errno()
        return
    try:
        _wait(
            waiter,
            lambda: int(libc.fcntl(fd, F_OFD_SETLKW, buf)),
            lambda: int(libc.fcntl(fd, F_OFD_SETLK, buf)),
        )
    finally:
        waiter.done = True


def flock(fd: int, lock: Lock, waiter: Waiter | None = None) -> None:
    """flock(2) on *fd* (READ: shared, WRITE: exclusive, UNLOCK), blocking with *waiter*."""
    op = {READ: fcntl.LOCK_SH, WRITE: fcntl.LOCK_EX, UNLOCK: fcntl.LOCK_UN}[lock.type]
    libc = _libc()
    if waiter is None:
        if libc.flock(fd, op | fcntl.LOCK_NB) != 0:
            _raise_errno()
        return
    try:
        _wait(
            waiter,
            lambda: int(libc.flock(fd, op)),
            lambda: int(libc.flock(fd, op | fcntl.LOCK_NB)),
        )
    finally:
        waiter.done = True


def _wait(waiter: Waiter, blocking: Callable[[], int], trying: Callable[[], int]) -> None:
    """The wait of a blocking lock call: one blocking call ended by the kick, or polling."""
    stop = threading.Event()
    while True:
        if not waiter.enter():
            raise OSError(errno.EINTR, "lock wait interrupted")
        try:
            rc = blocking() if waiter.kick else trying()
            err = ctypes.get_errno() if rc != 0 else 0
        finally:
            waiter.leave()
        if rc == 0:
            return
        if err == errno.EINTR:
            continue  # the kick (checked by enter()) or a stray signal: try again
        if not waiter.kick and err in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            stop.wait(POLL_INTERVAL)
            continue
        raise OSError(err, os.strerror(err))


# -- the table -----------------------------------------------------------------------------------


class LockManager:
    """The locks taken through this daemon: owners, their backing fds, what they hold."""

    def __init__(self, handles: HandleTable) -> None:
        self.handles = handles
        self.owners: dict[tuple[int, int], Owner] = {}
        self._opening: dict[tuple[int, int], trio.Event] = {}
        self._wait_pools: dict[str, workers.ExportWorkers] = {}

    # -- introspection --------------------------------------------------------------------

    def lines(self, ino: int) -> list[str]:
        """``pid:comm type start-end`` for every lock held on inode *ino*, by start offset."""
        out: list[tuple[int, str]] = []
        for o in self.owners.values():
            if o.ino != ino:
                continue
            held = [(r.start, r.end, r.type) for r in o.ranges]
            if o.flock != UNLOCK:
                held.append((0, OFFSET_MAX, o.flock))
            for start, end, typ in held:
                name = "read" if typ == READ else "write"
                stop = "max" if end >= OFFSET_MAX else str(end)
                out.append((start, f"{o.pid}:{o.comm} {name} {start}-{stop}"))
        return [line for _, line in sorted(out)]

    def count(self, export: str) -> int:
        return sum(o.count() for o in self.owners.values() if o.export.name == export)

    # -- requests ---------------------------------------------------------------------------

    async def getlk(self, fh: int, owner: int, lock: Lock) -> Lock:
        """The first lock that would conflict with *lock* for *owner* (UNLOCK type: none)."""
        handle = self.handles.file(fh)
        lock.check()
        if lock.type == UNLOCK:
            raise InvalidLock("F_GETLK of an unlock")
        found = self.owners.get((handle.ino, owner))
        # The handle's own fd carries no lock, so without an owner fd nothing is excluded,
        # which is right: the owner holds nothing here.
        fd = handle.fd if found is None else found.fd
        try:
            res = await workers.run(handle.export, getlk, fd, lock, abandonable=True)
        except OSError as e:
            raise lock_error(e, "F_GETLK") from None
        if res.type != UNLOCK and res.pid == 0:
            res = Lock(res.type, res.start, res.end, self._local_pid(handle.ino, owner, res))
        return res

    def _local_pid(self, ino: int, owner: int, conflict: Lock) -> int:
        """The process behind a conflicting lock held through this daemon (0 if not ours)."""
        for o in self.owners.values():
            if o.ino != ino or o.owner == owner:
                continue
            for r in o.ranges:
                if r.start == conflict.start and r.end == conflict.end and r.type == conflict.type:
                    return o.pid
        return 0

    async def setlk(
        self, fh: int, owner: int, lock: Lock, wait: bool = False, is_flock: bool = False
    ) -> None:
        """Take, change or drop *owner*'s lock through handle *fh* (SETLK, or SETLKW)."""
        handle = self.handles.file(fh)
        lock.check()
        if lock.type == WRITE and not handle.writable:
            raise FusemuxError("write lock on a handle not open for writing", errno.EBADF)
        if lock.type == READ and (handle.flags & os.O_ACCMODE) == os.O_WRONLY:
            raise FusemuxError("read lock on a handle not open for reading", errno.EBADF)
        key = (handle.ino, owner)
        if lock.type == UNLOCK:
            o = self.owners.get(key)
            if o is None:  # never locked anything here: nothing to drop
                await trio.lowlevel.checkpoint()
                return
        else:
            o = await self._owner(handle, owner)
        o.fhs.add(fh)
        call: Callable[..., None] = flock if is_flock else setlk
        what = "flock" if is_flock else "F_OFD_SETLK" + ("W" if wait else "")
        try:
            if wait and lock.type != UNLOCK:
                await self._wait(handle.export, call, o.fd, lock)
            else:
                await workers.run(handle.export, call, o.fd, lock)
        except OSError as e:
            raise lock_error(e, what) from None
        # No checkpoint from here on: the lock is held, the table must say so.
        if is_flock:
            o.flock = lock.type
        else:
            o.ranges = apply(o.ranges, lock)
        if lock.type != UNLOCK and lock.pid and lock.pid != o.pid:
            o.pid, o.comm = hio.opener_of(lock.pid)

    async def _owner(self, handle: Handle, owner: int) -> Owner:
        key = (handle.ino, owner)
        while True:
            found = self.owners.get(key)
            if found is not None:
                found.fhs.add(handle.fh)
                return found
            opening = self._opening.get(key)
            if opening is None:
                break
            await opening.wait()
        event = self._opening[key] = trio.Event()
        try:
            writable = not handle.export.config.read_only
            fd = await workers.run(handle.export, reopen, handle.fd, writable)
            o = Owner(ino=handle.ino, owner=owner, fd=fd, export=handle.export, fhs={handle.fh})
            self.owners[key] = o
            return o
        finally:
            del self._opening[key]
            event.set()

    async def _wait(self, export: Export, call: Callable[..., None], fd: int, lock: Lock) -> None:
        """A blocking lock call in the export's pool for waits; an interrupt ends it (EINTR)."""
        pool = self._wait_pools.get(export.name)
        if pool is None:
            limiter = trio.CapacityLimiter(MAX_WAITS_PER_EXPORT)
            pool = workers.ExportWorkers(f"{export.name}-lockwait", limiter, MAX_WAITS_PER_EXPORT)
            self._wait_pools[export.name] = pool
        waiter = Waiter(kick=install_kick_handler())
        kicking = False

        def on_cancel() -> None:
            nonlocal kicking
            waiter.interrupt()
            if not kicking:
                kicking = True
                trio.lowlevel.spawn_system_task(_kick_until_done, waiter)

        await pool.run(call, fd, lock, waiter, on_cancel=on_cancel)

    async def flush(self, fh: int, owner: int) -> None:
        """A close by *owner* (a process): its POSIX locks on the handle's inode go."""
        handle = self.handles.files.get(fh)
        o = None if handle is None else self.owners.get((handle.ino, owner))
        if handle is None or o is None or not o.ranges:
            return
        try:
            await workers.run(handle.export, setlk, o.fd, Lock(UNLOCK, 0, OFFSET_MAX))
        except OSError as e:
            raise lock_error(e, "unlock at close") from None
        o.ranges = []

    async def release(self, fh: int) -> None:
        """The handle is gone: close the backing fds of owners no other handle uses.

        Closing is what drops their OFD locks and flocks; it is the only place that closes
        an owner's fd (failover must keep that: the fd carries the locks).
        """
        gone = []
        for key, o in self.owners.items():
            if fh in o.fhs:
                o.fhs.discard(fh)
                if not o.fhs:
                    gone.append(key)
        for key in gone:
            o = self.owners.pop(key)
            try:
                await workers.run(o.export, os.close, o.fd)
            except (OSError, FusemuxError) as e:
                log.warning("closing the lock fd of %s failed: %s", o.export.name, e)
