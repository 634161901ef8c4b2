"""``/dev/fuse`` and the kernel mount of the own engine: open, ``mount(2)``, INIT, probe.

This module owns what happens before and after a FUSE connection serves requests: opening
``/dev/fuse``, mounting it (fstype ``fuse.fusemux``), reading the kernel's INIT offer, lazy
unmount, and the throwaway probe mount that tells ``engine = "auto"`` whether the kernel
offers FUSE passthrough. Everything here blocks briefly and runs before the trio loop
serves the connection (or after it has stopped).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import time
from pathlib import Path

from fusemux import libc
from fusemux.core.mounter import MNT_DETACH, read_mountinfo, umount2
from fusemux.engines import fuse_abi as abi

log = logging.getLogger(__name__)

MAX_PAGES = 256  # FUSE_MAX_MAX_PAGES: 1 MiB requests
MAX_WRITE = MAX_PAGES * 4096
BUFFER_SIZE = MAX_WRITE + abi.MIN_READ_BUFFER
MOUNT_OPTIONS = "rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
FSTYPE = "fuse.fusemux"
FSNAME = "fusemux"

_MS_NOSUID = 2
_MS_NODEV = 4


class EngineError(Exception):
    """The engine cannot start (no /dev/fuse, mount refused, INIT not as required)."""


def kernel_mount(fd: int, mountpoint: str, fsname: str = FSNAME, fstype: str = FSTYPE) -> None:
    """mount(2) a FUSE filesystem served on *fd* at *mountpoint*."""
    try:
        libc.mount(fsname, mountpoint, fstype, _MS_NOSUID | _MS_NODEV, f"fd={fd},{MOUNT_OPTIONS}")
    except OSError as e:
        raise EngineError(f"mount of {mountpoint} refused: {e.strerror}") from None


def kernel_umount(mountpoint: str) -> None:
    """Lazily detach *mountpoint* (the fd close then ends the connection)."""
    try:
        umount2(mountpoint, MNT_DETACH)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            log.warning("umount of %s failed: %s", mountpoint, e.strerror)


def open_dev() -> int:
    try:
        return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise EngineError(f"cannot open /dev/fuse: {e.strerror}") from None


def read_init(fd: int, timeout: float) -> tuple[int, int, int, int]:
    """Wait for the kernel's INIT; return (unique, major, minor, flags incl. flags2)."""
    buf = bytearray(BUFFER_SIZE)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise EngineError("the kernel sent no FUSE INIT")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            n = os.readv(fd, [buf])
        except BlockingIOError:
            continue
        length, opcode, unique, *_ = abi.IN_HEADER.unpack_from(buf)
        if opcode != abi.INIT or n < abi.IN_HEADER.size + abi.INIT_IN.size:
            raise EngineError(f"expected FUSE INIT, got opcode {opcode}")
        major, minor, _readahead, flags = abi.INIT_IN.unpack_from(buf, abi.IN_HEADER.size)
        off = abi.IN_HEADER.size + abi.INIT_IN.size
        if flags & abi.INIT_EXT and n >= off + 4:
            (flags2,) = abi.INIT_IN_FLAGS2.unpack_from(buf, off)
            flags |= flags2 << 32
        return unique, major, minor, flags


def probe(workdir: Path) -> tuple[bool, str]:
    """Can this process serve FUSE passthrough? A throwaway mount asks the kernel.

    Mounts a session on a private directory under *workdir*, reads the kernel's INIT offer
    and unmounts it again, without answering (closing the fd ends the connection).
    """
    if os.geteuid() != 0:
        return False, "passthrough needs root (CAP_SYS_ADMIN registers backing files)"
    _clear_stale_probes(workdir)
    probe_dir = workdir / f"engine-probe.{os.getpid()}"
    try:
        probe_dir.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        return False, f"cannot create {probe_dir}: {e.strerror}"
    fd = -1
    mounted = False
    try:
        fd = open_dev()
        kernel_mount(fd, str(probe_dir), fsname="fusemux-probe")
        mounted = True
        _, major, minor, flags = read_init(fd, 5.0)
    except EngineError as e:
        return False, str(e)
    finally:
        if mounted:
            kernel_umount(str(probe_dir))
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            probe_dir.rmdir()
    if (major, minor) < (abi.KERNEL_VERSION, abi.PASSTHROUGH_MINOR):
        return False, f"kernel FUSE protocol {major}.{minor} is older than 7.40"
    if not flags & abi.PASSTHROUGH:
        return False, "the kernel does not offer FUSE_PASSTHROUGH (CONFIG_FUSE_PASSTHROUGH)"
    return True, f"kernel FUSE protocol {major}.{minor} offers passthrough"


def _clear_stale_probes(workdir: Path) -> None:
    """Detach probe mounts a killed daemon left behind (never stat()ed: they are dead)."""
    prefix = f"{workdir}/engine-probe."
    for m in read_mountinfo():
        if m.mountpoint.startswith(prefix):
            log.info("detaching a stale engine probe mount at %s", m.mountpoint)
            kernel_umount(m.mountpoint)
            with contextlib.suppress(OSError):
                os.rmdir(m.mountpoint)
