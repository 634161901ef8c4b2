"""Tier (a): :mod:`fusemux.core.mounter` without mounting anything.

Covers ``parse_mountinfo`` (octal escapes, optional fields before the `` - `` separator,
garbage lines), ``read_mountinfo``/``is_mounted`` on this host, the ``mount_errno`` table,
``run_helper`` timeouts killing the whole process group, and :class:`SystemMounter` driven by
small fake ``mount``/``umount`` shell scripts (argv, errno mapping, timeouts, a missing
binary, half-mount cleanup and the busy/not-mounted-anymore paths of ``umount``). These run
real subprocesses on real trio time, each well under two seconds.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from fusemux.config import ExportConfig
from fusemux.core import mounter
from fusemux.core.mounter import (
    MountEntry,
    SystemMounter,
    is_mounted,
    mount_errno,
    mounts_at,
    parse_mountinfo,
    read_mountinfo,
    run_helper,
)
from fusemux.errors import MountError, MountTimeout, UnmountError, errno_of

# -- /proc/self/mountinfo ------------------------------------------------------------------

SAMPLE = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
36 35 98:0 /mnt1 /mnt/with\040space rw,noatime master:1 - nfs4 srv:/export\040dir rw,vers=4.2
37 22 0:33 / /no/optional rw - tmpfs tmpfs rw,size=10k
38 22 0:34 / /multi rw shared:5 master:2 propagate_from:1 unbindable - fuse.fusemux fusemux rw
this line has no separator at all
39 22 0:35 / /short - xfs
40 22 0:36 / /esc/tab\011nl\012bs\134040 rw - xfs /dev/x\134y rw

41 22 0:37 / /dash-in-name rw - ext4 /dev/sdb1 rw
"""


def test_parse_mountinfo() -> None:
    entries = parse_mountinfo(SAMPLE)
    assert entries == [
        MountEntry(22, "/", "ext4", "/dev/vda"),
        MountEntry(36, "/mnt/with space", "nfs4", "srv:/export dir"),
        MountEntry(37, "/no/optional", "tmpfs", "tmpfs"),
        MountEntry(38, "/multi", "fuse.fusemux", "fusemux"),
        # "/short" has a single field after the separator: skipped
        MountEntry(40, "/esc/tab\tnl\nbs\\040", "xfs", "/dev/x\\y"),
        MountEntry(41, "/dash-in-name", "ext4", "/dev/sdb1"),
    ]


def test_parse_mountinfo_empty() -> None:
    assert parse_mountinfo("") == []


def test_read_mountinfo_of_this_host(tmp_path: Path) -> None:
    entries = read_mountinfo()
    assert any(e.mountpoint == "/" for e in entries)
    assert all(isinstance(e.mount_id, int) for e in entries)
    assert is_mounted("/")
    assert mounts_at("/") and all(m.mountpoint == "/" for m in mounts_at("/"))
    assert not is_mounted(tmp_path)
    assert mounts_at(tmp_path) == []


def test_is_mounted_compares_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")
    assert is_mounted(".")
    monkeypatch.chdir(tmp_path)
    assert not is_mounted(".")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("mount: /mnt/x: unknown filesystem type 'nfs5'.", errno.ENODEV),
        ("mount: /mnt/x: bad option; you might need a /sbin/mount.<type> helper program.", 19),
        ("mount: /mnt/x: No such device", errno.ENODEV),
        ("mount.nfs: access denied by server while mounting srv:/x", errno.EACCES),
        ("mount: /mnt/x: Permission denied.", errno.EACCES),
        ("mount: /mnt/x: must be superuser: Operation not permitted", errno.EACCES),
        ("mount.nfs: Connection refused", errno.ECONNREFUSED),
        ("mount.nfs: No route to host", errno.EHOSTUNREACH),
        ("mount.nfs: Network is unreachable", errno.EHOSTUNREACH),
        ("mount.nfs: Connection timed out", errno.ETIMEDOUT),
        ("mount: /mnt/x: special device /dev/vdz does not exist.", errno.ENXIO),
        ("mount.nfs: mounting srv:/x failed, reason given by server: No such file or directory", 6),
        ("mount: can't find /mnt/x in /etc/fstab.", errno.ENXIO),
        ("mount: /mnt/x: wrong fs type, bad superblock on /dev/vdb.", errno.EIO),
        ("", errno.EIO),
        ("exit status 32", errno.EIO),
    ],
)
def test_mount_errno(message: str, expected: int) -> None:
    assert mount_errno(message) == expected
    assert mount_errno(message.upper()) == expected  # case does not matter


# -- run_helper ----------------------------------------------------------------------------


