"""Session-wide guard: a test run that leaves a mount, loop device or process behind fails.

At session end this looks for what this run may have created: processes descended from
pytest, mounts under this session's temporary directories, and loop devices backed by files
there. Anything found is reported, cleaned up (by PID and by path, never by name) and the
run's exit status is set to failure. Mounts and devices of other sessions running at the same
time are never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from fusemux.core import loopdev
from fusemux.core.mounter import MNT_DETACH, read_mountinfo, umount2

# A world-traversable directory of this session, for mountpoints other users must reach
# (pytest's own temporary directories are 0700).
PUBLIC_DIR = Path(f"/tmp/fusemux-test-{os.getpid()}")
_roots: list[str] = []


def _ours(path: str) -> bool:
    return any(path == r or path.startswith(r + "/") for r in _roots)


def _mountpoints() -> set[str]:
    return {m.mountpoint for m in read_mountinfo() if _ours(m.mountpoint)}


def _loop_devices() -> set[str]:
    return {f"{dev}={name}" for dev, name in loopdev.attached_loops().items() if _ours(name)}


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


@pytest.fixture(scope="session", autouse=True)
def _track_session_dirs(tmp_path_factory: pytest.TempPathFactory) -> None:
    _roots[:] = [str(tmp_path_factory.getbasetemp()), str(PUBLIC_DIR)]


def _settle(timeout: float = 5.0) -> None:
    """Give the kernel a moment: a loop device's autoclear after the last unmount, and a
    process's exit, can complete shortly after the call that triggered them returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (
        _loop_devices() or _descendants(os.getpid()) or _mountpoints()
    ):
        time.sleep(0.1)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _roots:
        return
    _settle()
    leftovers: list[str] = []
    procs = _descendants(os.getpid())
    for pid in sorted(procs):
        leftovers.append(f"process {pid}: {_cmdline(pid)}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for mnt in sorted(_mountpoints(), key=len, reverse=True):
        leftovers.append(f"mount {mnt}")
        with contextlib.suppress(OSError):
            umount2(mnt, MNT_DETACH)
    for loop in sorted(_loop_devices()):
        leftovers.append(f"loop device {loop}")
        dev = loop.split("=", 1)[0]
        with contextlib.suppress(OSError):
            loopdev.detach(dev)
    with contextlib.suppress(OSError):
        for sub in PUBLIC_DIR.iterdir() if PUBLIC_DIR.exists() else []:
            sub.rmdir()
        PUBLIC_DIR.rmdir()
    if leftovers:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "the test run left these behind (cleaned up now):\n  " + "\n  ".join(leftovers)
        if reporter is not None:
            reporter.write_sep("=", "LEFTOVERS", red=True)
            reporter.write_line(text)
        else:
            print(text)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
