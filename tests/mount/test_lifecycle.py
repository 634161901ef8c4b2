"""Tier (c): export mount lifecycle through the real daemon over real kernel mounts.

Covers lazy mount on first open, unmount after the last close (linger 0, and not before),
linger cancellation, independent exports, loop-mounted ext4 exports, failing and hanging
mounts, a Cinder shares file, clean SIGTERM shutdown and an external unmount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from fusemux.config import share_export_name
from tests.mount.harness import Daemon, loops_backed_by, mounted_at, run, stays, wait_for

VOL = b"volume-data\n" * 100


def test_lazy_mount_on_first_open(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"vol1": VOL})
    daemon.add_bind_export("silver", {"vol2": VOL})
    daemon.start()
    assert mounted_at(daemon.mnt) == ["fuse.fusemux"]
    # Listing /volumes shows every export and mounts nothing.
    assert sorted(os.listdir(daemon.mnt / "volumes")) == ["gold", "silver"]
    assert not daemon.backing_mounted("gold") and not daemon.backing_mounted("silver")
    assert daemon.state_of("gold") == "unmounted"
    assert daemon.xattr(daemon.volumes("gold"), "mount_count") == "0"

    with open(daemon.volume("gold", "vol1"), "rb") as f:
        assert daemon.backing_mounted("gold")
        assert not daemon.backing_mounted("silver")
        assert daemon.state_of("gold") == "mounted"
        assert daemon.xattr(daemon.volumes("gold"), "holders") == "1"
        assert f.read() == VOL
    daemon.wait_unmounted("gold")


def test_unmount_after_last_close_not_before(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL, "b": VOL})
    daemon.write_config(linger=0)
    daemon.start()
    fa = os.open(daemon.volume("gold", "a"), os.O_RDONLY)
    fb = os.open(daemon.volume("gold", "b"), os.O_RDONLY)
    try:
        assert daemon.backing_mounted("gold")
        os.close(fa)
        fa = -1
        # One handle is still open: the export must stay mounted, whatever the timing.
        assert stays(lambda: daemon.backing_mounted("gold"), 1.0)
        assert os.pread(fb, 11, 0) == b"volume-data"
        assert daemon.xattr(daemon.volumes("gold"), "holders") == "1"
    finally:
        if fa >= 0:
            os.close(fa)
        os.close(fb)
    daemon.wait_unmounted("gold")
    assert daemon.xattr(daemon.volumes("gold"), "holders") == "0"
    assert daemon.xattr(daemon.volumes("gold"), "last_error") == ""


def test_linger_keeps_mount_and_reopen_cancels_unmount(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.write_config(linger=4.0)
    daemon.start()
    vol = daemon.volume("gold", "a")
    with open(vol, "rb"):
        pass
    assert daemon.backing_mounted("gold")
    # RELEASE reaches the daemon after close() returned: wait for it.
    wait_for(lambda: daemon.xattr(daemon.volumes("gold"), "holders") == "0", 5, "release")
    # Re-open inside the linger: the pending unmount is cancelled.
    time.sleep(1.0)
    with open(vol, "rb") as f:
        assert stays(lambda: daemon.backing_mounted("gold"), 4.5)
        assert f.read(11) == b"volume-data"
    assert daemon.xattr(daemon.volumes("gold"), "mount_count") == "1"
    # After the last close, the linger runs out and the export goes.
    daemon.wait_unmounted("gold", timeout=10)
    assert daemon.xattr(daemon.volumes("gold"), "mount_count") == "1"


def test_two_exports_independent(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.add_bind_export("silver", {"b": VOL})
    daemon.start()
    fa = open(daemon.volume("gold", "a"), "rb")
    try:
        assert daemon.backing_mounted("gold") and not daemon.backing_mounted("silver")
        with open(daemon.volume("silver", "b"), "rb") as fb:
            assert daemon.backing_mounted("silver")
            assert fb.read() == VOL
        daemon.wait_unmounted("silver")
        assert daemon.backing_mounted("gold")
        assert fa.read() == VOL
    finally:
        fa.close()
    daemon.wait_unmounted("gold")


def loops_backing(image: Path) -> list[str]:
    return loops_backed_by(lambda backing: backing == str(image))


def test_ext4_image_export_mounts_with_loop_and_releases_it(daemon: Daemon) -> None:
    image = daemon.add_ext4_export("img", {"disk.raw": b"\0" * 65536})
    daemon.start()
    assert not loops_backing(image)
    with open(daemon.volume("img", "disk.raw"), "r+b") as f:
        assert mounted_at(daemon.target("img")) == ["ext4"]
        assert loops_backing(image)
        f.write(b"through-fusemux")
    daemon.wait_unmounted("img")
    wait_for(lambda: not loops_backing(image), 10, "the loop device to be released")
    # The data reached the ext4 image: read it back with debugfs, without mounting.
    out = run("debugfs", "-R", "cat /disk.raw", str(image)).stdout
    assert out.startswith("through-fusemux")


def test_failing_mount_returns_errno_and_keeps_no_holder(daemon: Daemon) -> None:
    daemon.add_bind_export("good", {"a": VOL})
    daemon.exports["nosource"] = {
        "source": str(daemon.base / "does-not-exist"),
        "fstype": "none",
        "options": "bind",
    }
    daemon.exports["nohelper"] = {"source": "x:/y", "fstype": "fusemuxnosuchfs"}
    daemon.allowed_warnings = [r"export (nosource|nohelper): mount of .* failed"]
    daemon.start()
    for export, expected in (("nosource", errno.ENXIO), ("nohelper", errno.ENODEV)):
        for _ in range(2):  # the second open retries the mount and fails the same way
            with pytest.raises(OSError) as exc:
                open(daemon.volume(export, "vol"), "rb")
            assert exc.value.errno == expected, (export, exc.value)
        assert daemon.state_of(export) == "failed"
        assert daemon.xattr(daemon.volumes(export), "holders") == "0"
        last_error = daemon.xattr(daemon.volumes(export), "last_error")
        assert last_error.startswith("mount failed:"), last_error
    assert "does not exist" in daemon.xattr(daemon.volumes("nosource"), "last_error")
    assert "fusemuxnosuchfs" in daemon.xattr(daemon.volumes("nohelper"), "last_error")
    assert not daemon.backing_mounted("nosource")
    # Other exports keep serving.
    with open(daemon.volume("good", "a"), "rb") as f:
        assert f.read() == VOL
    daemon.wait_unmounted("good")


@pytest.fixture
def hanging_mount_helper(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A mount helper /sbin/mount.<fstype> that hangs forever (removed afterwards)."""
    fstype = f"fmxhang{os.getpid()}"
    helper = Path(f"/sbin/mount.{fstype}")
    pidfile = tmp_path / "helper.pid"
    helper.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 600\n")
    helper.chmod(0o755)
    try:
        yield fstype, pidfile
    finally:
        helper.unlink()


