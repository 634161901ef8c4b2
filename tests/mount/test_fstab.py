"""Tier (c): fusemux as a mount(8) helper: ``mount -t fuse.fusemux CONFIG MNT`` and an fstab
line (``mount --fstab FILE MNT``) go through fuse3's real ``/sbin/mount.fuse3``, which runs
``fusemux CONFIG MNT -o OPTIONS``; ``umount MNT`` stops the daemon, which unmounts its
exports and exits 0. Bad input: unknown options, a relative config path.

mount(8) clears PATH for its helpers, so ``sh`` finds ``fusemux`` only in its default path:
those scenarios run in a private mount namespace (``unshare -m``) where a directory holding
a ``fusemux`` link to this venv's command is bind-mounted over ``/usr/local/sbin``. Called
directly, mount.fuse3 uses PATH: the venv's bin is prepended. The daemon forks away from the
helper; the test makes itself a child subreaper (PR_SET_CHILD_SUBREAPER) so the daemon
stays its child, is reaped, and its exit status is checked.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusemux import libc
from tests.mount.harness import Daemon, mounted_at, pid_alive, run, wait_for

PR_SET_CHILD_SUBREAPER = 36
VENV_BIN = Path(sys.executable).parent
VOL = b"fstab-test\n" * 100

pytestmark = pytest.mark.skipif(
    not Path("/sbin/mount.fuse3").exists() or not (VENV_BIN / "fusemux").exists(),
    reason="needs fuse3's mount.fuse3 and the fusemux command in this venv",
)


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Orphans of this test (the daemon that forked away from mount.fuse3) become our
    children while the block runs; the test reaps them by PID."""
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0)


def daemon_pid(d: Daemon) -> int:
    return int((d.state / "fusemux.pid").read_text().split()[0])


def reap(pid: int, timeout: float = 30.0) -> int:
    """Wait for our (adopted) child *pid* to exit; returns its exit code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    raise AssertionError(f"daemon {pid} did not exit in {timeout}s")


def kill_leftover(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, ChildProcessError):
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def helper_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def test_mount_fuse3_then_umount(daemon: Daemon) -> None:
    """mount.fuse3 CONFIG MNT -t fusemux -o defaults,_netdev,nofail returns once the mount
    answers; the volume reads; umount refuses while a volume is open (EBUSY, the stop
    policy), then stops the daemon, which unmounts its export and exits 0."""
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.write_config(linger=0)
    pid = 0
    with subreaper():
        try:
            result = run(
                "/sbin/mount.fuse3",
                daemon.config_path,
                daemon.mnt,
                "-t",
                "fusemux",
                "-o",
                "defaults,_netdev,nofail",
                env=helper_env(),
                cwd="/",
            )
            assert result.stdout == result.stderr == ""
            # The mount answers the moment the helper returns.
            assert mounted_at(daemon.mnt) == ["fuse.fusemux"]
            pid = daemon_pid(daemon)
            assert pid_alive(pid)
            with open(daemon.volume("gold", "a"), "rb") as f:
                assert f.read() == VOL
                busy = run("umount", daemon.mnt, check=False)
                assert busy.returncode == 32 and "busy" in busy.stderr, busy
                assert daemon.backing_mounted("gold")
            daemon.wait_unmounted("gold")
            run("umount", daemon.mnt)
            assert reap(pid) == 0
            pid = 0
        finally:
            if pid:
                kill_leftover(pid)
    assert daemon.leftover_mounts() == []
    log = (daemon.state / "fusemux.log").read_text()
    assert "the mount at" in log and "stopped cleanly" in log
    assert "Traceback" not in log


def test_mount_fuse3_bad_options_and_relative_config(daemon: Daemon) -> None:
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.write_config(linger=0)
    bad = run(
        "/sbin/mount.fuse3",
        daemon.config_path,
        daemon.mnt,
        "-t",
        "fusemux",
        "-o",
        "defaults,ro,frobnicate=1",
        env=helper_env(),
        check=False,
    )
    assert bad.returncode == 2, bad
    assert "unknown mount option(s) 'ro', 'frobnicate=1'" in bad.stderr, bad.stderr
    relative = run(
        "/sbin/mount.fuse3",
        "fusemux.toml",
        daemon.mnt,
        "-t",
        "fusemux",
        env=helper_env(),
        cwd=daemon.base,
        check=False,
    )
    assert relative.returncode == 2, relative
    assert "the config path 'fusemux.toml' must be absolute" in relative.stderr
    broken = daemon.base / "broken.toml"
    broken.write_text('linger = 1\nmetrics_listen = "nowhere"\n')
    result = run(
        "/sbin/mount.fuse3", broken, daemon.mnt, "-t", "fusemux", env=helper_env(), check=False
    )
    assert result.returncode == 2 and result.stderr.startswith(f"{broken}:2: metrics_listen")
    for r in (bad, relative, result):
        assert "Traceback" not in r.stderr
    assert mounted_at(daemon.mnt) == []


SCENARIO = r"""
set -eu
mount --bind "$BIN" /usr/local/sbin
{mount}
echo "mount=0"
cat "$MNT/volumes/gold/a" > "$OUT"
grep " $MNT " /proc/self/mountinfo | grep -q " - fuse.fusemux "
pid=$(cut -d' ' -f1 "$STATE/fusemux.pid")
echo "pid=$pid"
umount "$MNT"
echo "umount=0"
# The daemon unmounts its exports and exits (a zombie until the test reaps it).
for i in $(seq 300); do
  grep -q '^State:.*Z' /proc/$pid/status 2>/dev/null && break
  [ -e /proc/$pid ] || break
  sleep 0.1
