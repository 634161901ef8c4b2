"""Tier (a): partition nodes made from sysfs where /dev is not a devtmpfs.

fusemux.core.partitions makes ``/dev/loopNpM`` with mknod when the kernel does not (a plain
tmpfs /dev in a container or chroot). Here the "sysfs" is a directory tree of the same shape
and the "/dev" is the test's temporary directory (not a devtmpfs), so the real mknod, chown,
xattr and unlink calls run without touching a real block device. Root only (mknod of a
block node).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from fusemux.core import partitions

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mknod of block nodes needs root")


def fake_disk(tmp_path: Path, parts: dict[int, str]) -> tuple[str, Path]:
    """A stand-in whole device ``loop9`` (mode 0640, group 6) and its sysfs partitions."""
    devdir = tmp_path / "dev"
    devdir.mkdir()
    dev = devdir / "loop9"
    dev.write_bytes(b"")
    os.chown(dev, 0, 6)
    dev.chmod(0o640)
    sys_block = tmp_path / "sys" / "block"
    for number, majmin in parts.items():
        d = sys_block / "loop9" / f"loop9p{number}"
        d.mkdir(parents=True)
        (d / "dev").write_text(majmin + "\n")
    return str(dev), sys_block


def test_temporary_directory_is_not_devtmpfs(tmp_path: Path) -> None:
    assert not partitions.kernel_makes_nodes(str(tmp_path / "loop9"))


def test_makes_missing_nodes_from_sysfs_and_removes_only_its_own(tmp_path: Path) -> None:
    dev, sys_block = fake_disk(tmp_path, {1: "259:101", 2: "259:102", 3: "259:103"})
    # Partition 3's node exists already (say, an admin made it right): it is kept, not ours.
    os.mknod(dev + "p3", stat.S_IFBLK | 0o600, os.makedev(259, 103))

    nodes = partitions.make_missing_nodes(dev, [1, 2, 3], sys_block)

    assert nodes == [dev + "p1", dev + "p2", dev + "p3"]
    for number in (1, 2):
        st = os.lstat(f"{dev}p{number}")
        assert stat.S_ISBLK(st.st_mode)
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (259, 100 + number)
        assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (0, 6)
    # Again: nothing changes.
    assert partitions.make_missing_nodes(dev, [1, 2, 3], sys_block) == nodes

    partitions.remove_own_nodes(dev, [1, 2, 3])
    assert not os.path.lexists(dev + "p1") and not os.path.lexists(dev + "p2")
    assert stat.S_ISBLK(os.lstat(dev + "p3").st_mode)


def test_foreign_node_with_another_number_is_an_error_and_left_alone(tmp_path: Path) -> None:
    dev, sys_block = fake_disk(tmp_path, {1: "259:101"})
    os.mknod(dev + "p1", stat.S_IFBLK | 0o600, os.makedev(259, 999))
    with pytest.raises(OSError) as e:
        partitions.make_missing_nodes(dev, [1], sys_block)
    assert e.value.errno == errno.EEXIST and "not made by fusemux" in str(e.value)
    assert os.lstat(dev + "p1").st_rdev == os.makedev(259, 999)
    partitions.remove_own_nodes(dev, [1])
    assert os.path.lexists(dev + "p1")


def test_partition_unknown_to_sysfs_is_a_clear_error(tmp_path: Path) -> None:
    dev, sys_block = fake_disk(tmp_path, {})
    with pytest.raises(OSError, match="shows no partition"):
        partitions.make_missing_nodes(dev, [1], sys_block)
    assert not os.path.lexists(dev + "p1")


def test_leftover_of_an_earlier_process_is_found_by_its_mark(tmp_path: Path) -> None:
    """A daemon killed with SIGKILL leaves its nodes; the next one knows them by the xattr."""
    dev, sys_block = fake_disk(tmp_path, {1: "259:101"})
    partitions.make_missing_nodes(dev, [1], sys_block)
    try:
        os.getxattr(dev + "p1", partitions.NODE_MARK)
    except OSError:
        pytest.skip("no trusted.* xattrs on this filesystem")
    partitions._made.clear()  # what a new process starts with
    # The partition came back with another number: the leftover node is replaced.
    (sys_block / "loop9" / "loop9p1" / "dev").write_text("259:7\n")
    partitions.make_missing_nodes(dev, [1], sys_block)
    assert os.lstat(dev + "p1").st_rdev == os.makedev(259, 7)
    partitions._made.clear()
    partitions.remove_own_nodes(dev, [1])
    assert not os.path.lexists(dev + "p1")