def test_hanging_mount_is_killed_at_mount_timeout(
    daemon: Daemon, hanging_mount_helper: tuple[str, Path]
) -> None:
    fstype, pidfile = hanging_mount_helper
    daemon.add_bind_export("good", {"a": VOL})
    daemon.exports["hang"] = {"source": "server:/export", "fstype": fstype}
    daemon.write_config(mount_timeout=1.5)
    daemon.allowed_warnings = [r"export hang: mount of .* failed: .*timed out"]
    daemon.start()
    t0 = time.monotonic()
    with pytest.raises(OSError) as exc:
        open(daemon.volume("hang", "vol"), "rb")
    elapsed = time.monotonic() - t0
    assert exc.value.errno == errno.ETIMEDOUT
    assert elapsed < 10, elapsed  # bounded by mount_timeout, not by the helper
    helper_pid = int(pidfile.read_text())
    wait_for(lambda: not Path(f"/proc/{helper_pid}").exists(), 5, "the helper to be killed")
    assert daemon.state_of("hang") == "failed"
    assert "timed out" in daemon.xattr(daemon.volumes("hang"), "last_error")
    assert daemon.xattr(daemon.volumes("hang"), "holders") == "0"
    assert not daemon.backing_mounted("hang")
    with open(daemon.volume("good", "a"), "rb") as f:
        assert f.read() == VOL


