"""The FUSE kernel protocol as fusemux's own engine speaks it: opcodes, flags, struct layouts.

This module owns the byte layouts of the requests and replies on ``/dev/fuse`` (the kernel's
``include/uapi/linux/fuse.h``, protocol 7.45, little-endian as on every Linux host fusemux
targets) and nothing else: no I/O, no state. Layouts are ``struct`` format strings named after
the kernel structs, with their sizes checked at import.
"""

from __future__ import annotations

import struct
from typing import Final

KERNEL_VERSION: Final = 7
# The protocol minor fusemux implements. The kernel uses min(its own, ours).
KERNEL_MINOR_VERSION: Final = 45
# Passthrough (FUSE_PASSTHROUGH, max_stack_depth in INIT) came with 7.40.
PASSTHROUGH_MINOR: Final = 40

ROOT_ID: Final = 1

# -- opcodes ---------------------------------------------------------------------------------
LOOKUP: Final = 1
FORGET: Final = 2
GETATTR: Final = 3
SETATTR: Final = 4
READLINK: Final = 5
SYMLINK: Final = 6
MKNOD: Final = 8
MKDIR: Final = 9
UNLINK: Final = 10
RMDIR: Final = 11
RENAME: Final = 12
LINK: Final = 13
OPEN: Final = 14
READ: Final = 15
WRITE: Final = 16
STATFS: Final = 17
RELEASE: Final = 18
FSYNC: Final = 20
SETXATTR: Final = 21
GETXATTR: Final = 22
LISTXATTR: Final = 23
REMOVEXATTR: Final = 24
FLUSH: Final = 25
INIT: Final = 26
OPENDIR: Final = 27
READDIR: Final = 28
RELEASEDIR: Final = 29
FSYNCDIR: Final = 30
GETLK: Final = 31
SETLK: Final = 32
SETLKW: Final = 33
ACCESS: Final = 34
CREATE: Final = 35
INTERRUPT: Final = 36
BMAP: Final = 37
DESTROY: Final = 38
IOCTL: Final = 39
POLL: Final = 40
NOTIFY_REPLY: Final = 41
BATCH_FORGET: Final = 42
FALLOCATE: Final = 43
READDIRPLUS: Final = 44
RENAME2: Final = 45
LSEEK: Final = 46
COPY_FILE_RANGE: Final = 47
SETUPMAPPING: Final = 48
REMOVEMAPPING: Final = 49
SYNCFS: Final = 50
TMPFILE: Final = 51
STATX: Final = 52

OPCODE_NAMES: Final = {
    value: name
    for name, value in globals().items()
    if name.isupper()
    and isinstance(value, int)
    and 1 <= value <= 52
    and name not in {"KERNEL_VERSION", "KERNEL_MINOR_VERSION", "PASSTHROUGH_MINOR", "ROOT_ID"}
}

# -- INIT flags (flags: bits 0-31; flags2: bits 32-63, only with FUSE_INIT_EXT) ----------------
ASYNC_READ: Final = 1 << 0
POSIX_LOCKS: Final = 1 << 1
ATOMIC_O_TRUNC: Final = 1 << 3
BIG_WRITES: Final = 1 << 5
FLOCK_LOCKS: Final = 1 << 10
AUTO_INVAL_DATA: Final = 1 << 12
DO_READDIRPLUS: Final = 1 << 13
ASYNC_DIO: Final = 1 << 15
WRITEBACK_CACHE: Final = 1 << 16
PARALLEL_DIROPS: Final = 1 << 18
MAX_PAGES: Final = 1 << 22
HANDLE_KILLPRIV_V2: Final = 1 << 28
SETXATTR_EXT: Final = 1 << 29
INIT_EXT: Final = 1 << 30
PASSTHROUGH: Final = 1 << 37

INIT_FLAG_NAMES: Final = {
    ASYNC_READ: "ASYNC_READ",
    POSIX_LOCKS: "POSIX_LOCKS",
    FLOCK_LOCKS: "FLOCK_LOCKS",
    ATOMIC_O_TRUNC: "ATOMIC_O_TRUNC",
    BIG_WRITES: "BIG_WRITES",
    AUTO_INVAL_DATA: "AUTO_INVAL_DATA",
    DO_READDIRPLUS: "DO_READDIRPLUS",
    ASYNC_DIO: "ASYNC_DIO",
    PARALLEL_DIROPS: "PARALLEL_DIROPS",
    MAX_PAGES: "MAX_PAGES",
    HANDLE_KILLPRIV_V2: "HANDLE_KILLPRIV_V2",
    INIT_EXT: "INIT_EXT",
    PASSTHROUGH: "PASSTHROUGH",
}

