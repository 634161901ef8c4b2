"""Tier (c): image xattrs and block mappings over a real mount, real loop devices and qemu.

Images are made with qemu-img/qemu-io, partition tables with sfdisk, filesystems with
mkfs.ext4. Mappings are requested with setfattr or ``fusemux map``; their content is checked
through the kernel (a mounted partition) or through the NBD URI with ``qemu-img compare``.
Every test ends with no loop device backed by its files, no qemu-nbd process and no socket
(the ``mapped`` fixture checks this after the daemon has stopped).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusemux.core import nbd
from fusemux.core.mounter import MNT_DETACH, umount2
from tests.conftest import PUBLIC_DIR
from tests.mount.harness import Daemon, as_nobody, loops_backed_by, mounted_at, run, wait_for

P = "user.fusemux."
MIB = 1 << 20

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-io", "qemu-nbd", "sfdisk", "setfattr")),
    reason="needs qemu-utils, fdisk and attr",
)


def loops_under(base: Path) -> list[str]:
    """Loop devices whose backing file lies under *base*."""
    return loops_backed_by(lambda backing: backing.startswith(str(base) + "/"))


def alive(pid: int) -> bool:
    """Whether *pid* is a live (non-zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def getx(path: Path, key: str) -> str:
    return os.getxattr(path, P + key).decode()


def set_errno(path: Path, key: str, value: bytes) -> int:
    try:
        os.setxattr(path, P + key, value)
    except OSError as e:
        return e.errno or 0
    return 0


def unmap_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.setxattr(path, P + "unmap", b"")


@pytest.fixture
def mapped(daemon: Daemon) -> Iterator[Daemon]:
    """The daemon fixture, plus: after the test, nothing of a mapping is left behind."""
    yield daemon
    if daemon.proc is not None and daemon.proc.poll() is None:
        rc = daemon.stop()
        assert rc == 0, f"daemon exited {rc}:\n{daemon.log()}"
    assert loops_under(daemon.base) == [], "loop devices left behind"
    nbd_dir = daemon.state / "nbd"
    left = sorted(p.name for p in nbd_dir.iterdir()) if nbd_dir.exists() else []
    assert left == [], f"files left in {nbd_dir}: {left}"


# -- image xattrs --------------------------------------------------------------------------


def test_format_chain_and_active_image(mapped: Daemon) -> None:
    d = mapped
    src = d.add_bind_export("gold")
    run("qemu-img", "create", "-q", "-f", "raw", src / "plain.raw", "3M")
    run("qemu-img", "create", "-q", "-f", "qcow2", src / "disk.qcow2", "1G")
    # A Cinder snapshot chain: volume-1 (raw) <- volume-1.s1 <- volume-1.s2 (active).
    run("qemu-img", "create", "-q", "-f", "raw", src / "volume-1", "64M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "volume-1", "-F", "raw",
        src / "volume-1.s1")  # fmt: skip
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "volume-1.s1", "-F", "qcow2",
        src / "volume-1.s2")  # fmt: skip
    info = {"active": "volume-1.s2", "s1": "volume-1.s1", "s2": "volume-1.s2"}
    (src / "volume-1.info").write_text(json.dumps(info))
    run("qemu-img", "create", "-q", "-f", "raw", src / "volume-2", "1M")
    (src / "volume-2.info").write_text("{broken")
    d.allowed_warnings.append(r"volume-2\.info is not a Cinder \.info file")
    d.write_config(linger=0)
    d.start()

    plain = d.volume("gold", "plain.raw")
    assert getx(plain, "format") == "raw"
    assert getx(plain, "virtual_size") == str(3 * MIB)
    assert getx(plain, "backing_file") == "" and getx(plain, "chain") == "plain.raw"
    assert getx(plain, "active_image") == ""

    qcow = d.volume("gold", "disk.qcow2")
    assert getx(qcow, "format") == "qcow2"
    assert getx(qcow, "virtual_size") == str(1 << 30)
    assert os.stat(qcow).st_size < MIB  # the virtual size comes from the header

    top = d.volume("gold", "volume-1.s2")
    assert getx(top, "format") == "qcow2"
    assert getx(top, "backing_file") == "volume-1.s1"
    assert getx(top, "chain") == "volume-1.s2,volume-1.s1,volume-1"
    assert getx(top, "virtual_size") == str(64 * MIB)
    assert getx(d.volume("gold", "volume-1.s1"), "chain") == "volume-1.s1,volume-1"
    base = d.volume("gold", "volume-1")
    assert getx(base, "active_image") == "volume-1.s2"
    assert getx(base, "chain") == "volume-1"

    # What qemu-img says about the same files, through the fusemux mount.
    qi = json.loads(run("qemu-img", "info", "--output=json", "-U", top).stdout)
    assert qi["format"] == getx(top, "format")
    assert qi["virtual-size"] == int(getx(top, "virtual_size"))
    assert qi["backing-filename"] == getx(top, "backing_file")

    broken = d.volume("gold", "volume-2")
    assert getx(broken, "active_image") == ""  # malformed .info: empty, never an error
    assert getx(broken, "format") == "raw"

    # The cache follows the file: rewrite the .info and the value changes.
    info["active"] = "volume-1.s1"
    (src / "volume-1.info").write_text(json.dumps(info))
    assert getx(base, "active_image") == "volume-1.s1"
    keys = {k.removeprefix(P) for k in os.listxattr(base)}
    assert {"format", "virtual_size", "backing_file", "chain", "active_image", "mapping"} <= keys


