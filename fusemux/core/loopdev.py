"""Loop devices through direct ioctls: attach, detach, find, and tell whether one is in use.

This module owns every loop ioctl fusemux makes (``LOOP_CTL_GET_FREE`` on
``/dev/loop-control``, ``LOOP_CONFIGURE`` and ``LOOP_CLR_FD`` on ``/dev/loopN``) and the
sysfs reads about loop devices (``/sys/block/loopN/loop/backing_file``, ``holders``). It never
runs losetup.

Every function here blocks (ioctls, opens of device nodes, sysfs reads). Callers in the trio
thread run them through :func:`fusemux.core.workers.run` (the export's own pool).

Attaching races with other processes: between ``LOOP_CTL_GET_FREE`` and ``LOOP_CONFIGURE``
another process may take the same device. ``LOOP_CONFIGURE`` then fails with ``EBUSY`` and
the attach asks for a free device again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import struct
import time
from pathlib import Path

from fusemux.core.mounter import read_mountinfo

log = logging.getLogger(__name__)

LOOP_CONTROL = "/dev/loop-control"
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_CLR_FD = 0x4C01
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_PARTSCAN = 8
LO_NAME_SIZE = 64
# struct loop_info64: device, inode, rdevice, offset, sizelimit (u64); number, encrypt_type,
# encrypt_key_size, flags (u32); file_name[64], crypt_name[64], encrypt_key[32]; init[2] (u64).
LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")
# struct loop_config: fd, block_size (u32); loop_info64; reserved[8] (u64).
LOOP_CONFIG_HEAD = struct.Struct("=II")
LOOP_CONFIG_RESERVED = struct.Struct("=8Q")
assert LOOP_INFO64.size == 232
ATTACH_TRIES = 20
SYS_BLOCK = Path("/sys/block")
_PARTITION = re.compile(r"(loop\d+)p\d+")


def _loop_config(fd: int, flags: int, name: str) -> bytes:
    file_name = os.fsencode(name)[: LO_NAME_SIZE - 1]
    info = LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, file_name, b"", b"", 0, 0)
    return LOOP_CONFIG_HEAD.pack(fd, 0) + info + LOOP_CONFIG_RESERVED.pack(*([0] * 8))


def attach(path: str | Path, read_only: bool, partscan: bool) -> str:
    """Attach the regular file *path* to a free loop device; returns ``/dev/loopN``.

    The loop device keeps its own reference to the file; no fd of ours stays open.
    """
    mode = os.O_RDONLY if read_only else os.O_RDWR
    backing = os.open(path, mode | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        flags = (LO_FLAGS_READ_ONLY if read_only else 0) | (LO_FLAGS_PARTSCAN if partscan else 0)
        config = _loop_config(backing, flags, str(path))
        ctl = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(ATTACH_TRIES):
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                dev = f"/dev/loop{number}"
                try:
                    fd = _open_node(dev, mode)
                except FileNotFoundError:
                    time.sleep(0.01)  # devtmpfs has not made the node yet
                    continue
                try:
                    fcntl.ioctl(fd, LOOP_CONFIGURE, config)
                    return dev
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
                    log.debug("%s was taken by someone else; asking for another", dev)
                finally:
                    os.close(fd)
            raise OSError(errno.EBUSY, "no free loop device after retries")
        finally:
            os.close(ctl)
    finally:
        os.close(backing)


def _open_node(dev: str, mode: int) -> int:
    deadline = time.monotonic() + 1.0
    while True:
        try:
            return os.open(dev, mode | os.O_CLOEXEC)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def detach(dev: str) -> None:
    """``LOOP_CLR_FD`` on *dev*. ENXIO (not attached) counts as done.

    If the device is still open elsewhere, the kernel defers the detach to the last close
    (it sets autoclear) and this returns at once.
    """
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as e:
        if e.errno != errno.ENXIO:
            raise
    finally:
        os.close(fd)


def backing_file(dev: str) -> str | None:
    """The file behind loop device *dev* (``/dev/loopN``), or None if it is not attached."""
    try:
        text = (SYS_BLOCK / os.path.basename(dev) / "loop" / "backing_file").read_text()
    except OSError:
        return None
    return text.rstrip("\n")


def attached_loops() -> dict[str, str]:
    """Every attached loop device and its backing file: ``{"/dev/loopN": path}``."""
    out: dict[str, str] = {}
    for entry in sorted(SYS_BLOCK.glob("loop*")):
        name = backing_file(entry.name)
        if name is not None:
            out[f"/dev/{entry.name}"] = name
    return out


def partition_devices(dev: str) -> list[str]:
    """The partition nodes the kernel has for *dev*, by partition number."""
    base = os.path.basename(dev)
    found: list[tuple[int, str]] = []
    with contextlib.suppress(OSError):
        for entry in (SYS_BLOCK / base).iterdir():
            if entry.name.startswith(base + "p") and (entry / "partition").exists():
                with contextlib.suppress(ValueError, OSError):
                    number = int((entry / "partition").read_text())
                    found.append((number, f"/dev/{entry.name}"))
    return [name for _, name in sorted(found)]


def users(devices: list[str]) -> list[str]:
    """Who uses any of *devices* (a whole device and its partitions), for in-use checks.

    Two signs: a mount whose source is one of them (mountinfo), and a holder in sysfs
    (``/sys/block/loopN/holders``, ``/sys/block/loopN/loopNpM/holders``: device-mapper, md,
    bcache). An exclusive open by a plain process is not detected: probing for it with an
    ``O_EXCL`` open could make a concurrent mount fail.
    """
    out: list[str] = []
    wanted = set(devices)
    for m in read_mountinfo():
        if m.source in wanted:
            out.append(f"{m.source} mounted on {m.mountpoint}")
    for dev in devices:
        base = os.path.basename(dev)
        part = _PARTITION.fullmatch(base)
        sysdir = SYS_BLOCK / part.group(1) / base if part else SYS_BLOCK / base
        with contextlib.suppress(OSError):
            for holder in sorted((sysdir / "holders").iterdir()):
                out.append(f"{dev} held by {holder.name}")
    return out
