"""Partition tables read by fusemux itself (GPT and MBR), and partition nodes made with BLKPG.

This module owns the parsing of a disk image's partition table and the ``BLKPG`` ioctls that
add and delete partition nodes (``/dev/loopNpM``) on a block device. It exists because the
kernel fusemux runs on may have no partition parsers: ``LO_FLAGS_PARTSCAN`` then finds
nothing, so fusemux reads the table from the image and tells the kernel where each partition
is. On a kernel that has parsers, the partitions it already made are kept and only the
missing ones are added.

The parsers are pure functions over bytes and never raise on a corrupt table: a table they
cannot trust gives no partitions. Sectors are 512 bytes (the logical block size of a loop
device unless it is configured otherwise, which fusemux never does).

Partition nodes where the kernel makes none: on a devtmpfs ``/dev`` the kernel makes and
removes ``/dev/loopNpM`` itself. Where ``/dev`` is something else (a container's or a
chroot's plain tmpfs, no udev) nothing would, so after a BLKPG add this module makes each
missing node with ``mknod`` from the partition's ``MAJ:MIN`` in sysfs, with the owner and
mode of the whole device, and marks it as its own (the ``trusted.fusemux.node`` xattr, and a
process-wide record for filesystems without xattrs). After a BLKPG delete it removes the
nodes it made, and only those; a node someone else made is left alone.

The ioctl and node helpers block; call them from a worker thread. Several threads may add or
delete partitions of different devices at once: the record of made nodes is guarded by a
lock, and each node operation tolerates a node that another thread made or removed first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SECTOR = 512
BLKPG = 0x1269
BLKPG_ADD_PARTITION = 1
BLKPG_DEL_PARTITION = 2
MBR_SIGNATURE = b"\x55\xaa"
MBR_PROTECTIVE = 0xEE
MBR_EXTENDED = frozenset({0x05, 0x0F, 0x85})
MBR_MAX_LOGICAL = 128
GPT_SIGNATURE = b"EFI PART"
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
GPT_MAX_ENTRIES = 1024
SYS_BLOCK = Path("/sys/block")
# Marks a partition node fusemux made with mknod (trusted.*: root only, any inode type).
NODE_MARK = "trusted.fusemux.node"
NODE_MARK_VALUE = b"fusemux"


@dataclass(frozen=True)
class Partition:
    """One partition: its number (1-based, as in ``loopNpM``), start and length in bytes."""

    number: int
    start: int
    length: int


# A reader gives the bytes at (offset, length); short at the end of the disk.
Reader = Callable[[int, int], bytes]


def parse(read: Reader, disk_size: int) -> list[Partition]:
    """The partitions of a disk of *disk_size* bytes, GPT first, else MBR. Never raises."""
    try:
        mbr = read(0, SECTOR)
    except OSError:
        return []
    if len(mbr) < SECTOR or mbr[510:512] != MBR_SIGNATURE:
        return []
    entries = _mbr_entries(mbr)
    if any(kind == MBR_PROTECTIVE for kind, _, _ in entries):
        return _gpt(read, disk_size)
    return _mbr(read, entries, disk_size)


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int]]:
    """(type, first LBA, sectors) of the four slots of an MBR or EBR sector."""
    out = []
    for i in range(4):
        off = 446 + 16 * i
        kind = sector[off + 4]
        first, count = struct.unpack_from("<II", sector, off + 8)
        out.append((kind, first, count))
    return out


def _valid(start: int, length: int, disk_size: int) -> bool:
    return length > 0 and start > 0 and start + length <= disk_size


def _mbr(read: Reader, entries: list[tuple[int, int, int]], disk_size: int) -> list[Partition]:
    parts: list[Partition] = []
    for slot, (kind, first, count) in enumerate(entries, start=1):
        if kind == 0 or count == 0:
            continue
        if kind in MBR_EXTENDED:
            parts += _logical(read, first, disk_size)
            continue
        start, length = first * SECTOR, count * SECTOR
        if _valid(start, length, disk_size):
            parts.append(Partition(slot, start, length))
    return parts


def _logical(read: Reader, ext_first: int, disk_size: int) -> list[Partition]:
    """Logical partitions in the chain of EBRs of an extended partition, numbered from 5."""
    parts: list[Partition] = []
    seen: set[int] = set()
    ebr = ext_first
    number = 5
    while ebr not in seen and len(seen) < MBR_MAX_LOGICAL and ebr * SECTOR < disk_size:
        seen.add(ebr)
        try:
            sector = read(ebr * SECTOR, SECTOR)
        except OSError:
            break
        if len(sector) < SECTOR or sector[510:512] != MBR_SIGNATURE:
            break
        (k1, f1, c1), (k2, f2, _c2) = _mbr_entries(sector)[:2]
        if k1 != 0 and c1 != 0:
            start, length = (ebr + f1) * SECTOR, c1 * SECTOR
            if _valid(start, length, disk_size):
                parts.append(Partition(number, start, length))
            number += 1
        if k2 == 0 or f2 == 0:
            break
        ebr = ext_first + f2
    return parts


def _gpt(read: Reader, disk_size: int) -> list[Partition]:
    """Partitions of a GPT: the primary header at LBA 1, else the backup at the last LBA."""
    last_lba = disk_size // SECTOR - 1
    for lba in (1, last_lba):
        if lba < 1:
            continue
        parts = _gpt_at(read, lba, disk_size)
        if parts is not None:
            return parts
        log.debug("no valid GPT header at LBA %d", lba)
    return []


def _gpt_at(read: Reader, lba: int, disk_size: int) -> list[Partition] | None:
    try:
        raw = read(lba * SECTOR, SECTOR)
    except OSError:
        return None
    if len(raw) < GPT_HEADER.size:
        return None
    (
        signature,
        _revision,
        header_size,
        header_crc,
        _reserved,
        my_lba,
        _alt_lba,
        first_usable,
        last_usable,
        _guid,
        entries_lba,
        count,
        entry_size,
        entries_crc,
    ) = GPT_HEADER.unpack_from(raw)
    if signature != GPT_SIGNATURE or my_lba != lba or not 92 <= header_size <= SECTOR:
        return None
    check = bytearray(raw[:header_size])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(check) != header_crc:
        return None
    if not 0 < count <= GPT_MAX_ENTRIES or entry_size < GPT_ENTRY.size or entry_size > 4096:
        return None
    table_len = count * entry_size
    if entries_lba * SECTOR + table_len > disk_size:
        return None
    try:
        table = read(entries_lba * SECTOR, table_len)
    except OSError:
        return None
    if len(table) < table_len or zlib.crc32(table) != entries_crc:
        return None
    parts: list[Partition] = []
    for i in range(count):
        kind, _unique, first, last, _attrs, _name = GPT_ENTRY.unpack_from(table, i * entry_size)
        if kind == bytes(16) or last < first:
            continue
        if first < first_usable or last > last_usable:
            continue
        start, length = first * SECTOR, (last - first + 1) * SECTOR
        if _valid(start, length, disk_size):
            parts.append(Partition(i + 1, start, length))
    return parts


def parse_file(path: str) -> list[Partition]:
    """The partitions of the disk image at *path* (blocking)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        size = os.fstat(fd).st_size
        return parse(lambda off, n: os.pread(fd, n, off), size)
    finally:
        os.close(fd)