# -- loop mappings ------------------------------------------------------------------------


def make_partitioned_disk(path: Path, work: Path) -> None:
    """A 64 MiB raw disk: GPT, partition 1 (20 MiB at 1 MiB) with ext4 holding hello.txt."""
    with open(path, "wb") as f:
        f.truncate(64 * MIB)
    run("sfdisk", "-q", path, input="label: gpt\nstart=2048, size=40960, type=L\nsize=8192\n")
    content = work / "p1-content"
    content.mkdir()
    (content / "hello.txt").write_text("hello from partition 1\n")
    fs = work / "p1.ext4"
    run("mkfs.ext4", "-q", "-F", "-d", content, fs, "20M")
    run("dd", f"if={fs}", f"of={path}", "bs=1M", "seek=1", "conv=notrunc", "status=none")
    fs.unlink()


def test_partitioned_raw_volume_over_loop(mapped: Daemon, tmp_path: Path) -> None:
    d = mapped
    src = d.add_bind_export("gold")
    make_partitioned_disk(src / "disk.raw", tmp_path)
    d.write_config(linger=0.5)
    d.start()
    vol = d.volume("gold", "disk.raw")
    target = tmp_path / "p1"
    target.mkdir()
    try:
        out = run(sys.executable, "-m", "fusemux", "map", vol, "--kind", "loop", "--ro",
                  "--partitions").stdout.split()  # fmt: skip
        device = out[0]
        assert device.startswith("/dev/loop") and out[1:] == [f"{device}p1", f"{device}p2"]
        assert getx(vol, "mapping") == ",".join(out)
        assert getx(vol, "mapping_options") == "loop,ro,partitions"
        assert getx(d.volumes("gold"), "mapped_volumes") == "disk.raw"
        name = os.path.basename(device)
        # The loop device is on the file in the private export mount, not on the FUSE mount.
        backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
        assert backing == str(d.target("gold") / "disk.raw")
        assert Path(f"/sys/block/{name}/ro").read_text().strip() == "1"
        assert int(Path(f"/sys/block/{name}/{name}p1/size").read_text()) == 40960

        run("mount", "-t", "ext4", "-o", "ro", f"{device}p1", target)
        assert (target / "hello.txt").read_text() == "hello from partition 1\n"
        # In use: the unmap is refused and the mapping stays.
        assert set_errno(vol, "unmap", b"") == errno.EBUSY
        assert getx(vol, "mapping") == ",".join(out)
        status = json.loads(run(sys.executable, "-m", "fusemux", "status", d.mnt, "--json").stdout)
        (gold,) = status["exports"]
        assert gold["mappings"] == [
            {"name": "disk.raw", "options": "loop,ro,partitions", "mapping": out, "pid": None}
        ]
        text = run(sys.executable, "-m", "fusemux", "status", d.mnt).stdout
        assert f"mapped: gold/disk.raw loop,ro,partitions -> {' '.join(out)}" in text
        run("umount", target)

        # The mapping holds the export well past the linger.
        time.sleep(1.5)
        assert d.backing_mounted("gold")
        assert getx(d.volumes("gold"), "holders") == "1"
        assert run(sys.executable, "-m", "fusemux", "unmap", vol).stdout.split() == out
        assert getx(vol, "mapping") == ""
        assert loops_under(d.base) == []
        assert not Path(f"/sys/block/{name}/{name}p1").exists()
        d.wait_unmounted("gold", timeout=15)
    finally:
        if mounted_at(target):
            umount2(str(target), MNT_DETACH)
        unmap_quietly(vol)


