"""Tier (c): I/O through the mount: data round trips, qemu-io, O_DIRECT, fallocate, setattr,
statfs, access by another user, read-only exports and the refused namespace operations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import PUBLIC_DIR
from tests.mount.harness import Daemon, as_nobody, run, wait_for

MiB = 1 << 20


def test_data_written_through_fusemux_reaches_backing_and_back(daemon: Daemon) -> None:
    src = daemon.add_bind_export("gold", {"disk": b"\0" * MiB})
    daemon.start()
    payload = os.urandom(300_000)
    with open(daemon.volume("gold", "disk"), "r+b") as f:
        f.seek(4096)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    assert (src / "disk").read_bytes()[4096 : 4096 + len(payload)] == payload

    # The other way round: the storage side writes, fusemux reads.
    other = os.urandom(MiB)
    (src / "disk").write_bytes(other)
    with open(daemon.volume("gold", "disk"), "rb") as f:
        assert f.read() == other


def test_open_with_o_trunc_truncates_the_backing_file(daemon: Daemon) -> None:
    src = daemon.add_bind_export("gold", {"disk": b"x" * MiB})
    daemon.start()
    with open(daemon.volume("gold", "disk"), "wb") as f:  # O_WRONLY|O_CREAT|O_TRUNC
        f.write(b"short")
    assert (src / "disk").read_bytes() == b"short"


def test_qemu_io_pattern_with_cache_none(daemon: Daemon) -> None:
    src = daemon.add_bind_export("gold")
    run("qemu-img", "create", "-q", "-f", "raw", src / "vm.raw", "16M")
    run("qemu-img", "create", "-q", "-f", "qcow2", src / "vm.qcow2", "64M")
    daemon.start()
    raw = daemon.volume("gold", "vm.raw")
    out = run(
        "qemu-io", "-f", "raw", "-t", "none",
        "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 1M 64k",
        "-c", "read -P 0xab 0 1M", "-c", "read -P 0xcd 1M 64k", raw,
    ).stdout  # fmt: skip
    assert "Pattern verification failed" not in out
    assert out.count("read ") == 2
    # The data is really in the backing file, where qemu-io wrote it.
    data = (src / "vm.raw").read_bytes()
    assert data[:MiB] == b"\xab" * MiB and data[MiB : MiB + 65536] == b"\xcd" * 65536

    qcow = daemon.volume("gold", "vm.qcow2")
    out = run(
        "qemu-io", "-f", "qcow2", "-t", "none",
        "-c", "write -P 0x5a 3M 256k", "-c", "read -P 0x5a 3M 256k", qcow,
    ).stdout  # fmt: skip
    assert "Pattern verification failed" not in out
    check = run("qemu-img", "check", "-f", "qcow2", src / "vm.qcow2")
    assert "No errors were found" in check.stdout
    # Read back through the backing file with qemu's block layer as well.
    out = run("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 3M 256k", src / "vm.qcow2").stdout
    assert "Pattern verification failed" not in out


def resident_pages(path: Path) -> int:
    """Pages of *path* in the page cache, as fincore(1) counts them."""
    out = run("fincore", "--bytes", "--noheadings", "--output", "PAGES", path).stdout
    return int(out.split()[0])


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_o_direct_bypasses_page_cache_end_to_end(daemon: Daemon) -> None:
    image = daemon.add_ext4_export("img", {"disk": b"\0" * (4 * MiB)})
    daemon.start()
    vol = daemon.volume("img", "disk")
    with open(vol, "rb"):
        backing = Path(daemon.xattr(vol, "backing_path"))
        drop_cache(backing)
        assert resident_pages(backing) == 0
        fd = os.open(vol, os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, MiB)
            buf.write(os.urandom(MiB))
            assert os.pwritev(fd, [buf], 0) == MiB
            back = mmap.mmap(-1, MiB)
            assert os.preadv(fd, [back], 0) == MiB
            assert back[:] == buf[:]
            # Neither the write nor the read went through the backing page cache.
            assert resident_pages(backing) == 0
        finally:
            os.close(fd)
        # Control: a buffered read through fusemux does populate it.
        with open(vol, "rb") as f:
            f.read(MiB)
        assert resident_pages(backing) > 0
    assert image.exists()


def test_o_direct_unaligned_requests(daemon: Daemon) -> None:
    src = daemon.add_bind_export("gold", {"disk": b"\x11" * MiB})
    daemon.start()
    if daemon.passthrough:
        # The kernel hands O_DIRECT straight to the backing file: its own alignment rules
        # apply, exactly as without fusemux (checked on the backing file in the same run).
        for path in (daemon.volume("gold", "disk"), src / "disk"):
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
            try:
                with pytest.raises(OSError) as e:
                    os.pwrite(fd, b"unaligned!" * 7, 4093)
                assert e.value.errno == errno.EINVAL
                aligned = mmap.mmap(-1, 8192)
                aligned.write(b"\x22" * 8192)
                assert os.pwritev(fd, [aligned], 8192) == 8192
            finally:
                os.close(fd)
        assert (src / "disk").read_bytes()[8192:16384] == b"\x22" * 8192
        return
    fd = os.open(daemon.volume("gold", "disk"), os.O_RDWR | os.O_DIRECT)
    try:
        # Offsets and lengths no block device would accept; fusemux must still serve them.
        assert os.pwrite(fd, b"unaligned!" * 7, 4093) == 70
        assert os.pread(fd, 70, 4093) == b"unaligned!" * 7
        assert os.pread(fd, 3, 1) == b"\x11" * 3
        aligned = mmap.mmap(-1, 8192)
        aligned.write(b"\x22" * 8192)
        assert os.pwritev(fd, [aligned], 8192) == 8192
        os.fsync(fd)
    finally:
        os.close(fd)
    data = (src / "disk").read_bytes()
    assert data[4093 : 4093 + 70] == b"unaligned!" * 7
    assert data[4092] == 0x11 and data[4093 + 70] == 0x11
    assert data[8192:16384] == b"\x22" * 8192


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


def fallocate(fd: int, mode: int, off: int, length: int) -> int:
    """Raw fallocate(2) (glibc's posix_fallocate would silently emulate it)."""
    res = _libc.fallocate(fd, mode, ctypes.c_long(off), ctypes.c_long(length))
    return 0 if res == 0 else ctypes.get_errno()


def test_fallocate_is_eopnotsupp_and_qemu_falls_back(daemon: Daemon) -> None:
    if daemon.own_engine:
        pytest.skip("pyfuse3 engine only: the own engine implements FALLOCATE")
    src = daemon.add_bind_export("gold", {"disk": b"\x33" * (2 * MiB)})
    daemon.start()
    vol = daemon.volume("gold", "disk")
    fd = os.open(vol, os.O_RDWR)
    try:
        assert fallocate(fd, 0, 0, 4 * MiB) == errno.EOPNOTSUPP
        punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        assert fallocate(fd, punch, 0, 4096) == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    assert (src / "disk").stat().st_size == 2 * MiB  # nothing changed

    # qemu treats discard as a hint: it succeeds and leaves the data as it was.
    out = run("qemu-io", "-f", "raw", "-t", "none", "-c", "discard 0 64k", vol).stdout
    assert "discard 65536/65536 bytes" in out
    assert (src / "disk").read_bytes()[:65536] == b"\x33" * 65536
    # write-zeroes falls back to writing zero buffers.
    out = run(
        "qemu-io", "-f", "raw", "-t", "none",
        "-c", "write -z 1M 256k", "-c", "read -P 0 1M 256k", vol,
    ).stdout  # fmt: skip
    assert "Pattern verification failed" not in out
    assert (src / "disk").read_bytes()[MiB : MiB + 262144] == b"\0" * 262144


def test_fallocate_lseek_and_statfs_per_export(daemon: Daemon) -> None:
    """What pyfuse3 cannot do: FALLOCATE (punch-hole for qemu discard, preallocation), LSEEK
    (SEEK_DATA/SEEK_HOLE) and STATFS answered by the export the path is in."""
    if not daemon.own_engine:
        pytest.skip("own engine only: pyfuse3 has no fallocate/lseek, statfs has no inode")
    src = daemon.add_ext4_export("img", {"disk": b"\x33" * (4 * MiB)})
    daemon.add_bind_export("gold", {"other": b"x"})
    daemon.start()
    vol = daemon.volume("img", "disk")
    fd = os.open(vol, os.O_RDWR)
    try:
        # Preallocation past the end grows the file (mode 0).
        assert fallocate(fd, 0, 0, 6 * MiB) == 0
        assert os.fstat(fd).st_size == 6 * MiB
        # Punch a hole: reads give zeros, SEEK_HOLE/SEEK_DATA find it.
        punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        assert fallocate(fd, punch, MiB, MiB) == 0
        assert os.pread(fd, MiB, MiB) == b"\0" * MiB
        assert os.pread(fd, 16, 2 * MiB) == b"\x33" * 16
        assert os.lseek(fd, 0, os.SEEK_HOLE) == MiB
        assert os.lseek(fd, MiB, os.SEEK_DATA) == 2 * MiB
        # statfs of a path inside an export answers for that export's backing filesystem
        # (the 4 MiB-image ext4), not the sum over exports.
        st_vol = os.fstatvfs(fd)
        st_backing = os.statvfs(daemon.target("img"))
        assert st_vol.f_blocks * st_vol.f_frsize == st_backing.f_blocks * st_backing.f_frsize
        assert st_vol.f_bfree * st_vol.f_frsize == st_backing.f_bfree * st_backing.f_frsize
        st_other = os.statvfs(daemon.mnt / "volumes" / "gold")
        assert st_other.f_blocks * st_other.f_frsize != st_vol.f_blocks * st_vol.f_frsize
    finally:
        os.close(fd)
    # qemu's discard punches a hole in the backing image now (no longer a no-op hint).
    out = run("qemu-io", "-f", "raw", "-t", "none", "-c", "discard 3M 1M", vol).stdout
    assert "discard 1048576/1048576 bytes" in out
    # The hole qemu punched is seen through fusemux (LSEEK on a fresh open).
    fd = os.open(vol, os.O_RDONLY)
    try:
        # 2-3 MiB is data; the hole starts where qemu discarded (the preallocated 4-6 MiB
        # are unwritten extents, which count as a hole too).
        assert os.lseek(fd, 2 * MiB + 4096, os.SEEK_HOLE) == 3 * MiB
    finally:
        os.close(fd)
    assert daemon.stop() == 0
    # Straight from the image (debugfs, no mount): the punched ranges are zeros, the rest kept.
    data = subprocess.run(
        ["debugfs", "-R", "cat /disk", str(src)], check=True, capture_output=True
    ).stdout
    assert len(data) == 6 * MiB
    assert data[MiB : 2 * MiB] == b"\0" * MiB and data[3 * MiB : 4 * MiB] == b"\0" * MiB
    assert data[2 * MiB : 3 * MiB] == b"\x33" * MiB


def test_setattr_size_and_times(daemon: Daemon) -> None:
    src = daemon.add_bind_export("gold", {"disk": b"x" * 10000})
    daemon.start()
    vol = daemon.volume("gold", "disk")
    os.truncate(vol, 4096)
    assert (src / "disk").stat().st_size == 4096
    with open(vol, "r+b") as f:
        os.ftruncate(f.fileno(), 3 * MiB)
    assert (src / "disk").stat().st_size == 3 * MiB
    os.utime(vol, ns=(1_000_000_000_000_000_000, 1_500_000_000_123_456_789))
    st = (src / "disk").stat()
    assert st.st_mtime_ns == 1_500_000_000_123_456_789
    assert st.st_atime_ns == 1_000_000_000_000_000_000
    wait_for(lambda: os.stat(vol).st_size == 3 * MiB, 5, "the new size through the mount")


def test_statfs_sums_mounted_exports(daemon: Daemon) -> None:
    daemon.add_ext4_export("img", {"disk": b"x"})
    daemon.start()
    idle = os.statvfs(daemon.mnt)
    assert idle.f_blocks == 0  # nothing mounted
    with open(daemon.volume("img", "disk"), "rb"):
        busy = os.statvfs(daemon.mnt)
        backing = os.statvfs(daemon.target("img"))
        assert busy.f_blocks * busy.f_frsize == backing.f_blocks * backing.f_frsize
        assert busy.f_namemax == 255


def test_other_users_get_access_by_file_mode(daemon: Daemon) -> None:
    src = daemon.add_bind_export("gold", {"public": b"readable\n", "private": b"secret\n"})
    (src / "public").chmod(0o644)
    (src / "private").chmod(0o600)
    # pytest's tmp dirs are 0700: serve at a mountpoint other users can reach.
    PUBLIC_DIR.mkdir(mode=0o755, exist_ok=True)
    PUBLIC_DIR.chmod(0o755)
    daemon.mnt = Path(tempfile.mkdtemp(dir=PUBLIC_DIR))
    daemon.mnt.chmod(0o755)
    daemon.start()
    ok = as_nobody("cat", daemon.volume("gold", "public"))
    assert ok.returncode == 0 and ok.stdout == "readable\n"
    denied = as_nobody("cat", daemon.volume("gold", "private"))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    write = as_nobody("sh", "-c", f"echo x >> {daemon.volume('gold', 'public')}")
    assert write.returncode != 0 and "Permission denied" in write.stderr
    assert (src / "public").read_bytes() == b"readable\n"


def test_read_only_export(daemon: Daemon) -> None:
    src = daemon.add_bind_export("ro", {"disk": b"data"})
    daemon.exports["ro"]["read_only"] = True
    daemon.start()
    vol = daemon.volume("ro", "disk")
    with pytest.raises(OSError) as exc:
        open(vol, "r+b")
    assert exc.value.errno == errno.EROFS
    with open(vol, "rb") as f:
        assert f.read() == b"data"
        # The backing mount itself is read-only too.
        with pytest.raises(OSError) as exc:
            open(daemon.target("ro") / "disk", "r+b")
        assert exc.value.errno == errno.EROFS
    assert daemon.xattr(daemon.volumes("ro"), "read_only") == "1"
    assert (src / "disk").read_bytes() == b"data"


def test_namespace_is_owned_by_storage(daemon: Daemon) -> None:
    src = daemon.add_bind_export("gold", {"disk": b"d", ".hidden": b"h"})
    (src / "subdir").mkdir()
    (src / "link").symlink_to(src / "disk")
    daemon.start()
    exp = daemon.volumes("gold")
    # Only top-level regular files without a leading dot are volumes.
    assert os.listdir(exp) == ["disk"]
    for name in (".hidden", "subdir", "link"):
        assert not (exp / name).exists()
    for op in (
        lambda: open(exp / "new", "w"),
        lambda: os.mkdir(exp / "d"),
        lambda: os.unlink(exp / "disk"),
        lambda: os.rename(exp / "disk", exp / "disk2"),
        lambda: os.symlink("disk", exp / "s"),
        lambda: os.link(exp / "disk", exp / "hard"),
        lambda: os.mkdir(daemon.mnt / "volumes" / "newexport"),
    ):
        with pytest.raises(OSError) as exc:
            op()
        assert exc.value.errno == errno.EPERM, (op, exc.value)
    assert sorted(os.listdir(src)) == [".hidden", "disk", "link", "subdir"]


def test_inodes_and_readdir_offsets_are_stable(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {f"v{i:02d}": b"x" for i in range(40)})
    daemon.write_config(linger=5)
    daemon.start()
    exp = daemon.volumes("gold")
    first = {e.name: e.inode() for e in os.scandir(exp)}
    assert len(first) == 40 and len(set(first.values())) == 40
    assert {n: os.stat(exp / n).st_ino for n in first} == first
    # A second listing returns the same inodes in the same order.
    assert [e.name for e in os.scandir(exp)] == list(first)
    # Restart the daemon: the inodes are derived from the names, not from the backing fs.
    assert daemon.stop() == 0
    daemon.start()
    assert {e.name: e.inode() for e in os.scandir(exp)} == first
