"""Bench column D: the bare pyfuse3 passthrough, "the best a pyfuse3 passthrough can do".

This script owns nothing of fusemux. It serves the regular files at the top level of one
directory as ``<mountpoint>/<name>``, with the same knobs as fusemux's pyfuse3 engine (FUSE
options, ``direct_io``/``keep_cache`` policy, ``max_tasks``, page-aligned reused buffers for
``O_DIRECT`` backing fds) but with every syscall inline on the trio thread: no namespace, no
export mounts, no holders, no worker threads. The gap between it and fusemux is what the
multiplexing and the isolation of exports cost.

Run: ``python tests/bench/passthrough.py SRC MNT [--direct-io odirect|always]``. SIGTERM or
SIGINT unmounts and exits 0.
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import signal
import stat
import sys
from collections.abc import Sequence

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
FORWARDED = os.O_ACCMODE | os.O_DIRECT | os.O_SYNC | os.O_DSYNC | os.O_NOATIME | os.O_TRUNC


class Passthrough(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, src: str, direct_io_always: bool) -> None:
        super().__init__()
        self.src = src
        self.direct_io_always = direct_io_always
        self.names: dict[int, str] = {}  # inode -> name
        self.inodes: dict[str, int] = {}
        self.fds: dict[int, tuple[int, bool]] = {}  # fh -> (fd, O_DIRECT)
        self.next_fh = 1
        self.buf = mmap.mmap(-1, 1 << 20)  # aligned, reused: one request at a time (inline)

    def _ino(self, name: str) -> int:
        if name not in self.inodes:
            ino = len(self.inodes) + 2
            self.inodes[name], self.names[ino] = ino, name
        return self.inodes[name]

    def _entry(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.InodeT(ino)
        e.entry_timeout = e.attr_timeout = 1.0
        e.st_mode = pyfuse3.ModeT(st.st_mode)
        e.st_nlink = 1 if ino != ROOT else 2
        e.st_uid, e.st_gid, e.st_size = st.st_uid, st.st_gid, st.st_size
        e.st_blksize, e.st_blocks = st.st_blksize, st.st_blocks
        e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return e

    def _path(self, ino: int) -> str:
        if ino == ROOT:
            return self.src
        try:
            return os.path.join(self.src, self.names[ino])
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _stat(self, ino: int) -> os.stat_result:
        try:
            return os.lstat(self._path(ino))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        ino = self._ino(os.fsdecode(name))
        st = self._stat(ino)
        if not stat.S_ISREG(st.st_mode):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entry(ino, st)

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._entry(inode, self._stat(inode))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            os.truncate(self._path(inode), attr.st_size)
        return self._entry(inode, self._stat(inode))

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        return pyfuse3.FileHandleT(inode)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        names = sorted(e.name for e in os.scandir(self.src) if e.is_file(follow_symlinks=False))
        for i, name in enumerate(names[start_id:], start_id + 1):
            ino = self._ino(name)
            if not pyfuse3.readdir_reply(
                token, os.fsencode(name), self._entry(ino, self._stat(ino)), i
            ):
                break

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        want = (flags & FORWARDED) | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self._path(inode), want)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        fh = self.next_fh
        self.next_fh += 1
        direct = bool(flags & os.O_DIRECT)
        self.fds[fh] = (fd, direct)
        return pyfuse3.FileInfo(
            fh=pyfuse3.FileHandleT(fh), direct_io=direct or self.direct_io_always, keep_cache=False
        )

    async def read(self, fh: int, off: int, size: int) -> bytes:
        fd, direct = self.fds[fh]
        if not direct:
            return os.pread(fd, size, off)
        if size > len(self.buf):
            self.buf = mmap.mmap(-1, (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE)
        with memoryview(self.buf) as view, view[: (size + 4095) // 4096 * 4096] as part:
            n = os.preadv(fd, [part], off)
            return bytes(part[: min(n, size)])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        fd, direct = self.fds[fh]
        if not direct:
            return os.pwrite(fd, buf, off)
        size = len(buf)
        if size > len(self.buf):
            self.buf = mmap.mmap(-1, (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE)
        with memoryview(self.buf) as view, view[:size] as part:
            part[:] = buf
            return os.pwritev(fd, [part], off)

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(self.fds[fh][0])

    async def release(self, fh: int) -> None:
        fd, _ = self.fds.pop(fh)
        os.close(fd)


async def _serve(max_tasks: int) -> None:
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(watch)
        await pyfuse3.main(max_tasks=max_tasks)
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("mountpoint")
    p.add_argument("--direct-io", choices=("odirect", "always"), default="odirect")
    p.add_argument("--max-tasks", type=int, default=512)
    args = p.parse_args(argv)
    ops = Passthrough(os.path.abspath(args.src), args.direct_io == "always")
    options = {"fsname=benchpt", "subtype=benchpt", "allow_other", "default_permissions"}
    pyfuse3.init(ops, args.mountpoint, options)
    try:
        trio.run(_serve, args.max_tasks)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