def test_cinder_shares_file(daemon: Daemon) -> None:
    # A shares-file address must look like host:/export; a directory named "srv:" holding
    # "vols" gives a real path of that form for a bind mount.
    src = daemon.base / "srv:" / "vols"
    src.mkdir(parents=True)
    (src / "volume-1234").write_bytes(VOL)
    address = str(daemon.base / "srv:") + "/vols"
    shares = daemon.base / "nfs_shares"
    shares.write_text(f"# cinder shares\n\n{address} -o bind\n")
    daemon.write_config(shares_file=str(shares), shares_fstype="none")
    daemon.start()
    name = share_export_name(address)
    assert os.listdir(daemon.mnt / "volumes") == [name]
    assert daemon.xattr(daemon.volumes(name), "source") == address
    with open(daemon.volume(name, "volume-1234"), "rb") as f:
        assert f.read() == VOL
    daemon.wait_unmounted(name)


def test_second_sigterm_with_open_volume_unmounts_everything(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.add_ext4_export("img", {"b": VOL})
    daemon.write_config(linger=30)
    daemon.allowed_warnings = [r"still open: gold/a", r"NOT stopping"]
    if daemon.passthrough:  # see test_control.PASSTHROUGH_HELD_AT_STOP
        daemon.allowed_warnings += [r"target is busy", r"detaching it lazily"]
    daemon.start()
    f = open(daemon.volume("gold", "a"), "rb")
    try:
        with open(daemon.volume("img", "b"), "rb"):
            pass
        assert daemon.backing_mounted("gold") and daemon.backing_mounted("img")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)  # refused: a volume is open
        wait_for(lambda: "NOT stopping" in daemon.log(), 10, "the refusal")
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0  # the second signal stops it
        if daemon.passthrough:
            # The kernel holds the backing file: the holder keeps reading it.
            assert f.read() == VOL
        else:
            # The holder's fd outlived the daemon: its I/O now fails instead of hanging.
            with pytest.raises(OSError) as exc:
                f.read()
            assert exc.value.errno == errno.ENOTCONN
    finally:
        with contextlib.suppress(OSError):
            f.close()  # the implicit FLUSH fails with ENOTCONN as well
    assert daemon.leftover_mounts() == []
    log = daemon.log()
    assert "shutting down with 1 volume(s) still open: gold/a" in log
    assert "stopped cleanly" in log


def test_external_unmount_stops_daemon_cleanly(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.write_config(linger=30)
    daemon.start()
    with open(daemon.volume("gold", "a"), "rb"):
        pass
    assert daemon.backing_mounted("gold")
    # Unmounting right after a close races the RELEASE: the daemon must take that in stride.
    run("fusermount3", "-u", daemon.mnt)
    assert daemon.proc is not None
    assert daemon.proc.wait(30) == 0
    assert daemon.leftover_mounts() == []


def test_refuses_a_mountpoint_that_already_has_fusemux(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.start()
    second = run(
        sys.executable,
        "-m",
        "fusemux",
        "serve",
        daemon.mnt,
        "--config",
        daemon.config_path,
        check=False,
    )
    assert second.returncode == 1
    assert daemon.proc is not None
    assert f"already served by fusemux (pid {daemon.proc.pid})" in second.stderr
    assert "Traceback" not in second.stderr


def test_sigint_stops_cleanly_like_sigterm(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.write_config(linger=30)
    daemon.start()
    with open(daemon.volume("gold", "a"), "rb") as f:
        assert f.read() == VOL
    wait_for(lambda: daemon.xattr(daemon.volumes("gold"), "holders") == "0", 5, "release")
    assert daemon.backing_mounted("gold")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(30) == 0
    assert daemon.leftover_mounts() == []
    assert "received SIGINT" in daemon.log()
