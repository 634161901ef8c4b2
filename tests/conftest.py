"""Session-wide guard: a test run that leaves a mount, loop device or process behind fails.

At session start this records the mounts, attached loop devices and processes that already
exist. At session end anything new is reported, cleaned up (by PID and by path, never by
name) and the run's exit status is set to failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from pathlib import Path

import pytest

from fusemux.core.mounter import MNT_DETACH, read_mountinfo, umount2

LOOP_CLR_FD = 0x4C01
_baseline: dict[str, set[str] | set[int]] = {}


def _mountpoints() -> set[str]:
    return {m.mountpoint for m in read_mountinfo()}


def _loop_devices() -> set[str]:
    found = set()
    for dev in Path("/sys/block").glob("loop*"):
        backing = dev / "loop" / "backing_file"
        if backing.exists():
            found.add(f"/dev/{dev.name}={backing.read_text().strip()}")
    return found


def _descendants(root: int) -> set[int]:
    """Live (non-zombie) descendants of *root*."""
    parents: dict[int, int] = {}
    states: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        states[int(entry)] = fields[0]
        parents[int(entry)] = int(fields[1])
    out: set[int] = set()
    frontier = {root}
    while frontier:
        children = {p for p, pp in parents.items() if pp in frontier and p not in out}
        out |= children
        frontier = children
    return {p for p in out if states.get(p) != "Z"}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def pytest_sessionstart(session: pytest.Session) -> None:
    _baseline["mounts"] = _mountpoints()
    _baseline["loops"] = _loop_devices()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _baseline:
        return
    leftovers: list[str] = []
    procs = _descendants(os.getpid())
    for pid in sorted(procs):
        leftovers.append(f"process {pid}: {_cmdline(pid)}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    new_mounts = _mountpoints() - _baseline["mounts"]
    for mnt in sorted(new_mounts, key=len, reverse=True):
        leftovers.append(f"mount {mnt}")
        with contextlib.suppress(OSError):
            umount2(mnt, MNT_DETACH)
    new_loops = _loop_devices() - _baseline["loops"]
    for loop in sorted(new_loops):
        leftovers.append(f"loop device {loop}")
        dev = loop.split("=", 1)[0]
        with contextlib.suppress(OSError):
            fd = os.open(dev, os.O_RDONLY)
            try:
                fcntl.ioctl(fd, LOOP_CLR_FD)
            finally:
                os.close(fd)
    if leftovers:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "the test run left these behind (cleaned up now):\n  " + "\n  ".join(leftovers)
        if reporter is not None:
            reporter.write_sep("=", "LEFTOVERS", red=True)
            reporter.write_line(text)
        else:
            print(text)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