done
echo "leftover=$(grep -c "$STATE/" /proc/self/mountinfo || true)"
"""


@pytest.mark.parametrize("how", ["mount -t", "fstab"])
def test_mount_8_and_fstab(daemon: Daemon, how: str) -> None:
    """The real mount(8) (util-linux) and an fstab line, through mount.fuse3, in a private
    mount namespace; umount(8) stops the daemon, which leaves nothing mounted."""
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.write_config(linger=0)
    bindir = daemon.base / "bin"
    bindir.mkdir()
    (bindir / "fusemux").symlink_to(VENV_BIN / "fusemux")
    if how == "fstab":
        fstab = daemon.base / "fstab"
        # The contract's form, with this test's paths.
        fstab.write_text(f"{daemon.config_path} {daemon.mnt} fuse.fusemux defaults,_netdev 0 0\n")
        mount = f'mount --fstab "{fstab}" "$MNT"'
    else:
        mount = 'mount -t fuse.fusemux "$CONFIG" "$MNT" -o defaults,_netdev'
    out = daemon.base / "read"
    env = {
        **os.environ,
        "BIN": str(bindir),
        "MNT": str(daemon.mnt),
        "CONFIG": str(daemon.config_path),
        "STATE": str(daemon.state),
        "OUT": str(out),
    }
    pid = 0
    with subreaper():
        try:
            proc = subprocess.run(
                ["unshare", "-m", "--propagation", "private", "sh", "-c"]
                + [SCENARIO.replace("{mount}", mount)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                cwd="/",
            )
            lines = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
            if "pid" in lines:
                pid = int(lines["pid"])
            log = (daemon.state / "fusemux.log").read_text() if daemon.state.exists() else ""
            assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{log}"
            assert (lines["mount"], lines["umount"], lines["leftover"]) == ("0", "0", "0")
            assert out.read_bytes() == VOL
            assert reap(pid) == 0, log
            pid = 0
        finally:
            if pid:
                kill_leftover(pid)
    assert "stopped cleanly" in log
    assert mounted_at(daemon.mnt) == []


def test_mount_8_refuses_bad_input(daemon: Daemon) -> None:
    """Through mount(8): an unknown option and a relative config path fail with the reason
    and mount nothing."""
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.write_config(linger=0)
    bindir = daemon.base / "bin"
    bindir.mkdir()
    (bindir / "fusemux").symlink_to(VENV_BIN / "fusemux")
    # mount(8) itself resolves a relative source that exists (from its cwd); one that does
    # not exist reaches fusemux as given. At boot the cwd is /.
    assert not Path("/fusemux.toml").exists()
    script = (
        'mount --bind "$BIN" /usr/local/sbin\n'
        'mount -t fuse.fusemux "$CONFIG" "$MNT" -o defaults,noexec; echo "rc1=$?"\n'
        'cd /; mount -t fuse.fusemux fusemux.toml "$MNT"; echo "rc2=$?"\n'
        'grep -c " $MNT " /proc/self/mountinfo || true\n'
        'if grep -q " $MNT " /proc/self/mountinfo; then umount "$MNT"; fi\n'
    )
    env = {**os.environ, "BIN": str(bindir), "MNT": str(daemon.mnt)}
    env["CONFIG"] = str(daemon.config_path)
    with subreaper():
        try:
            proc = subprocess.run(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:  # a daemon started by mistake is stopped by its umount above; reap it
            if (daemon.state / "fusemux.pid").exists():
                pid = daemon_pid(daemon)
                with contextlib.suppress(AssertionError):
                    reap(pid, 10)
                kill_leftover(pid)
    assert "rc1=2" in proc.stdout and "rc2=2" in proc.stdout, (proc.stdout, proc.stderr)
    assert "unknown mount option(s) 'noexec'" in proc.stderr
    assert "the config path 'fusemux.toml' must be absolute" in proc.stderr
    assert proc.stdout.strip().endswith("0")  # nothing mounted
    wait_for(lambda: mounted_at(daemon.mnt) == [], 5, "nothing mounted")
