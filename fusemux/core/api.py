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


# Operations a caller's interrupt may cancel: none of them changes anything, and the core
# abandons their backing calls (as at io_timeout) instead of waiting for them. A mount they
# started goes on for everyone else who waits for it (ExportManager): a cancelled caller
# only stops waiting. Everything else runs to its end once it has started.
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
    }
)


def may_interrupt(op: Op | None) -> bool:
    """Whether an engine may cancel a request for *op* when the kernel interrupts it."""
    return op in INTERRUPTIBLE


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