def test_auto_maps_raw_to_loop_read_write(mapped: Daemon) -> None:
    d = mapped
    src = d.add_bind_export("gold", {"data.raw": b"\0" * MIB})
    d.write_config(linger=0)
    d.start()
    vol = d.volume("gold", "data.raw")
    try:
        os.setxattr(vol, P + "map", b"auto")
        device = getx(vol, "mapping")
        assert device.startswith("/dev/loop") and getx(vol, "mapping_options") == "loop"
        fd = os.open(device, os.O_WRONLY)
        try:
            os.pwrite(fd, b"written-through-loop", 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        unmap_quietly(vol)
    assert (src / "data.raw").read_bytes()[4096:4116] == b"written-through-loop"


def test_shutdown_unmaps_everything(mapped: Daemon, tmp_path: Path) -> None:
    d = mapped
    src = d.add_bind_export("gold")
    make_partitioned_disk(src / "disk.raw", tmp_path)
    run("qemu-img", "create", "-q", "-f", "qcow2", src / "data.qcow2", "8M")
    d.write_config(linger=0)
    d.start()
    raw, qcow = d.volume("gold", "disk.raw"), d.volume("gold", "data.qcow2")
    os.setxattr(raw, P + "map", b"loop,partitions")
    os.setxattr(qcow, P + "map", b"auto")
    assert getx(qcow, "mapping_options") == "nbd"
    pid = int(getx(qcow, "mapping_pid"))
    device = getx(raw, "mapping").split(",")[0]
    assert d.stop() == 0
    assert loops_under(d.base) == []
    assert not Path(f"/proc/{pid}").exists()
    assert not Path(f"/sys/block/{os.path.basename(device)}/{os.path.basename(device)}p1").exists()
    log = d.log()
    assert "unmapped gold/disk.raw at shutdown" in log
    assert "unmapped gold/data.qcow2 at shutdown" in log
    assert log.index("unmapped gold/disk.raw at shutdown") < log.index("export gold: unmounted")


# -- nbd mappings -------------------------------------------------------------------------


def test_qcow2_over_nbd_and_supervisor_restart(mapped: Daemon, tmp_path: Path) -> None:
    d = mapped
    src = d.add_bind_export("gold")
    image = src / "data.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 5M 512k",
        "-c", "write -P 0x11 15M 4k", image)  # fmt: skip
    expected = tmp_path / "converted.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, expected)
    d.allowed_warnings.append(r"gold/data\.qcow2: qemu-nbd \(pid \d+\) exited; restarting")
    d.write_config(linger=0)
    d.start()
    vol = d.volume("gold", "data.qcow2")
    pids: list[int] = []
    try:
        out = run(sys.executable, "-m", "fusemux", "map", vol, "--kind", "nbd").stdout.split()
        uri = out[0]
        assert uri.startswith("nbd+unix:///?socket=" + str(d.state / "nbd") + "/")
        assert uri.endswith(".sock") and getx(vol, "mapping") == uri
        sock = Path(uri.split("socket=", 1)[1])
        pid = int(getx(vol, "mapping_pid"))
        pids.append(pid)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert os.path.basename(cmdline[0]) == b"qemu-nbd"
        assert str(d.target("gold") / "data.qcow2").encode() in cmdline  # the private mount
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, expected)

        os.kill(pid, signal.SIGKILL)
        new = wait_for(
            lambda: (v := getx(vol, "mapping_pid")) and int(v) != pid and int(v), 15, "a restart"
        )
        pids.append(new)
        wait_for(lambda: not alive(pid), 5, "the killed qemu-nbd to be reaped")
        assert not Path(f"/proc/{pid}").exists()  # reaped, not a zombie
        wait_for(sock.exists, 10, "the socket again")
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, expected)
        assert set_errno(vol, "map", b"nbd") == errno.EBUSY

        os.setxattr(vol, P + "unmap", b"")
        assert getx(vol, "mapping") == "" and getx(vol, "mapping_pid") == ""
        assert not sock.exists()
        assert not any(Path(f"/proc/{p}").exists() for p in pids)
    finally:
        unmap_quietly(vol)


@pytest.mark.skipif(
    not nbd.kernel_has_nbd(), reason="this kernel has no nbd module (/sys/module/nbd, /dev/nbd0)"
)
def test_nbd_mapping_attaches_a_kernel_device(mapped: Daemon, tmp_path: Path) -> None:
    d = mapped
    src = d.add_bind_export("gold")
    image = src / "data.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", image)
    d.write_config(linger=0)
    d.start()
    vol = d.volume("gold", "data.qcow2")
    try:
        os.setxattr(vol, P + "map", b"nbd,ro")
        uri, device = getx(vol, "mapping").split(",")
        assert uri.startswith("nbd+unix:///") and device.startswith("/dev/nbd")
        wait_for(lambda: int(Path(f"/sys/block/{device[5:]}/size").read_text()) > 0, 10)
        with open(device, "rb") as f:
            assert f.read(MIB) == b"\x5a" * MIB
    finally:
        unmap_quietly(vol)


