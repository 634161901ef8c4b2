"""The own engine's request handlers: each FUSE request becomes one call on the core.

This module owns the translation of request payloads (:mod:`fusemux.engines.fuse_abi`) into
calls on :class:`fusemux.core.fs.FileSystem` and of their results into reply payloads
(:mod:`fusemux.engines.kernel.wire`), plus the engine's part of an open: asking the
connection's :class:`~fusemux.engines.kernel.backing.BackingRegistry` for a passthrough
registration, and choosing the open flags. Policy (what may be cancelled, which errno) is
the core's; a handler returns the reply payload, or raises and the session answers the
errno (:func:`fusemux.errors.reply_errno`).

Concurrency: every handler runs as a trio task of the session's nursery, on the event loop.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from fusemux.core import locks
from fusemux.core.api import SetAttr
from fusemux.core.fs import FileSystem
from fusemux.engines import fuse_abi as abi
from fusemux.engines.kernel import wire
from fusemux.engines.kernel.backing import BackingRegistry
from fusemux.engines.kernel.wire import Request

Handler = Callable[[Request], Awaitable[bytes | list[bytes] | None]]


def _when(valid: int, given: int, to_now: int, now: int, sec: int, nsec: int) -> int | None:
    """A SETATTR time in ns: now (``*_NOW``), the one given, or None (unchanged)."""
    if valid & to_now:
        return now
    return sec * 1_000_000_000 + nsec if valid & given else None


class Connection(Protocol):
    """What the handlers need of the session that serves the connection."""

    fs: FileSystem
    passthrough: bool  # negotiated with the kernel
    backing: BackingRegistry
    stats: Counter[str]

    def looked_up(self, ino: int) -> None: ...

    def write_reply(self, unique: int, error: int, parts: list[bytes]) -> bool: ...


class Ops:
    """The handlers of one connection, by opcode (:attr:`handlers`)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.fs = conn.fs
        self.handlers: dict[int, Handler] = {
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
            abi.GETLK: self._getlk,
            abi.SETLK: self._setlk,
            abi.SETLKW: self._setlk,
        }

    async def _lookup(self, req: Request) -> bytes:
        name = os.fsdecode(abi.split_name(req.body))
        attr = await self.fs.lookup(req.nodeid, name, req.ctx)
        self.conn.looked_up(attr.ino)  # counted now: a reply write cannot fail after this
        return wire.entry(attr)

    async def _getattr(self, req: Request) -> bytes:
        return wire.attr_out(await self.fs.getattr(req.nodeid, req.ctx))

    async def _setattr(self, req: Request) -> bytes:
        (valid, _, fh, size, _lo, atime, mtime, _ct, atimens, mtimens, _ctn, mode, _u4, uid,
         gid, _u5) = abi.SETATTR_IN.unpack_from(req.body)  # fmt: skip
        now = time.time_ns()
        change = SetAttr(
            size=size if valid & abi.FATTR_SIZE else None,
            atime_ns=_when(valid, abi.FATTR_ATIME, abi.FATTR_ATIME_NOW, now, atime, atimens),
            mtime_ns=_when(valid, abi.FATTR_MTIME, abi.FATTR_MTIME_NOW, now, mtime, mtimens),
            mode=mode if valid & abi.FATTR_MODE else None,
            uid=uid if valid & abi.FATTR_UID else None,
            gid=gid if valid & abi.FATTR_GID else None,
            kill_suidgid=bool(valid & abi.FATTR_KILL_SUIDGID),
        )
        handle = fh if valid & abi.FATTR_FH else None
        return wire.attr_out(await self.fs.setattr(req.nodeid, change, handle, req.ctx))

    async def _open(self, req: Request) -> None:
        flags, open_flags = abi.OPEN_IN.unpack_from(req.body)
        # Passthrough writes never reach fusemux, and under HANDLE_KILLPRIV_V2 the kernel
        # leaves clearing set-ID bits to the server, so an unprivileged writer gets them
        # cleared at open (stricter than at the first write, never looser).
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY
        kill = bool(open_flags & abi.OPEN_KILL_SUIDGID) or (
            self.conn.passthrough and writing and req.ctx.uid != 0
        )
        reply = await self.fs.open(req.nodeid, flags, req.ctx, kill_suidgid=kill)
        backing_id = 0
        if self.conn.passthrough:
            backing_id = self.conn.backing.register(req.nodeid, reply.fh, reply.backing_fd)
        if backing_id:
            fopen = abi.FOPEN_PASSTHROUGH
            self.conn.stats["open_passthrough"] += 1
        elif self.conn.passthrough:
            # Served here; direct I/O keeps the inode out of the cached mode the kernel
            # would refuse later passthrough opens of the same inode in.
            fopen = abi.FOPEN_DIRECT_IO
            self.conn.stats["open_fallback"] += 1
        else:
            fopen = (abi.FOPEN_DIRECT_IO if reply.direct_io else 0) | (
                abi.FOPEN_KEEP_CACHE if reply.keep_cache else 0
            )
            self.conn.stats["open_fallback"] += 1
        out = abi.OPEN_OUT.pack(reply.fh, fopen, backing_id)
        if not self.conn.write_reply(req.unique, 0, [out]):
            # The kernel gave up on this open: nobody will ever release the handle.
            await self._drop_open(reply.fh)

    async def _drop_open(self, fh: int) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.conn.backing.unregister(fh)
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
                await self.conn.backing.unregister(fh)
            finally:
                await self.fs.release(fh)
        return b""

    async def _flush(self, req: Request) -> bytes:
        fh, _unused, _pad, lock_owner = abi.FLUSH_IN.unpack_from(req.body)
        await self.fs.locks.flush(fh, lock_owner)  # a close drops the closer's POSIX locks
        await self.fs.flush(fh, written_elsewhere=self.conn.backing.passes_through(fh))
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

    async def _getlk(self, req: Request) -> bytes:
        fh, owner, start, end, typ, pid, _flags, _ = abi.LK_IN.unpack_from(req.body)
        found = await self.fs.locks.getlk(fh, owner, locks.Lock(typ, start, end, pid))
        return abi.LK_OUT.pack(found.start, found.end, found.type, found.pid)

    async def _setlk(self, req: Request) -> bytes:
        fh, owner, start, end, typ, pid, lk_flags, _ = abi.LK_IN.unpack_from(req.body)
        # flock arrives as a whole-file lock with LK_FLOCK; its owner is the open file, as
        # for OFD locks. RELEASE needs no flag handling: closing the owner's fd drops both.
        await self.fs.locks.setlk(
            fh,
            owner,
            locks.Lock(typ, start, end, pid),
            wait=req.opcode == abi.SETLKW,
            is_flock=bool(lk_flags & abi.LK_FLOCK),
        )
        return b""

    async def _access(self, req: Request) -> bytes:
        mask, _ = abi.ACCESS_IN.unpack_from(req.body)
        await self.fs.access(req.nodeid, mask, req.ctx)
        return b""

    async def _getxattr(self, req: Request) -> bytes:
        size, _ = abi.GETXATTR_IN.unpack_from(req.body)
        name = os.fsdecode(abi.split_name(req.body[abi.GETXATTR_IN.size :]))
        if name.startswith("security."):  # the kernel's capability probe, if it probes
            self.conn.stats["GETXATTR_security"] += 1
        value = await self.fs.getxattr(req.nodeid, name, req.ctx)
        return wire.sized(value, size)

    async def _listxattr(self, req: Request) -> bytes:
        size, _ = abi.GETXATTR_IN.unpack_from(req.body)
        names = await self.fs.listxattr(req.nodeid, req.ctx)
        return wire.sized(b"".join(os.fsencode(n) + b"\0" for n in names), size)

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
                raw = wire.dirent(entry, plus)
                if used + len(raw) > size:
                    return parts
                parts.append(raw)
                used += len(raw)
                offset = entry.next_offset
                if plus and entry.name not in (".", ".."):  # the kernel skips those two
                    self.conn.looked_up(entry.attr.ino)
        return parts

    async def _releasedir(self, req: Request) -> bytes:
        fh, *_ = abi.RELEASE_IN.unpack_from(req.body)
        with trio.CancelScope(shield=True):
            await self.fs.releasedir(fh)
        return b""