def type_guid(text: str) -> bytes:
    """A GPT type GUID in its on-disk byte order (for tests that write tables)."""
    return uuid.UUID(text).bytes_le


# -- BLKPG ---------------------------------------------------------------------------------


class _BlkpgPartition(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_longlong),
        ("length", ctypes.c_longlong),
        ("pno", ctypes.c_int),
        ("devname", ctypes.c_char * 64),
        ("volname", ctypes.c_char * 64),
    ]


class _BlkpgIoctlArg(ctypes.Structure):
    _fields_ = [
        ("op", ctypes.c_int),
        ("flags", ctypes.c_int),
        ("datalen", ctypes.c_int),
        ("data", ctypes.c_void_p),
    ]


def _blkpg(fd: int, op: int, part: Partition) -> None:
    data = _BlkpgPartition(start=part.start, length=part.length, pno=part.number)
    arg = _BlkpgIoctlArg(op=op, flags=0, datalen=ctypes.sizeof(data), data=ctypes.addressof(data))
    fcntl.ioctl(fd, BLKPG, arg)  # data stays alive (referenced above) for the call


def add_partitions(dev: str, parts: list[Partition], sys_block: Path = SYS_BLOCK) -> list[str]:
    """Make a node for every partition in *parts* that *dev* does not have yet.

    Returns the partition device paths, by number. On a devtmpfs ``/dev`` it waits briefly
    for the kernel to show each node; elsewhere it makes the missing nodes from sysfs.
    """
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for part in parts:
            node = f"{dev}p{part.number}"
            try:
                _blkpg(fd, BLKPG_ADD_PARTITION, part)
            except OSError as e:
                # EBUSY: the kernel's own parser made it already (or it overlaps one).
                if e.errno != errno.EBUSY:
                    raise OSError(e.errno, f"cannot add partition {node}: {e.strerror}") from None
    finally:
        os.close(fd)
    nodes = [f"{dev}p{p.number}" for p in parts]
    if not kernel_makes_nodes(dev):
        return make_missing_nodes(dev, [p.number for p in parts], sys_block)
    deadline = time.monotonic() + 2.0
    while not all(os.path.exists(n) for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.01)
    return nodes


