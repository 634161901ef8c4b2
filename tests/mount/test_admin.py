"""Tier (c): the admin interface: user.fusemux.* xattrs, getfattr, ``fusemux status`` and the
embedded demo.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import xattr

from fusemux import __version__
from tests.mount.harness import Daemon, mounted_at, run, wait_for

VOLUME_KEYS = {"export", "source", "backing_path", "open_count", "openers"}
EXPORT_KEYS = {"state", "source", "fstype", "holders", "mount_count", "last_error"}


def keys(path: Path) -> set[str]:
    return {k.removeprefix("user.fusemux.") for k in xattr.listxattr(str(path))}


def holder_process(path: Path) -> subprocess.Popen[str]:
    """A separate process that opens *path* and keeps it open until killed."""
    code = "import sys,time; f=open(sys.argv[1],'rb'); print('open', flush=True); time.sleep(600)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "open\n"
    return proc


def test_xattrs_on_root_export_and_volume(daemon: Daemon) -> None:
    src = daemon.add_bind_export("gold", {"disk": b"x" * 4096})
    daemon.write_config(linger=0)
    daemon.start()
    root = daemon.mnt
    assert xattr.getxattr(str(root), "user.fusemux.version").decode() == __version__
    assert int(xattr.getxattr(str(root), "user.fusemux.pid")) == daemon.proc.pid  # type: ignore[union-attr]
    assert keys(root) == {"version", "pid", "engine", "engine_stats"}
    assert xattr.getxattr(str(root), "user.fusemux.engine").decode() == daemon.engine

    exp = daemon.volumes("gold")
    assert keys(exp) >= EXPORT_KEYS
    assert "capacity" not in keys(exp)  # only while mounted
    assert daemon.xattr(exp, "source") == str(src)
    assert daemon.xattr(exp, "fstype") == "none"
    with pytest.raises(OSError) as exc:
        daemon.xattr(exp, "capacity")
    assert exc.value.errno == errno.ENODATA

    vol = daemon.volume("gold", "disk")
    holder = holder_process(vol)
    try:
        with open(vol, "rb"):
            assert keys(vol) >= VOLUME_KEYS
            assert daemon.xattr(vol, "export") == "gold"
            assert daemon.xattr(vol, "source") == str(src)
            assert daemon.xattr(vol, "backing_path") == str(daemon.target("gold") / "disk")
            assert daemon.xattr(vol, "open_count") == "2"
            comm = Path(f"/proc/{holder.pid}/comm").read_text().strip()
            mine = Path(f"/proc/{os.getpid()}/comm").read_text().strip()
            openers = daemon.xattr(vol, "openers").split(",")
            assert sorted(openers) == sorted([f"{holder.pid}:{comm}", f"{os.getpid()}:{mine}"])
            assert daemon.xattr(exp, "state") == "mounted"
            assert daemon.xattr(exp, "holders") == "2"
            assert daemon.xattr(exp, "mount_count") == "1"
            assert daemon.xattr(exp, "open_volumes") == "disk"
            backing = os.statvfs(daemon.target("gold"))
            assert int(daemon.xattr(exp, "capacity")) == backing.f_blocks * backing.f_frsize
            assert 0 < int(daemon.xattr(exp, "free")) <= int(daemon.xattr(exp, "capacity"))
        wait_for(lambda: daemon.xattr(vol, "open_count") == "1", 5, "release")
        assert daemon.xattr(vol, "openers") == f"{holder.pid}:{comm}"
    finally:
        holder.kill()
        holder.wait()
    # A killed hypervisor process releases its handle: the kernel tells fusemux.
    daemon.wait_unmounted("gold")
    assert daemon.xattr(vol, "open_count") == "0"
    assert daemon.xattr(vol, "openers") == ""

    for path in (root, exp, vol):
        with pytest.raises(OSError) as exc:
            daemon.xattr(path, "nosuchkey")
        assert exc.value.errno == errno.ENODATA
    with pytest.raises(OSError) as exc:
        xattr.setxattr(str(exp), "user.fusemux.state", b"mounted")
    assert exc.value.errno == errno.EPERM


FOREIGN_XATTRS = (
    "trusted.libvirt.security.ref_dac",
    "trusted.libvirt.security.dac",
    "security.selinux",
    "system.posix_acl_access",
    "user.other",
)
# A valid ACL (u::rw-,g::r--,o::r--): the kernel parses system.posix_acl_* values itself and
# answers EINVAL for anything else before a filesystem is asked.
MINIMAL_ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in ((1, 6), (4, 4), (0x20, 4))
)


def test_foreign_xattrs_answer_eopnotsupp_like_nfs(daemon: Daemon) -> None:
    """Names fusemux can never store get EOPNOTSUPP on get, set and remove, through the
    kernel, on every kind of node, while the volume is open (libvirt's DAC probe) and
    closed; user.fusemux.* keep ENODATA/EPERM; nothing reaches the backing file."""
    src = daemon.add_bind_export("gold", {"disk": b"x" * 4096})
    daemon.write_config(linger=0)
    daemon.start()
    vol = daemon.volume("gold", "disk")
    nodes = (daemon.mnt, daemon.mnt / "volumes", daemon.volumes("gold"), vol)

    def errno_of(call: Callable[..., object], *args: object) -> int:
        try:
            call(*args)
        except OSError as e:
            return e.errno or 0
        return 0

    with open(vol, "r+b") as f:  # libvirt probes while qemu may hold the disk
        for path in nodes:
            for name in FOREIGN_XATTRS:
                p = str(path)
                assert errno_of(os.getxattr, p, name) == errno.EOPNOTSUPP, (p, name)
                value = MINIMAL_ACL if name.startswith("system.posix_acl") else b"1"
                assert errno_of(os.setxattr, p, name, value) == errno.EOPNOTSUPP, (p, name)
                assert errno_of(os.removexattr, p, name) == errno.EOPNOTSUPP, (p, name)
        # The kernel's capability probe before a write must not fail the write.
        f.write(b"y" * 4096)
        f.flush()
        os.fsync(f.fileno())
    p = str(vol)
    assert errno_of(os.getxattr, p, "user.fusemux.nosuchkey") == errno.ENODATA
    assert errno_of(os.setxattr, p, "user.fusemux.open_count", b"1") == errno.EPERM
    assert os.listxattr(src / "disk") == []


def test_getfattr_dump_shows_every_key(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"disk": b"x"})
    daemon.start()
    vol = daemon.volume("gold", "disk")
    with open(vol, "rb"):
        out = run("getfattr", "-d", "-m", "user.fusemux", vol).stdout
        for key in VOLUME_KEYS:
            assert f"user.fusemux.{key}=" in out
        out = run("getfattr", "-d", "-m", "user.fusemux", daemon.volumes("gold")).stdout
        for key in EXPORT_KEYS | {"capacity", "free"}:
            assert f"user.fusemux.{key}=" in out
        assert 'user.fusemux.state="mounted"' in out


def test_status_json_and_text(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"disk": b"x"})
    daemon.add_bind_export("silver", {"other": b"y"})
    daemon.exports["broken"] = {"source": "x:/y", "fstype": "fusemuxnosuchfs"}
    daemon.allowed_warnings = [r"export broken: mount of .* failed"]
    daemon.start()
    with pytest.raises(OSError):
        open(daemon.volume("broken", "v"), "rb")
    with open(daemon.volume("gold", "disk"), "rb"):
        out = run(sys.executable, "-m", "fusemux", "status", daemon.mnt, "--json").stdout
        status = json.loads(out)
        text = run(sys.executable, "-m", "fusemux", "status", daemon.mnt).stdout
    assert status["version"] == __version__
    assert status["pid"] == daemon.proc.pid  # type: ignore[union-attr]
    by_name = {e["name"]: e for e in status["exports"]}
    assert set(by_name) == {"gold", "silver", "broken"}
    gold = by_name["gold"]
    assert gold["state"] == "mounted" and gold["holders"] == 1 and gold["mount_count"] == 1
    assert gold["open_volumes"] == [
        {"name": "disk", "open_count": 1, "openers": [f"{os.getpid()}:" + my_comm()]}
    ]
    assert gold["capacity"] > 0
    assert by_name["silver"]["state"] == "unmounted"
    assert by_name["silver"]["open_volumes"] == []
    assert by_name["broken"]["state"] == "failed"
    assert "fusemuxnosuchfs" in by_name["broken"]["last_error"]
    assert "gold" in text and "mounted" in text and "open: gold/disk" in text
    # Status never mounts anything by itself.
    assert not daemon.backing_mounted("silver")


def my_comm() -> str:
    return Path(f"/proc/{os.getpid()}/comm").read_text().strip()


def test_status_on_a_plain_directory_fails_cleanly(tmp_path: Path) -> None:
    result = run(sys.executable, "-m", "fusemux", "status", tmp_path, check=False)
    assert result.returncode == 1
    assert "not a running fusemux mount" in result.stderr
    assert "Traceback" not in result.stderr


def test_embedded_demo_serves_two_exports(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    mnt = demo / "mnt"
    log = open(tmp_path / "demo.log", "wb")  # handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusemux", "demo", "--dir", str(demo)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    try:
        wait_for(lambda: "fuse.fusemux" in mounted_at(mnt) or proc.poll() is not None, 60)
        assert proc.poll() is None, (tmp_path / "demo.log").read_text()
        assert sorted(os.listdir(mnt / "volumes")) == ["gold", "silver"]
        vols = sorted(os.listdir(mnt / "volumes" / "gold"))
        assert vols == ["vm1-data.qcow2", "vm1-root.raw"]
        info = json.loads(
            run("qemu-img", "info", "--output=json", mnt / "volumes/gold/vm1-data.qcow2").stdout
        )
        assert info["format"] == "qcow2" and info["virtual-size"] == 1 << 30
        out = run(
            "qemu-io", "-f", "raw", "-t", "none",
            "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M",
            mnt / "volumes/gold/vm1-root.raw",
        ).stdout  # fmt: skip
        assert "Pattern verification failed" not in out
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        text = (tmp_path / "demo.log").read_text()
        assert "Try, in another shell" in text and "getfattr" in text
        assert "Traceback" not in text
        left = [m.mountpoint for m in _mounts_under(demo)]
        assert left == [], left
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        from fusemux.core.mounter import MNT_DETACH, umount2

        for m in sorted(_mounts_under(demo), key=lambda m: -len(m.mountpoint)):
            with contextlib.suppress(OSError):
                umount2(m.mountpoint, MNT_DETACH)


def _mounts_under(base: Path) -> list:  # type: ignore[type-arg]
    from fusemux.core.mounter import read_mountinfo

    return [m for m in read_mountinfo() if m.mountpoint.startswith(str(base) + "/")]
