"""Kernel passthrough registrations of backing files, for one FUSE connection.

This module owns the backing ids of the own engine (``FUSE_DEV_IOC_BACKING_OPEN`` and
``FUSE_DEV_IOC_BACKING_CLOSE``): at OPEN the core's backing fd of a volume is registered and
the reply carries its id, so the kernel reads and writes the backing file itself. The kernel
wants every passthrough open of one inode to use the same backing file (fs/fuse/iomode.c),
so registrations are per inode and counted; the last RELEASE of an inode closes it.

Concurrency: used from the trio thread only. Closing a registration whose fd belongs to the
handle being released cannot drop the file's last reference and runs inline; otherwise the
close may be the last reference (a network round trip on NFS) and runs in the export's worker
threads through :meth:`FileSystem.handle_call`.
"""

from __future__ import annotations

import fcntl
import logging
from collections import Counter
from dataclasses import dataclass

from fusemux.core.fs import FileSystem
from fusemux.engines import fuse_abi as abi

log = logging.getLogger(__name__)


@dataclass
class Backing:
    """One passthrough registration: a backing file the kernel may use for an inode."""

    backing_id: int
    refs: int
    fh: int  # the handle whose backing fd was registered (the core keeps it open until release)


class BackingRegistry:
    """The passthrough registrations of one connection, by inode, and which fh uses which."""

    def __init__(self, fs: FileSystem, stats: Counter[str]) -> None:
        self.fs = fs
        self.stats = stats
        self.fd = -1  # the connection's /dev/fuse fd, set once mounted
        self.by_ino: dict[int, Backing] = {}
        self.fh_ino: dict[int, int] = {}  # fh -> ino, for passthrough opens

    def __len__(self) -> int:
        return len(self.by_ino)

    def passes_through(self, fh: int) -> bool:
        """Whether *fh* was opened with FOPEN_PASSTHROUGH (its writes bypass fusemux)."""
        return fh in self.fh_ino

    def register(self, ino: int, fh: int, fd: int | None) -> int:
        """The inode's backing id (registering *fd* if it has none); 0 if refused."""
        if fd is None:
            return 0
        existing = self.by_ino.get(ino)
        if existing is not None:
            existing.refs += 1
            self.fh_ino[fh] = ino
            return existing.backing_id
        arg = bytearray(abi.BACKING_MAP.pack(fd, 0, 0))
        try:
            backing_id = int(fcntl.ioctl(self.fd, abi.DEV_IOC_BACKING_OPEN, arg, True))
        except OSError as e:
            self.stats["passthrough_refused"] += 1
            log.info("passthrough refused for inode %d (%s): served by fusemux", ino, e.strerror)
            return 0
        if backing_id <= 0:
            return 0
        self.by_ino[ino] = Backing(backing_id=backing_id, refs=1, fh=fh)
        self.fh_ino[fh] = ino
        return backing_id

    def close_id(self, backing_id: int) -> None:
        arg = bytearray(abi.BACKING_ID.pack(backing_id))
        try:
            fcntl.ioctl(self.fd, abi.DEV_IOC_BACKING_CLOSE, arg, True)
        except OSError as e:
            log.warning("closing passthrough registration %d failed: %s", backing_id, e)

    async def unregister(self, fh: int) -> None:
        """*fh* is being released: drop its reference, closing the inode's id if last."""
        ino = self.fh_ino.pop(fh, None)
        if ino is None:
            return
        b = self.by_ino[ino]
        b.refs -= 1
        if b.refs == 0:
            del self.by_ino[ino]
            if b.fh == fh:
                # The registered fd is this handle's, still open in the core: dropping the
                # registration cannot drop the file's last reference, so it does no I/O.
                self.close_id(b.backing_id)
            else:
                # The registration may hold the last reference (its handle is gone): the
                # final fput can mean a round trip to the backing filesystem.
                await self.fs.handle_call(fh, self.close_id, b.backing_id)

    def close_all(self) -> None:
        """Drop every registration (a forced stop). The core still holds their backing fds
        (it closes them later, in FileSystem.shutdown), so none of these closes is the
        file's last reference and none does I/O on the event loop."""
        for ino, b in list(self.by_ino.items()):
            self.close_id(b.backing_id)
            del self.by_ino[ino]