# -- bad input and rights -----------------------------------------------------------------


def nobody_runs(*argv: str | Path) -> tuple[int, str]:
    r = as_nobody(*argv)
    return r.returncode, r.stderr


def test_bad_requests_and_rights(mapped: Daemon) -> None:
    d = mapped
    src = d.add_bind_export("gold", {"open.raw": b"\0" * MIB, "closed.raw": b"\0" * MIB})
    run("qemu-img", "create", "-q", "-f", "qcow2", src / "q.qcow2", "1M")
    (src / "open.raw").chmod(0o666)  # other users may write it: their setxattr reaches us
    (src / "closed.raw").chmod(0o644)
    PUBLIC_DIR.mkdir(mode=0o755, exist_ok=True)
    PUBLIC_DIR.chmod(0o755)
    d.mnt = Path(tempfile.mkdtemp(dir=PUBLIC_DIR))
    d.mnt.chmod(0o755)
    d.write_config(linger=0)
    d.start()
    vol = d.volume("gold", "open.raw")
    try:
        for bad in (b"", b"tape", b"loop,rw", b"nbd,partitions", b"loop,ro,ro", b"Loop"):
            assert set_errno(vol, "map", bad) == errno.EINVAL, bad
        assert set_errno(d.volume("gold", "q.qcow2"), "map", b"loop") == errno.EINVAL
        assert set_errno(vol, "unmap", b"x") == errno.EINVAL
        assert set_errno(vol, "unmap", b"") == errno.ENXIO  # nothing mapped
        assert "refused: unknown mapping kind 'tape'" in d.log()

        rc, err = nobody_runs("setfattr", "-n", P + "map", "-v", "loop", vol)
        assert rc != 0 and "Operation not permitted" in err
        # Without write permission the kernel refuses first (default_permissions): EACCES.
        rc, err = nobody_runs(
            "setfattr", "-n", P + "map", "-v", "loop", d.volume("gold", "closed.raw")
        )
        assert rc != 0 and "Permission denied" in err
        assert getx(vol, "mapping") == ""

        os.setxattr(vol, P + "map", b"loop")
        assert set_errno(vol, "map", b"loop") == errno.EBUSY
        assert set_errno(vol, "map", b"nbd") == errno.EBUSY
        rc, err = nobody_runs("setfattr", "-n", P + "unmap", "-v", "", vol)
        assert rc != 0 and "Operation not permitted" in err
        assert getx(vol, "mapping").startswith("/dev/loop")
        cli = run(sys.executable, "-m", "fusemux", "map", vol, check=False)
        assert cli.returncode == 1 and "Device or resource busy" in cli.stderr
        os.setxattr(vol, P + "unmap", b"")
        cli = run(sys.executable, "-m", "fusemux", "unmap", vol, check=False)
        assert cli.returncode == 1 and "No such device or address" in cli.stderr
    finally:
        unmap_quietly(vol)


# -- restart after kill -9 ----------------------------------------------------------------


def test_restart_after_kill_cleans_up_leftovers(mapped: Daemon) -> None:
    d = mapped
    d.add_bind_export("gold", {"disk.raw": b"\0" * MIB})
    src = d.add_bind_export("silver")
    run("qemu-img", "create", "-q", "-f", "qcow2", src / "data.qcow2", "8M")
    d.write_config(linger=0)
    d.start()
    raw, qcow = d.volume("gold", "disk.raw"), d.volume("silver", "data.qcow2")
    os.setxattr(raw, P + "map", b"loop")
    os.setxattr(qcow, P + "map", b"nbd")
    device = getx(raw, "mapping")
    pid = int(getx(qcow, "mapping_pid"))
    sock = Path(getx(qcow, "mapping").split("socket=", 1)[1])
    try:
        d.kill()  # SIGKILL: nothing is unmapped
        assert loops_under(d.state) == [device]
        assert alive(pid) and sock.exists()
        d.allowed_warnings += [
            r"detaching leftover loop device",
            r"stopped leftover qemu-nbd",
            r"clearing the stale fusemux mount",
            r"adopted the backing mount",
        ]
        d.start()  # clears the stale FUSE mount itself
        assert loops_under(d.base) == []
        assert not alive(pid)  # a zombie at most: it is not the new daemon's child
        assert not sock.exists()
        # The backing mounts were adopted idle and go after the linger (0 here).
        d.wait_unmounted("gold")
        d.wait_unmounted("silver")
        assert getx(raw, "mapping") == "" and getx(qcow, "mapping") == ""
        log = d.log()
        assert f"detaching leftover loop device {device}" in log
        assert f"stopped leftover qemu-nbd (pid {pid})" in log
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
