"""The wire format of the own engine's replies: entries, attributes, directory entries.

This module owns the encoding of the core's engine-neutral results
(:mod:`fusemux.core.api`) into FUSE reply payloads (:mod:`fusemux.engines.fuse_abi`), and
the :class:`Request` a reader hands to a handler. Pure functions over values: no state, no
I/O, safe from any thread.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from fusemux.core.api import Attr, Ctx, DirEntry
from fusemux.engines import fuse_abi as abi
from fusemux.errors import FusemuxError


@dataclass
class Request:
    opcode: int
    unique: int
    nodeid: int
    ctx: Ctx
    body: bytes  # the request after its header


def valid(timeout: float) -> tuple[int, int]:
    sec = int(timeout)
    return sec, int((timeout - sec) * 1e9)


def attr(a: Attr) -> bytes:
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


def entry(a: Attr) -> bytes:
    sec, nsec = valid(a.timeout)
    return abi.ENTRY_OUT_HEAD.pack(a.ino, 0, sec, sec, nsec, nsec) + attr(a)


def attr_out(a: Attr) -> bytes:
    sec, nsec = valid(a.timeout)
    return abi.ATTR_OUT_HEAD.pack(sec, nsec, 0) + attr(a)


def dirent(e: DirEntry, plus: bool) -> bytes:
    """One READDIR entry, or with *plus* one READDIRPLUS entry (the entry reply in front)."""
    name = os.fsencode(e.name)
    head = abi.DIRENT_HEAD.pack(
        e.attr.ino, e.next_offset, len(name), stat.S_IFMT(e.attr.mode) >> 12
    )
    raw = head + name
    raw += b"\0" * (-len(raw) % 8)
    return (entry(e.attr) + raw) if plus else raw


def sized(value: bytes, size: int) -> bytes:
    """getxattr/listxattr: the length when asked with size 0, ERANGE if it does not fit."""
    if size == 0:
        return abi.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise FusemuxError("value larger than the caller's buffer", errno.ERANGE)
    return value
