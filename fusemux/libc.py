"""The C library calls Python's ``os`` lacks, loaded once for the whole daemon.

This module owns the one ``ctypes.CDLL`` of libc and a typed wrapper per call: ``mount(2)``
(the own engine mounts ``/dev/fuse``), ``umount2(2)`` (never resolves a path in userspace,
so it is safe on a stale FUSE mount), ``fallocate(2)`` and ``prctl(2)``. Each wrapper raises
``OSError`` with the call's errno.

Concurrency: the library is loaded on first use under a lock; ctypes calls release the GIL,
so these may run in worker threads (fallocate does) as well as on the event loop.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                lib = ctypes.CDLL(None, use_errno=True)
                lib.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
                lib.mount.restype = ctypes.c_int
                lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
                lib.umount2.restype = ctypes.c_int
                lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
                lib.fallocate.restype = ctypes.c_int
                lib.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
                lib.prctl.restype = ctypes.c_int
                _lib = lib
    return _lib


def _check(res: int, path: str | Path | None = None) -> None:
    if res != 0:
        err = ctypes.get_errno()
        if path is None:
            raise OSError(err, os.strerror(err))
        raise OSError(err, os.strerror(err), str(path))


def mount(source: str, target: str | Path, fstype: str, flags: int, data: str) -> None:
    """mount(2)."""
    lib = _libc()
    _check(
        lib.mount(source.encode(), os.fsencode(target), fstype.encode(), flags, data.encode()),
        target,
    )


def umount2(path: str | Path, flags: int) -> None:
    """umount2(2) without resolving the path in userspace (safe on stale FUSE mounts)."""
    _check(_libc().umount2(os.fsencode(path), flags), path)


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    """fallocate(2) (punch-hole, zero-range, preallocate)."""
    _check(_libc().fallocate(fd, mode, off, length))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> None:
    """prctl(2)."""
    _check(_libc().prctl(option, arg2, arg3, arg4, arg5))