# -- per-request flags -------------------------------------------------------------------------
FATTR_MODE: Final = 1 << 0
FATTR_UID: Final = 1 << 1
FATTR_GID: Final = 1 << 2
FATTR_SIZE: Final = 1 << 3
FATTR_ATIME: Final = 1 << 4
FATTR_MTIME: Final = 1 << 5
FATTR_FH: Final = 1 << 6
FATTR_ATIME_NOW: Final = 1 << 7
FATTR_MTIME_NOW: Final = 1 << 8
FATTR_KILL_SUIDGID: Final = 1 << 11

FOPEN_DIRECT_IO: Final = 1 << 0
FOPEN_KEEP_CACHE: Final = 1 << 1
FOPEN_PASSTHROUGH: Final = 1 << 7

OPEN_KILL_SUIDGID: Final = 1 << 0  # fuse_open_in.open_flags
WRITE_KILL_SUIDGID: Final = 1 << 2  # fuse_write_in.write_flags
GETATTR_FH: Final = 1 << 0
FSYNC_FDATASYNC: Final = 1 << 0
LK_FLOCK: Final = 1 << 0  # fuse_lk_in.lk_flags: a flock(2), not a byte-range lock
RELEASE_FLOCK_UNLOCK: Final = 1 << 1  # fuse_release_in.release_flags

# -- /dev/fuse ioctls (FUSE_DEV_IOC_MAGIC 229) -------------------------------------------------
# _IOW(229, 1, struct fuse_backing_map) and _IOW(229, 2, uint32_t)
DEV_IOC_BACKING_OPEN: Final = (1 << 30) | (16 << 16) | (229 << 8) | 1
DEV_IOC_BACKING_CLOSE: Final = (1 << 30) | (4 << 16) | (229 << 8) | 2

# Deepest filesystem stacking the kernel allows (FILESYSTEM_MAX_STACK_DEPTH).
MAX_STACK_DEPTH: Final = 2
# FUSE_MIN_READ_BUFFER: a /dev/fuse read buffer must hold at least this much.
MIN_READ_BUFFER: Final = 8192

# -- struct layouts -----------------------------------------------------------------------------
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (+ flags2 with INIT_EXT)
INIT_IN_FLAGS2 = struct.Struct("<I")
# major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2 max_stack_depth request_timeout unused[11]
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsecs
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
# valid padding fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec mode
# unused4 uid gid unused5
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("<QIIQ")  # fh unused padding lock_owner
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("<II")
KSTATFS = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize
FSYNC_IN = struct.Struct("<QII")  # fh fsync_flags padding
SETXATTR_IN = struct.Struct("<II")  # size flags
GETXATTR_IN = struct.Struct("<II")  # size padding
GETXATTR_OUT = struct.Struct("<II")  # size padding
ACCESS_IN = struct.Struct("<II")  # mask padding
INTERRUPT_IN = struct.Struct("<Q")  # unique
FORGET_IN = struct.Struct("<Q")  # nlookup
BATCH_FORGET_IN = struct.Struct("<II")  # count dummy
FORGET_ONE = struct.Struct("<QQ")  # nodeid nlookup
FALLOCATE_IN = struct.Struct("<QQQII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("<QQII")  # fh offset whence padding
LSEEK_OUT = struct.Struct("<Q")
DIRENT_HEAD = struct.Struct("<QQII")  # ino off namelen type
BACKING_MAP = struct.Struct("<iIQ")  # fd flags padding
BACKING_ID = struct.Struct("<I")
# fh owner lk.start lk.end lk.type lk.pid lk_flags padding
LK_IN = struct.Struct("<QQQQIIII")
LK_OUT = struct.Struct("<QQII")  # lk.start lk.end lk.type lk.pid

_SIZES = {
    IN_HEADER: 40,
    OUT_HEADER: 16,
    INIT_OUT: 64,
    ATTR: 88,
    ENTRY_OUT_HEAD: 40,
    ATTR_OUT_HEAD: 16,
    SETATTR_IN: 88,
    OPEN_OUT: 16,
    RELEASE_IN: 24,
    READ_IN: 40,
    WRITE_IN: 40,
    KSTATFS: 80,
    FALLOCATE_IN: 32,
    LSEEK_IN: 24,
    DIRENT_HEAD: 24,
    BACKING_MAP: 16,
    LK_IN: 48,
    LK_OUT: 24,
}
for _layout, _size in _SIZES.items():
    assert _layout.size == _size, (_layout.format, _layout.size, _size)


def flag_names(flags: int) -> list[str]:
    """The names of the INIT flags set in *flags* that fusemux knows."""
    return [name for bit, name in INIT_FLAG_NAMES.items() if flags & bit]


def split_name(data: bytes | memoryview) -> bytes:
    """A NUL-terminated name from a request payload (without the NUL)."""
    raw = bytes(data)
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]