def _state(pid: int) -> str | None:
    """The /proc state letter of *pid*, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[0]


def _pgrp(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[2])


def _live_group_members(pgid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _pgrp(int(entry)) == pgid and _state(int(entry)) not in (None, "Z"):
            out.append(int(entry))
    return out


async def _wait_until(predicate: Callable[[], bool], deadline: float = 2.0) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return True
        await trio.sleep(0.02)
    return predicate()


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


async def _read_pid(path: Path) -> int:
    assert await _wait_until(lambda: _pid_in(path) is not None)
    pid = _pid_in(path)
    assert pid is not None
    return pid


def _kill(pids: list[int]) -> None:
    for pid in pids:
        if _state(pid) not in (None, "Z"):
            os.kill(pid, signal.SIGKILL)


async def test_run_helper_success_captures_output() -> None:
    result = await run_helper(["sh", "-c", "echo out; echo err >&2; exit 3"], 5)
    assert result.returncode == 3
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"


async def test_run_helper_runs_in_its_own_session(tmp_path: Path) -> None:
    result = await run_helper(["sh", "-c", "ps -o sid= -p $$; ps -o pgid= -p $$; echo $$"], 5)
    sid, pgid, pid = (int(x) for x in result.stdout.split())
    assert sid == pgid == pid
    assert os.getsid(0) != sid


async def test_run_helper_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    leader_file, child_file = tmp_path / "leader", tmp_path / "child"
    script = f"echo $$ > {leader_file}; sleep 30 & echo $! > {child_file}; sleep 30"
    started = time.monotonic()
    try:
        with pytest.raises(trio.TooSlowError):
            await run_helper(["sh", "-c", script], 0.5)
        assert time.monotonic() - started < 2.0
        leader, child = int(leader_file.read_text()), int(child_file.read_text())
        assert leader != child
        assert await _wait_until(lambda: _state(child) in (None, "Z"))
        assert _state(leader) in (None, "Z")
        assert await _wait_until(lambda: _live_group_members(leader) == [])
    finally:
        for f in (leader_file, child_file):
            if f.exists() and f.read_text().strip():
                _kill([int(f.read_text())])


async def test_run_helper_timeout_kills_a_group_whose_leader_already_exited(
    tmp_path: Path,
) -> None:
    leader_file, child_file = tmp_path / "leader", tmp_path / "child"
    script = f"echo $$ > {leader_file}; sleep 30 & echo $! > {child_file}; exit 0"
    try:
        with pytest.raises(trio.TooSlowError):
            await run_helper(["sh", "-c", script], 0.5)
        child = await _read_pid(child_file)
        assert await _wait_until(lambda: _state(child) in (None, "Z"), deadline=0.5)
    finally:
        if child_file.exists() and child_file.read_text().strip():
            _kill([int(child_file.read_text())])


# -- SystemMounter with fake mount/umount scripts --------------------------------------------


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


EXPORT = ExportConfig(name="e", source="srv:/export", fstype="nfs", options="vers=4.2")


async def test_mount_failure_maps_the_message_to_an_errno(tmp_path: Path) -> None:
    args = tmp_path / "args"
    cmd = script(
        tmp_path,
        "mount",
        f'printf "%s\\n" "$@" > {args}\n'
        "echo 'mount.nfs: Connection refused' >&2\n"
        "echo 'mount.nfs:   retrying' >&2\nexit 32\n",
    )
    target = tmp_path / "target"
    target.mkdir()
    ro_export = ExportConfig(name="e", source="srv:/x", options="vers=4.2", read_only=True)
    with pytest.raises(MountError) as info:
        await SystemMounter(mount_cmd=cmd).mount(ro_export, target, 5)
    assert type(info.value) is MountError
    assert info.value.errno == errno.ECONNREFUSED == errno_of(info.value)
    # stderr lines are joined with single spaces
    assert info.value.message == "mount.nfs: Connection refused mount.nfs: retrying"
    assert args.read_text().splitlines() == [
        "-t",
        "nfs",
        "-o",
        "vers=4.2,ro",
        "srv:/x",
        str(target),
    ]


async def test_mount_without_options_passes_no_dash_o(tmp_path: Path) -> None:
    args = tmp_path / "args"
    cmd = script(tmp_path, "mount", f'printf "%s\\n" "$@" > {args}\nexit 32\n')
    export = ExportConfig(name="e", source="/dev/vdb", fstype="ext4")
    with pytest.raises(MountError) as info:
        await SystemMounter(mount_cmd=cmd).mount(export, tmp_path, 5)
    assert args.read_text().splitlines() == ["-t", "ext4", "/dev/vdb", str(tmp_path)]
    assert info.value.message == "exit status 32"
    assert info.value.errno == errno.EIO


@pytest.mark.parametrize(
    ("body", "err", "message"),
    [
        ("echo \"mount: /x: unknown filesystem type 'nfs9'.\" >&2; exit 32", errno.ENODEV, None),
        ("echo 'mount: /x: Permission denied.' >&2; exit 32", errno.EACCES, None),
        ("echo 'mount.nfs: Connection timed out' >&2; exit 32", errno.ETIMEDOUT, None),
        ("echo 'special device srv:/x does not exist.'; exit 32", errno.ENXIO, None),
        ("echo 'bad superblock' >&2; exit 32", errno.EIO, "bad superblock"),
        ("echo only-stdout; exit 1", errno.EIO, "only-stdout"),
    ],
)
async def test_mount_failure_table(
    tmp_path: Path, body: str, err: int, message: str | None
) -> None:
    cmd = script(tmp_path, "mount", body + "\n")
    with pytest.raises(MountError) as info:
        await SystemMounter(mount_cmd=cmd).mount(EXPORT, tmp_path, 5)
    assert not isinstance(info.value, MountTimeout)
    assert info.value.errno == err
    if message is not None:
        assert info.value.message == message


async def test_mount_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    cmd = script(tmp_path, "mount", f"echo $$ > {pid_file}\nexec sleep 30\n")
    started = time.monotonic()
    try:
        with pytest.raises(MountTimeout) as info:
            await SystemMounter(mount_cmd=cmd).mount(EXPORT, tmp_path, 0.5)
        assert time.monotonic() - started < 2.0
        assert info.value.errno == errno.ETIMEDOUT
        assert info.value.message == "mount of srv:/export timed out after 0.5s and was killed"
        pid = int(pid_file.read_text())
        assert await _wait_until(lambda: _state(pid) in (None, "Z"))
    finally:
        if pid_file.exists():
            _kill([int(pid_file.read_text())])


async def test_mount_success_but_nothing_mounted(tmp_path: Path) -> None:
    cmd = script(tmp_path, "mount", "exit 0\n")
    with pytest.raises(MountError) as info:
        await SystemMounter(mount_cmd=cmd).mount(EXPORT, tmp_path, 5)
    assert "reported success but nothing is mounted" in info.value.message
    assert info.value.errno == errno.EIO


async def test_mount_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cmd = script(tmp_path, "mount", "exit 0\n")
    monkeypatch.setattr(mounter, "is_mounted", lambda path: Path(path) == tmp_path)
    await SystemMounter(mount_cmd=cmd).mount(EXPORT, tmp_path, 5)


async def test_failed_mount_clears_a_half_mount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mount(8) said it failed but the kernel mount happened: it is unmounted again."""
    mounted = {tmp_path}
    calls: list[tuple[Path, int]] = []

    def fake_umount2(path: str | Path, flags: int) -> None:
        calls.append((Path(path), flags))
        mounted.discard(Path(path))

    monkeypatch.setattr(mounter, "is_mounted", lambda path: Path(path) in mounted)
    monkeypatch.setattr(mounter, "umount2", fake_umount2)
    cmd = script(tmp_path, "mount", "echo 'mount: interrupted' >&2; exit 32\n")
    with pytest.raises(MountError):
        await SystemMounter(mount_cmd=cmd).mount(EXPORT, tmp_path, 5)
    assert calls == [(tmp_path, 0)]
    assert not mounted


