"""Tier (c): the admin's controls and the daemon's process hygiene, through the real daemon.

Covers the ``user.fusemux.ctl`` xattr and its CLI (``fusemux mount|unmount``), the SIGTERM
policy (refuse while volumes are open; a second signal or ``--force`` stops), SIGHUP config
reload, a restart after ``kill -9`` with volumes open (stale FUSE mount cleared, backing
mounts adopted), RLIMIT_NOFILE and reaped mount helpers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import PUBLIC_DIR
from tests.mount.harness import Daemon, as_nobody, mounted_at, run, wait_for

VOL = b"volume-data\n" * 100
CTL = "user.fusemux.ctl"


def ctl(daemon: Daemon, export: str, value: bytes) -> int:
    """setxattr ctl; 0 on success, else the errno."""
    try:
        os.setxattr(daemon.volumes(export), CTL, value)
    except OSError as e:
        return e.errno or -1
    return 0


def fusemux_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "fusemux", *args, check=False)


# -- ctl -------------------------------------------------------------------------------------


def test_ctl_mount_pins_and_unmount_unpins(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.add_bind_export("silver", {"b": VOL})
    daemon.write_config(linger=0)
    daemon.start()
    export = daemon.volumes("gold")
    assert ctl(daemon, "gold", b"mount") == 0
    assert daemon.backing_mounted("gold") and not daemon.backing_mounted("silver")
    assert daemon.xattr(export, "state") == "mounted"
    assert daemon.xattr(export, "pinned") == "1"
    assert daemon.xattr(export, "holders") == "1"
    # Pinning again changes nothing.
    assert ctl(daemon, "gold", b"mount") == 0
    assert daemon.xattr(export, "holders") == "1"
    # With linger 0, an open and close does not unmount a pinned export.
    with open(daemon.volume("gold", "a"), "rb") as f:
        assert f.read() == VOL
        assert daemon.xattr(export, "holders") == "2"
        # Another holder: unmount is refused and nothing changes.
        assert ctl(daemon, "gold", b"unmount") == errno.EBUSY
        assert daemon.xattr(export, "pinned") == "1"
        assert daemon.backing_mounted("gold")
    wait_for(lambda: daemon.xattr(export, "holders") == "1", 5, "the release")
    time.sleep(1.5)  # past the transient grace: still mounted, because pinned
    assert daemon.backing_mounted("gold")
    assert ctl(daemon, "gold", b"unmount") == 0
    # Unmounted at once, not after a linger.
    assert not daemon.backing_mounted("gold")
    assert daemon.xattr(export, "state") == "unmounted"
    assert daemon.xattr(export, "pinned") == "0"
    assert daemon.xattr(export, "holders") == "0"
    # Unmounting an unmounted export is a no-op success.
    assert ctl(daemon, "gold", b"unmount") == 0
    assert "export gold: ctl mount" in daemon.log()


def test_ctl_unmount_ends_a_linger_at_once(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.write_config(linger=300)
    daemon.start()
    with open(daemon.volume("gold", "a"), "rb"):
        pass
    wait_for(lambda: daemon.xattr(daemon.volumes("gold"), "holders") == "0", 5, "release")
    assert daemon.backing_mounted("gold")  # lingering
    assert ctl(daemon, "gold", b"unmount") == 0
    assert not daemon.backing_mounted("gold")


def test_ctl_bad_values_and_non_root(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.write_config(linger=0)
    daemon.allowed_warnings = [r"ctl value .* refused"]
    # pytest's tmp dirs are 0700: serve at a mountpoint other users can reach.
    PUBLIC_DIR.mkdir(mode=0o755, exist_ok=True)
    PUBLIC_DIR.chmod(0o755)
    daemon.mnt = Path(tempfile.mkdtemp(dir=PUBLIC_DIR))
    daemon.mnt.chmod(0o755)
    daemon.start()
    export = daemon.volumes("gold")
    for bad in (b"", b"Mount", b"mount now", b"\xff\xfe", b"umount", b"x" * 4000, b"mo\0unt"):
        assert ctl(daemon, "gold", bad) == errno.EINVAL, bad
    assert daemon.xattr(export, "state") == "unmounted"
    assert daemon.xattr(export, "holders") == "0"
    assert "ctl value 'Mount' refused: expected one of mount, unmount" in daemon.log()
    # Other fusemux keys are read-only; ctl exists on export directories only.
    with pytest.raises(OSError) as info:
        os.setxattr(export, "user.fusemux.state", b"mounted")
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        os.setxattr(daemon.mnt, CTL, b"mount")
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        os.removexattr(export, CTL)
    assert info.value.errno == errno.EPERM
    # A non-root caller gets EPERM (the export directory is sticky, so the kernel's own
    # permission check already answers EPERM) and nothing changes.
    code = (
        "import os,sys\n"
        "try:\n"
        f"    os.setxattr({str(export)!r}, {CTL!r}, b'mount')\n"
        "except OSError as e:\n"
        "    sys.exit(e.errno)\n"
    )
    result = as_nobody("/usr/bin/python3", "-c", code)
    assert result.returncode == errno.EPERM, result.stderr
    assert daemon.xattr(export, "state") == "unmounted"
    assert not daemon.backing_mounted("gold")


def test_ctl_cli(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.write_config(linger=0)
    daemon.start()
    result = fusemux_cli("mount", daemon.mnt, "gold")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "gold: mounted (pinned)"
    assert daemon.backing_mounted("gold")
    with open(daemon.volume("gold", "a"), "rb"):
        busy = fusemux_cli("unmount", daemon.mnt, "gold")
        assert busy.returncode == 1
        assert "Device or resource busy" in busy.stderr and "Traceback" not in busy.stderr
    wait_for(lambda: daemon.xattr(daemon.volumes("gold"), "holders") == "1", 5, "release")
    result = fusemux_cli("unmount", daemon.mnt, "gold")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "gold: unmounted"
    assert not daemon.backing_mounted("gold")
    missing = fusemux_cli("mount", daemon.mnt, "nosuch")
    assert missing.returncode == 1 and "No such file" in missing.stderr


def test_ctl_mount_skips_the_failure_backoff(daemon: Daemon) -> None:
    src = daemon.add_bind_export("gold", {"a": VOL})
    daemon.exports["gold"]["source"] = str(src) + "-missing"
    daemon.write_config(linger=0)
    daemon.allowed_warnings = [r"mount of .* failed"]
    daemon.start()
    export = daemon.volumes("gold")
    err = ctl(daemon, "gold", b"mount")
    assert err not in (0, errno.EINVAL, errno.EIO)  # a precise errno from mount(8)'s message
    assert daemon.xattr(export, "state") == "failed"
    assert daemon.xattr(export, "last_error").startswith("mount failed: ")
    assert float(daemon.xattr(export, "retry_in")) > 0
    # An open within the backoff fails at once with the same errno, without a new attempt.
    with pytest.raises(OSError) as info:
        open(daemon.volume("gold", "a"), "rb")
    assert info.value.errno == err
    assert daemon.log().count("mount of") == 1
    # The admin's explicit mount retries at once.
    os.rename(src, str(src) + "-missing")
    assert ctl(daemon, "gold", b"mount") == 0
    assert daemon.backing_mounted("gold")
    assert ctl(daemon, "gold", b"unmount") == 0


# -- SIGTERM policy ----------------------------------------------------------------------------


def test_sigterm_with_open_volume_is_refused_and_serving_goes_on(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.write_config(linger=0)
    daemon.allowed_warnings = [r"NOT stopping", r"still open"]
    daemon.start()
    assert daemon.proc is not None
    fd = os.open(daemon.volume("gold", "a"), os.O_RDWR)
    try:
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "NOT stopping" in daemon.log(), 10, "the refusal")
        line = next(x for x in daemon.log().splitlines() if "NOT stopping" in x)
        assert f"gold/a by {os.getpid()}:" in line
        # Still serving: I/O and new opens work, the export stays mounted.
        assert os.pwrite(fd, b"after-term", 0) == 10
        with open(daemon.volume("gold", "a"), "rb") as f:
            assert f.read(10) == b"after-term"
        assert daemon.proc.poll() is None and daemon.backing_mounted("gold")
    finally:
        os.close(fd)
    # Once everything is closed, one SIGTERM stops it.
    wait_for(lambda: daemon.xattr(daemon.volumes("gold"), "holders") == "0", 5, "release")
    assert daemon.stop() == 0
    assert daemon.leftover_mounts() == []


# With the passthrough engine a file still open at a forced stop keeps its backing mount
# busy (the kernel's backing file), so the shutdown detaches it lazily; it goes away with the
# holder's last close.
PASSTHROUGH_HELD_AT_STOP = [
    r"unmount failed \(umount: .*: target is busy\.\); retrying",
    r"is still busy at shutdown; detaching it lazily",
]


def test_force_stops_on_the_first_sigterm(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.write_config(linger=0)
    daemon.allowed_warnings = [r"still open: gold/a", *PASSTHROUGH_HELD_AT_STOP]
    daemon.start("--force")
    f = open(daemon.volume("gold", "a"), "rb")
    try:
        assert daemon.stop() == 0
        if daemon.passthrough:
            # The kernel holds the backing file: the holder goes on reading it.
            assert f.read() == VOL
        else:
            with pytest.raises(OSError) as info:
                f.read()
            assert info.value.errno == errno.ENOTCONN
    finally:
        with contextlib.suppress(OSError):
            f.close()
    assert daemon.leftover_mounts() == []
    assert "NOT stopping" not in daemon.log()


# -- SIGHUP reload -------------------------------------------------------------------------------


def hup(daemon: Daemon, expect: str) -> None:
    assert daemon.proc is not None
    before = daemon.log().count(expect)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.log().count(expect) > before, 10, f"log line {expect!r}")


def test_sighup_adds_changes_and_removes_exports(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.add_bind_export("silver", {"b": VOL})
    other = daemon.add_bind_export("other", {"a": b"other-data"})
    del daemon.exports["other"]
    daemon.write_config(linger=0)
    daemon.start()
    volumes = daemon.mnt / "volumes"
    assert sorted(os.listdir(volumes)) == ["gold", "silver"]
    f = open(daemon.volume("silver", "b"), "rb")
    try:
        # Add bronze, remove silver (in use), change gold's source.
        daemon.add_bind_export("bronze", {"c": VOL})
        gold_spec = daemon.exports["gold"]
        silver_spec = daemon.exports.pop("silver")
        g = open(daemon.volume("gold", "a"), "rb")  # gold mounted with its old source
        gold_spec["source"] = str(other)
        daemon.write_config(linger=0)
        hup(daemon, "SIGHUP: reloaded")
        log = daemon.log()
        assert "export bronze: added" in log
        assert "export gold: changed; applied at its next mount" in log
        assert "export silver: removed; it disappears once its 1 holder(s) are gone" in log
        assert sorted(os.listdir(volumes)) == ["bronze", "gold", "silver"]
        assert daemon.xattr(daemon.volumes("silver"), "removed") == "1"
        with open(daemon.volume("bronze", "c"), "rb") as b:
            assert b.read() == VOL
        # Gold keeps its old mount while open...
        assert g.read() == VOL
        g.close()
        daemon.wait_unmounted("gold")
        # ...and mounts its new source next time.
        with open(daemon.volume("gold", "a"), "rb") as g2:
            assert g2.read() == b"other-data"
        # Silver still serves its holder.
        assert f.read() == VOL
    finally:
        f.close()
    wait_for(lambda: "silver" not in os.listdir(volumes), 10, "silver to disappear")
    assert not daemon.backing_mounted("silver")
    assert "export silver: removed from the configuration and now gone" in daemon.log()
    del silver_spec


def test_sighup_with_a_bad_config_keeps_the_old_one(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.write_config(linger=0)
    daemon.allowed_errors = [r"SIGHUP: .* rejected, still serving the old configuration"]
    daemon.start()
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good + "\n[exports.bad]\nsource = 42\nfstype = 'nfs'\n")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "rejected, still serving the old configuration" in daemon.log(), 10, "reject")
    assert any("fusemux.toml:" in x and "source" in x for x in daemon.log().splitlines())
    assert sorted(os.listdir(daemon.mnt / "volumes")) == ["gold"]
    with open(daemon.volume("gold", "a"), "rb") as f:
        assert f.read() == VOL
    # state_dir cannot change while running.
    daemon.config_path.write_text(good.replace(str(daemon.state), str(daemon.state) + "2"))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "state_dir cannot change" in daemon.log(), 10, "state_dir reject")
    daemon.config_path.write_text(good)
    assert sorted(os.listdir(daemon.mnt / "volumes")) == ["gold"]


# -- restart after kill -9 -----------------------------------------------------------------------


def test_restart_after_kill_9_clears_stale_mount_and_adopts_backing(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.add_ext4_export("img", {"b": VOL})
    daemon.write_config(linger=0)
    daemon.allowed_warnings = [
        r"clearing the stale fusemux mount",
        r"adopted the backing mount",
    ]
    daemon.start()
    old = os.open(daemon.volume("gold", "a"), os.O_RDWR)
    try:
        img = os.open(daemon.volume("img", "b"), os.O_RDONLY)
        os.close(img)
        os.pwrite(old, b"before-kill", 0)
        os.fsync(old)
        assert daemon.proc is not None
        old_pid = daemon.proc.pid
        daemon.kill()
        if daemon.passthrough:
            # The kernel holds the backing file: I/O of the open file goes on without the
            # daemon, and keeps the backing mount busy until it is closed.
            assert os.pread(old, 11, 0) == b"before-kill"
            os.pwrite(old, b"after--kill", 0)
            # FSYNC is not passed through: the kernel asks the dead daemon.
            with pytest.raises(OSError) as info:
                os.fsync(old)
            assert info.value.errno == errno.ENOTCONN
            fd, old = old, -1
            with pytest.raises(OSError) as info:  # close()'s FLUSH too; the fd is closed
                os.close(fd)
            assert info.value.errno == errno.ENOTCONN
        else:
            # The FUSE mount is stale now: the old fd gets ENOTCONN, it does not hang.
            with pytest.raises(OSError) as info:
                os.pread(old, 11, 0)
            assert info.value.errno == errno.ENOTCONN
        assert mounted_at(daemon.mnt) == ["fuse.fusemux"]
        assert daemon.backing_mounted("gold")  # left behind by the dead daemon
        daemon.start()
        assert daemon.proc.pid != old_pid
        assert mounted_at(daemon.mnt) == ["fuse.fusemux"]  # one mount, not stacked
        log = daemon.log()
        assert "clearing the stale fusemux mount" in log
        assert "export gold: adopted the backing mount" in log
        # Adopted idle: unmounted after the linger without anybody opening it.
        daemon.wait_unmounted("gold")
        # Serving again, with the data written before the kill.
        with open(daemon.volume("gold", "a"), "rb") as f:
            assert f.read(11) == (b"after--kill" if daemon.passthrough else b"before-kill")
        with open(daemon.volume("img", "b"), "rb") as f:
            assert f.read() == VOL
        if not daemon.passthrough:
            # The old fd stays dead (ENOTCONN), it never reaches the new daemon.
            with pytest.raises(OSError) as info:
                os.pread(old, 11, 0)
            assert info.value.errno == errno.ENOTCONN
    finally:
        if old >= 0:
            with contextlib.suppress(OSError):
                os.close(old)


def test_removed_export_mount_left_by_a_dead_daemon_is_unmounted(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.add_bind_export("gone", {"b": VOL})
    daemon.write_config(linger=300)
    daemon.allowed_warnings = [
        r"clearing the stale fusemux mount",
        r"adopted the backing mount",
        r"unmounting stale backing mount .*/gone",
    ]
    daemon.start()
    with open(daemon.volume("gone", "b"), "rb"):
        pass
    daemon.kill()
    assert daemon.backing_mounted("gone")
    del daemon.exports["gone"]
    daemon.write_config(linger=300)
    daemon.start()
    assert not daemon.backing_mounted("gone")
    assert "unmounting stale backing mount" in daemon.log()


# -- hygiene -------------------------------------------------------------------------------------


def test_rlimit_nofile_is_raised(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.start()
    assert daemon.proc is not None
    limits = Path(f"/proc/{daemon.proc.pid}/limits").read_text()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    soft, hard = int(line.split()[3]), int(line.split()[4])
    # Raised to 2**20 where the kernel and our rights allow, else to the hard limit.
    assert soft == hard or soft >= 1 << 20, line
    assert soft >= min(hard, 1 << 20), line


def test_mount_helpers_are_reaped(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.add_ext4_export("img", {"b": VOL})
    daemon.write_config(linger=0)
    daemon.start()
    assert daemon.proc is not None
    for _ in range(3):
        for export, name in (("gold", "a"), ("img", "b")):
            with open(daemon.volume(export, name), "rb"):
                pass
            daemon.wait_unmounted(export)

    def children() -> list[str]:
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == daemon.proc.pid:  # type: ignore[union-attr]
                out.append(f"{d}:{fields[0]}")
        return out

    # No zombie and no straggler: mount(8)/umount(8) children are all waited for.
    wait_for(lambda: children() == [], 5, "no children of the daemon")
