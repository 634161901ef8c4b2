"""The engine-facing API of the core: the request and reply types both engines use, the
policy of which operations an interrupt may cancel, and the engine statistics the core reads.

An engine converts a kernel request into one call on :class:`fusemux.core.fs.FileSystem`
with these types, and the result back. Everything here is a plain value (frozen
dataclasses, enums); nothing blocks, and nothing is shared between threads.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

BLOCK = 4096


@dataclass(frozen=True)
class Ctx:
    """Who sent a request (engines fill it from the kernel's request header)."""

    pid: int = 0
    uid: int = 0
    gid: int = 0


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
class SetAttr:
    """The attribute changes of a setattr request; None means unchanged."""

    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    # The kernel asks (FUSE_HANDLE_KILLPRIV_V2) to clear set-user-ID and set-group-ID as a
    # truncate by an unprivileged caller would.
    kill_suidgid: bool = False


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


class Op(enum.StrEnum):
    """The core's operations, as an engine names them when it asks a policy question."""

    LOOKUP = "lookup"
    GETATTR = "getattr"
    SETATTR = "setattr"
    OPEN = "open"
    READ = "read"
    WRITE = "write"
    STATFS = "statfs"
    RELEASE = "release"
    FSYNC = "fsync"
    FLUSH = "flush"
    FALLOCATE = "fallocate"
    LSEEK = "lseek"
    ACCESS = "access"
    GETXATTR = "getxattr"
    LISTXATTR = "listxattr"
    SETXATTR = "setxattr"
    REMOVEXATTR = "removexattr"
    OPENDIR = "opendir"
    READDIR = "readdir"
    RELEASEDIR = "releasedir"
    GETLK = "getlk"
    SETLK = "setlk"
    SETLKW = "setlkw"


class Interrupt(enum.Enum):
    """What an engine does when the kernel interrupts a request (FUSE INTERRUPT)."""

    NEVER = "never"  # the request runs to its end
    IF_DYING = "if_dying"  # cancelled once its caller has a fatal signal pending
    NOW = "now"  # cancelled at once, answered EINTR


# The kernel sends INTERRUPT for *any* signal its caller gets while a request is in flight,
# also one with a handler that would have restarted the system call natively (qemu and
# qemu-io get such signals). Answering EINTR to those made qemu fail
# ('Failed to get "consistent read" lock: Interrupted system call'), and an EINTR from a read
# or an fsync is an I/O error to a guest: natively, reads, fsync and lseek on a regular file
# never fail with EINTR, and NFS waits are only killable. So the side-effect-free operations
# below are cancelled only when their caller is dying (SIGKILL pending): a killed qemu stuck
# on a hung export can then exit (a killed process waits uninterruptibly for an answer to a
# request it has sent), while a healthy caller's signal changes nothing. Their backing calls
# are abandoned, as at io_timeout, and a mount they waited for goes on for the others.
INTERRUPTIBLE: frozenset[Op] = frozenset(
    {
        Op.LOOKUP,
        Op.GETATTR,
        Op.READ,
        Op.STATFS,
        Op.GETXATTR,
        Op.LISTXATTR,
        Op.READDIR,
        Op.ACCESS,
        Op.LSEEK,
        Op.FSYNC,
        Op.GETLK,
    }
)
# A blocking lock wait ends with EINTR on any signal, as fcntl(F_SETLKW) does natively
# (fusemux.core.locks wakes the waiting thread and keeps the call's real outcome).
INTERRUPT_AT_ONCE: frozenset[Op] = frozenset({Op.SETLKW})


def interrupt_policy(op: Op | None) -> Interrupt:
    """The core's answer to "the kernel interrupted a request for *op*: may I cancel it?"."""
    if op in INTERRUPT_AT_ONCE:
        return Interrupt.NOW
    if op in INTERRUPTIBLE:
        return Interrupt.IF_DYING
    return Interrupt.NEVER


def may_interrupt(op: Op | None) -> bool:
    """Whether a request for *op* may be cancelled at all when the kernel interrupts it."""
    return interrupt_policy(op) is not Interrupt.NEVER


_SIGKILL_BIT = 1 << (9 - 1)


def caller_dying(tid: int) -> bool:
    """Whether thread *tid* (a FUSE request's pid) has SIGKILL pending or is gone.

    Read from ``/proc/<tid>/status`` (``SigPnd``, ``ShdPnd``): procfs answers from memory,
    so this never blocks on a backing filesystem.
    """
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return True  # gone: nobody waits for the answer any more
    for line in text.splitlines():
        if line.startswith((b"SigPnd:", b"ShdPnd:")) and int(line.split()[1], 16) & _SIGKILL_BIT:
            return True
    return False


@dataclass(frozen=True)
class EngineStatistics:
    """What an engine reports about itself (``user.fusemux.engine_stats``), in the manner
    of trio's ``statistics()``: a snapshot, taken on the event loop."""

    passthrough: bool
    requests: Mapping[str, int]
    protocol: str = ""
    flags: tuple[str, ...] = ()
    max_write: int = 0
    max_stack_depth: int = 0
    backing_registered: int = 0
    nodes_looked_up: int = 0

    def as_json(self) -> str:
        """The ``engine_stats`` xattr: this snapshot as one JSON object."""
        data: dict[str, object] = {
            "passthrough": self.passthrough,
            "requests": dict(sorted(self.requests.items())),
        }
        if self.protocol:
            data.update(
                protocol=self.protocol,
                flags=list(self.flags),
                max_write=self.max_write,
                max_stack_depth=self.max_stack_depth,
                backing_registered=self.backing_registered,
                nodes_looked_up=self.nodes_looked_up,
            )
        return json.dumps(data, sort_keys=True)


class Engine(Protocol):
    """What the core knows of the engine serving it."""

    name: str

    def statistics(self) -> EngineStatistics: ...