async def test_missing_mount_binary(tmp_path: Path) -> None:
    with pytest.raises(MountError) as info:
        await SystemMounter(mount_cmd=str(tmp_path / "no-such-mount")).mount(EXPORT, tmp_path, 5)
    assert info.value.errno == errno.ENOENT
    assert info.value.message.startswith(f"cannot run {tmp_path / 'no-such-mount'}: ")


async def test_umount_success(tmp_path: Path) -> None:
    args = tmp_path / "args"
    cmd = script(tmp_path, "umount", f'printf "%s\\n" "$@" > {args}\nexit 0\n')
    await SystemMounter(umount_cmd=cmd).umount(tmp_path / "t", 5)
    assert args.read_text().splitlines() == [str(tmp_path / "t")]


async def test_umount_failure_when_no_longer_mounted_is_silent(tmp_path: Path) -> None:
    cmd = script(tmp_path, "umount", "echo 'umount: /x: target is busy.' >&2\nexit 32\n")
    await SystemMounter(umount_cmd=cmd).umount(tmp_path, 5)  # not mounted: goal reached


@pytest.mark.parametrize(
    ("message", "err"),
    [
        ("umount: /x: target is busy.", errno.EBUSY),
        ("umount: /x: device is busy.", errno.EBUSY),
        ("umount2: Device or resource busy", errno.EBUSY),
        ("umount: /x: something else", errno.EIO),
    ],
)
async def test_umount_failure_while_still_mounted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, message: str, err: int
) -> None:
    monkeypatch.setattr(mounter, "is_mounted", lambda path: True)
    cmd = script(tmp_path, "umount", f"echo '{message}' >&2\nexit 32\n")
    with pytest.raises(UnmountError) as info:
        await SystemMounter(umount_cmd=cmd).umount(tmp_path, 5)
    assert info.value.errno == err
    assert info.value.message == message


async def test_umount_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    cmd = script(tmp_path, "umount", f"echo $$ > {pid_file}\nexec sleep 30\n")
    try:
        with pytest.raises(UnmountError) as info:
            await SystemMounter(umount_cmd=cmd).umount(tmp_path, 0.5)
        assert info.value.errno == errno.ETIMEDOUT
        assert "timed out after 0.5s" in info.value.message
        pid = int(pid_file.read_text())
        assert await _wait_until(lambda: _state(pid) in (None, "Z"))
    finally:
        if pid_file.exists():
            _kill([int(pid_file.read_text())])
