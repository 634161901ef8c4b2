"""Open handles: backing file descriptors, who opened them, and the blocking I/O on them.

This module owns the table of open file and directory handles and the synchronous syscalls
that run in worker threads (never on the event loop; :mod:`fusemux.core.fs` calls them in the
export's own threads, :mod:`fusemux.core.workers`, under the export's limiter).

``O_DIRECT``: an ``O_DIRECT`` open gets a backing fd opened with ``O_DIRECT`` too, so the
page cache is bypassed end to end. The kernel hands fusemux data in ordinary (unaligned)
Python ``bytes``; for the ``O_DIRECT`` fd they are copied into (or read from) a page-aligned
anonymous ``mmap`` buffer. Requests whose offset or length the backing filesystem refuses for
``O_DIRECT`` (``EINVAL``: not aligned to its logical block size) are served through a second,
buffered fd on the same file; writes there are made durable with ``fdatasync`` and their pages
dropped with ``posix_fadvise(DONTNEED)``, so they do not linger in the page cache either.

The aligned buffer is reused: each worker thread keeps one (``threading.local``, grown to the
largest request it has served, at most a FUSE request of 1 MiB in practice), so an
``O_DIRECT`` request costs no ``mmap``/``munmap`` and no page faults. It goes away with its
thread (:mod:`fusemux.core.workers` ends idle threads).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fusemux import libc
from fusemux.core.api import SetAttr
from fusemux.core.exports import Export
from fusemux.errors import BadHandle, NotFound

_PAGE = mmap.PAGESIZE
# Flags an application's open may carry that fusemux forwards to the backing open. O_TRUNC
# arrives here because libfuse negotiates atomic O_TRUNC: the kernel sends no separate
# truncate for it.
_FORWARDED_FLAGS = os.O_ACCMODE | os.O_DIRECT | os.O_SYNC | os.O_DSYNC | os.O_NOATIME | os.O_TRUNC
_BACKING_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW


@dataclass
class Handle:
    """One open file handle on a volume."""

    fh: int
    ino: int
    export: Export
    name: str
    path: Path
    fd: int
    flags: int
    direct: bool
    opener_pid: int
    opener_comm: str
    buffered_fd: int | None = None
    # Written to since the last flush: a flush of a handle that wrote nothing has no
    # write-back error to report and skips its syscalls.
    dirty: bool = False

    @property
    def writable(self) -> bool:
        return (self.flags & os.O_ACCMODE) != os.O_RDONLY


@dataclass
class DirHandle:
    fh: int
    ino: int
    export: Export | None
    entries: list[tuple[str, int]] | None = None  # (name, ino) snapshot, in inode order
    stats: dict[str, os.stat_result] = field(default_factory=dict)


class HandleTable:
    """fh -> handle, for files and directories. fh numbers are never reused."""

    def __init__(self) -> None:
        self.files: dict[int, Handle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._next = 1

    def next_fh(self) -> int:
        fh = self._next
        self._next += 1
        return fh

    def file(self, fh: int) -> Handle:
        try:
            return self.files[fh]
        except KeyError:
            raise BadHandle(f"unknown file handle {fh}") from None

    def dir(self, fh: int) -> DirHandle:
        try:
            return self.dirs[fh]
        except KeyError:
            raise BadHandle(f"unknown directory handle {fh}") from None

    def for_inode(self, ino: int) -> list[Handle]:
        return [h for h in self.files.values() if h.ino == ino]

    def for_export(self, export: str) -> list[Handle]:
        return [h for h in self.files.values() if h.export.name == export]


# -- blocking helpers, run in worker threads ---------------------------------------------


def open_backing(path: Path, flags: int) -> tuple[int, bool]:
    """Open a backing volume file; returns (fd, direct). Refuses anything but a regular file.

    O_NOFOLLOW refuses symlinks; O_NONBLOCK keeps a FIFO planted on the storage side from
    blocking the worker thread before the type check (it is cleared again afterwards).
    """
    want = (flags & _FORWARDED_FLAGS) | _BACKING_FLAGS | os.O_NONBLOCK
    direct = bool(want & os.O_DIRECT)
    try:
        fd = _open_regular(path, want)
    except OSError as e:
        if e.errno != errno.EINVAL or not direct:
            raise
        # The backing filesystem has no O_DIRECT: fall back to buffered I/O.
        fd = _open_regular(path, want & ~os.O_DIRECT)
        direct = False
    os.set_blocking(fd, True)
    return fd, direct


def _open_regular(path: Path, flags: int) -> int:
    """os.open that only ever returns an fd on a regular file (never follows a symlink)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotFound(f"{path.name} is not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotFound(f"{path.name} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def setattr_backing(path: Path, change: SetAttr, fd: int | None) -> None:
    """Apply a setattr to a backing file through fds opened without following symlinks.

    *fd* is the writable backing fd of the handle the request came with, if any.
    """
    own = _open_regular(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if change.size is not None:
            if fd is not None:
                os.ftruncate(fd, change.size)
            else:
                wfd = _open_regular(path, os.O_WRONLY | os.O_NONBLOCK)
                try:
                    os.ftruncate(wfd, change.size)
                finally:
                    os.close(wfd)
        if change.mode is not None:
            os.fchmod(own, stat.S_IMODE(change.mode))
        if change.uid is not None or change.gid is not None:
            uid = -1 if change.uid is None else change.uid
            gid = -1 if change.gid is None else change.gid
            os.fchown(own, uid, gid)
        if change.kill_suidgid and change.mode is None:
            kill_suidgid(own)
        if change.atime_ns is not None or change.mtime_ns is not None:
            st = os.fstat(own)
            atime = st.st_atime_ns if change.atime_ns is None else change.atime_ns
            mtime = st.st_mtime_ns if change.mtime_ns is None else change.mtime_ns
            os.utime(own, ns=(atime, mtime))
    finally:
        os.close(own)


def kill_suidgid(fd: int) -> None:
    """Clear set-user-ID, and set-group-ID where group execute is set (as the kernel does for
    an unprivileged write or truncate). One fstat; an fchmod only when a bit is set."""
    mode = os.fstat(fd).st_mode
    kill = stat.S_ISUID if mode & stat.S_ISUID else 0
    if mode & stat.S_ISGID and mode & stat.S_IXGRP:
        kill |= stat.S_ISGID
    if kill:
        os.fchmod(fd, stat.S_IMODE(mode) & ~kill)


def fallocate(handle: Handle, mode: int, off: int, length: int) -> None:
    """fallocate(2) on the backing fd (punch-hole, zero-range, preallocate)."""
    libc.fallocate(handle.fd, mode, off, length)


def lseek(handle: Handle, off: int, whence: int) -> int:
    """lseek(2) on the backing fd: SEEK_DATA/SEEK_HOLE find the image's allocated extents.

    The handle's fd offset is never used for I/O (reads and writes are positional), so moving
    it is harmless.
    """
    return os.lseek(handle.fd, off, whence)


def _aligned(n: int) -> int:
    return max(_PAGE, (n + _PAGE - 1) // _PAGE * _PAGE)


_local = threading.local()


def _thread_buffer(size: int) -> mmap.mmap:
    """This thread's page-aligned buffer, at least *size* bytes rounded up to whole pages."""
    need = _aligned(size)
    buf: mmap.mmap | None = getattr(_local, "buf", None)
    if buf is None or len(buf) < need:
        if buf is not None:
            buf.close()
        buf = _local.buf = mmap.mmap(-1, need)
    return buf


def _buffered_fd(handle: Handle) -> int:
    if handle.buffered_fd is None:
        flags = (handle.flags & (os.O_ACCMODE | os.O_NOATIME)) | _BACKING_FLAGS | os.O_NONBLOCK
        fd = _open_regular(handle.path, flags)
        os.set_blocking(fd, True)
        handle.buffered_fd = fd
    return handle.buffered_fd


def read(handle: Handle, off: int, size: int) -> bytes:
    if not handle.direct:
        return os.pread(handle.fd, size, off)
    buf = _thread_buffer(size)
    with memoryview(buf) as view, view[: _aligned(size)] as part:
        try:
            n = os.preadv(handle.fd, [part], off)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            n = -1
    if n >= 0:
        return buf[: min(n, size)]
    # Offset not aligned for this filesystem's O_DIRECT: read through the buffered fd.
    return os.pread(_buffered_fd(handle), size, off)


def write(handle: Handle, off: int, data: bytes, kill_privs: bool = False) -> int:
    if kill_privs:
        kill_suidgid(handle.fd)
    if not handle.direct:
        return os.pwrite(handle.fd, data, off)
    size = len(data)
    if size % 512 == 0 and off % 512 == 0:
        buf = _thread_buffer(size)
        buf[:size] = data
        with memoryview(buf) as view, view[:size] as part:
            try:
                return os.pwritev(handle.fd, [part], off)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
    # Not aligned for this filesystem: buffered write, made durable and evicted.
    fd = _buffered_fd(handle)
    n = os.pwrite(fd, data, off)
    os.fdatasync(fd)
    os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
    return n


def flush(handle: Handle) -> None:
    """close(dup(fd)): lets network filesystems report write-back errors at close()."""
    for fd in (handle.fd, handle.buffered_fd):
        if fd is not None:
            os.close(os.dup(fd))


def fsync(handle: Handle, datasync: bool) -> None:
    sync = os.fdatasync if datasync else os.fsync
    for fd in (handle.fd, handle.buffered_fd):
        if fd is not None:
            sync(fd)


def close(handle: Handle) -> None:
    fds = [fd for fd in (handle.fd, handle.buffered_fd) if fd is not None]
    handle.buffered_fd = None
    first: OSError | None = None
    for fd in fds:
        try:
            os.close(fd)
        except OSError as e:
            first = first or e
    if first is not None:
        raise first


def _read_proc(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def opener_of(tid: int) -> tuple[int, str]:
    """(process id, comm) of the thread *tid* that sent a request (ctx.pid is a thread id).

    Raw ``os.read`` of procfs (no text-mode file objects): this runs on every open.
    """
    try:
        status = _read_proc(f"/proc/{tid}/status")
        start = status.index(b"\nTgid:") + 6
        pid = int(status[start : status.index(b"\n", start)])
    except (OSError, ValueError):
        return tid, "?"
    try:
        comm = _read_proc(f"/proc/{pid}/comm").decode("utf-8", "replace").strip()
    except OSError:
        comm = "?"
    return pid, comm.replace(",", "_").replace(":", "_") or "?"
