"""A tiny read-only FUSE filesystem that plays a hung storage backend in tier-(c) tests.

Run as a separate process::

    python -m tests.mount.hangfs MOUNTPOINT CONTROL_DIR [NAME=SIZE ...]

It serves a flat directory of regular files (default ``vol1`` and ``vol2``, 1 MiB each) whose
content is :func:`content` of the file name: a deterministic pattern a test can check.

Control, through files in CONTROL_DIR (polled every 10 ms):

* ``block`` exists: every read blocks until the file is removed (then completes normally);
* ``block_statfs`` exists: every statfs blocks the same way (a server that stopped answering
  as fusemux's health probe sees it);
* ``waiting`` is rewritten with the number of reads blocked right now, so a test can wait
  until a read is really stuck inside the backend;
* ``ready`` is created once the filesystem is mounted and serving.

Lookups, getattr, open and readdir never block. Files are opened with ``direct_io`` so every
read() reaches this process (no page cache in between). The process exits cleanly on
SIGTERM/SIGINT or when its mount goes away.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

MiB = 1 << 20
POLL = 0.01


def content(name: str, size: int) -> bytes:
    """The bytes of file *name*: its name and block offset repeated, so misplaced reads show."""
    out = bytearray()
    block = 0
    while len(out) < size:
        out += f"{name}:{block:08d}|".encode().ljust(64, b".")
        block += 1
    return bytes(out[:size])


class HangFS(pyfuse3.Operations):
    """A flat directory of read-only files whose reads block while CONTROL/block exists."""

    def __init__(self, control: Path, files: dict[str, int]) -> None:
        super().__init__()
        self.control = control
        self.names = sorted(files)
        self.data = {name: content(name, size) for name, size in files.items()}
        # inode 1 is the root; files get 2, 3, ...
        self.ino_of = {name: i + 2 for i, name in enumerate(self.names)}
        self.name_of = {ino: name for name, ino in self.ino_of.items()}
        self.waiting = 0

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.InodeT(ino)
        if ino == pyfuse3.ROOT_INODE:
            e.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o755)
            e.st_nlink = 2
            e.st_size = 0
        else:
            e.st_mode = pyfuse3.ModeT(stat.S_IFREG | 0o644)
            e.st_nlink = 1
            e.st_size = len(self.data[self.name_of[ino]])
        e.st_uid = 0
        e.st_gid = 0
        e.st_blksize = 4096
        e.st_blocks = (e.st_size + 511) // 512
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = 0
        e.entry_timeout = 1.0
        e.attr_timeout = 1.0
        return e

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        ino = self.ino_of.get(os.fsdecode(name)) if parent_inode == pyfuse3.ROOT_INODE else None
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE and inode not in self.name_of:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name in self.names:
            ino = self.ino_of[name]
            if ino <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name.encode(), self._attr(ino), ino):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode not in self.name_of:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if (self.control / "block").exists():
            self.waiting += 1
            self._publish()
            try:
                # Polling a file on purpose: the test controls it from another process.
                while (self.control / "block").exists():  # noqa: ASYNC110
                    await trio.sleep(POLL)
            finally:
                self.waiting -= 1
                self._publish()
        data = self.data[self.name_of[fh]]
        return data[off : off + size]

    async def release(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # Polling a file on purpose: the test controls it from another process.
        while (self.control / "block_statfs").exists():  # noqa: ASYNC110
            await trio.sleep(POLL)
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = st.f_bfree = st.f_bavail = 1024
        st.f_files = st.f_ffree = st.f_favail = 64
        st.f_namemax = 255
        return st

    def _publish(self) -> None:
        tmp = self.control / "waiting.tmp"
        tmp.write_text(str(self.waiting))
        tmp.rename(self.control / "waiting")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    mountpoint, control = argv[0], Path(argv[1])
    files = {"vol1": MiB, "vol2": MiB}
    if len(argv) > 2:
        files = {}
        for spec in argv[2:]:
            name, _, size = spec.partition("=")
            files[name] = int(size)
    fs = HangFS(control, files)
    fs._publish()
    options = {"fsname=hangfs", "subtype=hangfs", "ro"}
    pyfuse3.init(fs, mountpoint, options)
    (control / "ready").touch()
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


async def serve() -> None:
    """pyfuse3.main until the mount goes away or SIGTERM/SIGINT arrives."""

    async def on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