def delete_partitions(dev: str, numbers: list[int]) -> None:
    """Delete partitions *numbers* of *dev*, highest first. ENXIO (already gone) is fine.

    The node of each deleted partition is removed if fusemux made it (see the module doc).
    """
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for number in sorted(numbers, reverse=True):
            try:
                _blkpg(fd, BLKPG_DEL_PARTITION, Partition(number, 0, 0))
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise OSError(
                        e.errno, f"cannot delete partition {dev}p{number}: {e.strerror}"
                    ) from None
            remove_own_nodes(dev, [number])
    finally:
        os.close(fd)


# -- partition nodes where the kernel makes none -------------------------------------------

_made: dict[str, int] = {}  # node path -> st_rdev, for the nodes this process made
_made_lock = threading.Lock()


def kernel_makes_nodes(dev: str) -> bool:
    """Whether the directory of *dev* is on a devtmpfs (the kernel makes nodes there)."""
    directory = os.path.realpath(os.path.dirname(os.path.abspath(dev)))
    fstype = ""
    best = -1
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
    except OSError:
        return True  # no /proc: assume the common case, and only wait as before
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        point = fields[4]
        for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
            point = point.replace(code, char)
        inside = directory == point or directory.startswith(point.rstrip("/") + "/")
        # The last of equally long mountpoints is the one on top.
        if inside and len(point) >= best:
            best, fstype = len(point), right.split()[0]
    return fstype == "devtmpfs"


def _is_ours(node: str) -> bool:
    try:
        return os.getxattr(node, NODE_MARK, follow_symlinks=False) == NODE_MARK_VALUE
    except OSError:
        return False


def make_missing_nodes(dev: str, numbers: list[int], sys_block: Path = SYS_BLOCK) -> list[str]:
    """Make ``{dev}pM`` for each partition M of *dev* that has no right node (blocking).

    MAJ:MIN comes from ``<sys_block>/loopN/loopNpM/dev``; owner, group and mode are the whole
    device's. A node that exists with the right device number is kept. One with another
    number is replaced if fusemux made it (a leftover), else it is an error: it is not ours
    to remove. Returns the node paths, by number.
    """
    base = os.path.basename(dev)
    whole = os.stat(dev)
    nodes: list[str] = []
    for number in numbers:
        node = f"{dev}p{number}"
        attr = sys_block / base / f"{base}p{number}" / "dev"
        try:
            major_s, _, minor_s = attr.read_text().strip().partition(":")
            rdev = os.makedev(int(major_s), int(minor_s))
        except (OSError, ValueError) as e:
            raise OSError(
                errno.ENOENT, f"cannot make {node}: the kernel shows no partition at {attr} ({e})"
            ) from None
        try:
            st = os.lstat(node)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                nodes.append(node)
                continue
            if not _is_ours(node):
                raise OSError(
                    errno.EEXIST,
                    f"{node} exists but is not partition {number} of {dev} "
                    f"({os.major(rdev)}:{os.minor(rdev)}); not made by fusemux, left alone",
                )
            log.warning("replacing leftover partition node %s", node)
            os.unlink(node)
        try:
            os.mknod(node, stat.S_IFBLK | stat.S_IMODE(whole.st_mode), rdev)
        except FileExistsError:
            # Another thread or process made it meanwhile: keep it if it is right.
            st = os.lstat(node)
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                nodes.append(node)
                continue
            raise
        with _made_lock:
            _made[node] = rdev
        os.chown(node, whole.st_uid, whole.st_gid, follow_symlinks=False)
        os.chmod(node, stat.S_IMODE(whole.st_mode))  # not reduced by the umask
        with contextlib.suppress(OSError):  # no xattrs here: the record above still knows
            os.setxattr(node, NODE_MARK, NODE_MARK_VALUE, follow_symlinks=False)
        log.info("made %s (%d:%d): /dev is not a devtmpfs", node, os.major(rdev), os.minor(rdev))
        nodes.append(node)
    return nodes


def remove_own_nodes(dev: str, numbers: list[int]) -> None:
    """Remove ``{dev}pM`` for each M in *numbers* if fusemux made it (blocking).

    Call it after the partition is deleted. A node fusemux did not make, or one that was
    replaced by a different node since, is left alone.
    """
    for number in numbers:
        node = f"{dev}p{number}"
        with _made_lock:
            rdev = _made.pop(node, None)
        try:
            st = os.lstat(node)
        except FileNotFoundError:
            continue
        if not stat.S_ISBLK(st.st_mode):
            continue
        if (rdev is not None and st.st_rdev == rdev) or _is_ours(node):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(node)
            log.info("removed partition node %s", node)
