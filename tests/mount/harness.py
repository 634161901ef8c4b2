"""Tier (c) harness: the real daemon as a subprocess, over real kernel-mounted exports.

Fixtures here build backing exports (bind mounts of directories, loop-mounted ext4 images),
write a TOML config, start ``python -m fusemux serve`` and wait for its FUSE mount to appear
in mountinfo. Teardown stops the daemon with SIGTERM, checks it exited 0 and left nothing
mounted, fails the test on unexpected WARNING/ERROR lines or tracebacks in its log, and in
``finally`` kills it by PID and detaches anything it left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fusemux.core import loopdev
from fusemux.core.mounter import MNT_DETACH, read_mountinfo, umount2


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll *cond* until it returns something truthy, or fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def stays(cond: Callable[[], object], seconds: float) -> bool:
    """True if *cond* stays truthy for *seconds* (sampled every 20 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not cond():
            return False
        time.sleep(0.02)
    return True


def mounted_at(path: str | Path) -> list[str]:
    """fstypes mounted at *path*, by mountinfo (never stat()s a FUSE mountpoint)."""
    target = os.path.abspath(path)
    return [m.fstype for m in read_mountinfo() if m.mountpoint == target]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Daemon:
    """One fusemux daemon under test."""

    def __init__(self, base: Path, engine: str = "pyfuse3") -> None:
        self.base = base
        # "fallback" is the own engine with kernel_passthrough = "off": it serves every read
        # and write itself, as on a kernel without FUSE passthrough.
        self.mode = engine
        self.engine = "passthrough" if engine == "fallback" else engine
        self.kernel_passthrough = "off" if engine == "fallback" else "auto"
        self.mnt = base / "mnt"
        self.state = base / "state"
        self.log_path = base / "daemon.log"
        self.config_path = base / "fusemux.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exports: dict[str, dict[str, Any]] = {}
        self.allowed_warnings: list[str] = []
        self.allowed_errors: list[str] = []  # ERROR lines a test provokes on purpose
        # How to run fusemux (a test of the installed wheel runs its venv's command), and where.
        self.command: list[str] = [sys.executable, "-m", "fusemux"]
        self.cwd: Path | None = None
        self.mnt.mkdir(parents=True, exist_ok=True)

    @property
    def passthrough(self) -> bool:
        """Kernel passthrough in use: open files keep reading and writing the backing file
        even after the daemon is gone (the kernel holds the backing file, not fusemux)."""
        return self.engine == "passthrough" and self.kernel_passthrough != "off"

    @property
    def own_engine(self) -> bool:
        """fusemux's own /dev/fuse engine (with or without kernel passthrough): FALLOCATE,
        LSEEK, per-export STATFS, INTERRUPT, HANDLE_KILLPRIV_V2."""
        return self.engine == "passthrough"

    # -- configuration -------------------------------------------------------------

    def write_config(self, linger: float = 0.0, mount_timeout: float = 10.0, **top: Any) -> None:
        lines = [
            f"state_dir = {toml_value(str(self.state))}",
            f"linger = {linger!r}",
            f"mount_timeout = {mount_timeout!r}",
        ]
        top.setdefault("engine", self.engine)
        if self.kernel_passthrough != "auto":
            top.setdefault("kernel_passthrough", self.kernel_passthrough)
        lines += [f"{k} = {toml_value(v)}" for k, v in top.items()]
        for name, spec in self.exports.items():
            lines.append(f"\n[exports.{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in spec.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def add_bind_export(self, name: str, files: dict[str, bytes] | None = None) -> Path:
        """A directory served through a bind mount; returns the directory (the backing)."""
        src = self.base / "src" / name
        src.mkdir(parents=True)
        for fname, data in (files or {}).items():
            (src / fname).write_bytes(data)
        self.exports[name] = {"source": str(src), "fstype": "none", "options": "bind"}
        return src

    def add_ext4_export(self, name: str, files: dict[str, bytes] | None = None) -> Path:
        """An ext4 image that fusemux mounts with -o loop; returns the image path."""
        content = self.base / "content" / name
        content.mkdir(parents=True)
        for fname, data in (files or {}).items():
            (content / fname).write_bytes(data)
        image = self.base / f"{name}.img"
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-d", str(content), str(image), "32M"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self.exports[name] = {"source": str(image), "fstype": "ext4", "options": "loop"}
        return image

    # -- lifecycle -----------------------------------------------------------------

    def start(self, *extra: str, verbose: bool = True, env: dict[str, str] | None = None) -> None:
        """Start the daemon and wait for its FUSE mount (debug logging unless not *verbose*;
        *env* is added to the daemon's environment)."""
        if not self.config_path.exists():
            self.write_config()
        starts = self.serving_lines()
        log = open(self.log_path, "ab")  # handed to the child
        self.proc = subprocess.Popen(
            [*self.command, "serve", str(self.mnt), "--config"]
            + [str(self.config_path), *(["-v"] if verbose else []), *extra],
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env={**os.environ, **(env or {})},
        )
        log.close()
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode}:\n{self.log()}")
            # A stale mount of a killed daemon may still be there: wait for this one.
            return self.serving_lines() > starts and "fuse.fusemux" in mounted_at(self.mnt)

        wait_for(up, 20, "the FUSE mount")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def serving_lines(self) -> int:
        """How many times the log says "serving" (text or JSON format)."""
        log = self.log()
        return log.count(" serving ") + log.count('"message": "serving ')

    def log_lines(self) -> list[str]:
        """The log, JSON lines (``log_format = "json"``) shown as ``TIME LEVEL LOGGER: msg``."""
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    d = json.loads(line)
                    line = f"{d['time']} {d['level']} {d['logger']}: {d['message']}"
                    if "exception" in d:
                        out.append(line)
                        line = d["exception"]
            out.append(line)
        return out

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon did not stop in {timeout}s:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def leftover_mounts(self) -> list[str]:
        prefixes = (str(self.mnt), str(self.state) + "/")
        return [
            m.mountpoint
            for m in read_mountinfo()
            if m.mountpoint == str(self.mnt) or m.mountpoint.startswith(prefixes[1])
        ]

    def cleanup(self) -> None:
        """Last resort, in finally: kill by PID and detach whatever is still mounted."""
        self.kill()
        for mnt in sorted(self.leftover_mounts(), key=len, reverse=True):
            with contextlib.suppress(OSError):
                umount2(mnt, MNT_DETACH)
        if not self.mnt.is_relative_to(self.base) and not self.leftover_mounts():
            with contextlib.suppress(OSError):
                self.mnt.rmdir()  # a mountpoint a test placed outside its tmp dir

    def unexpected_log_lines(self) -> list[str]:
        bad = []
        for line in self.log_lines():
            if (
                "Traceback" in line
                or " CRITICAL " in line
                or " ERROR " in line
                and not any(re.search(p, line) for p in self.allowed_errors)
                or " WARNING " in line
                and not any(re.search(p, line) for p in self.allowed_warnings)
            ):
                bad.append(line)
        return bad

    # -- paths and state -----------------------------------------------------------

    def volumes(self, export: str) -> Path:
        return self.mnt / "volumes" / export

    def volume(self, export: str, name: str) -> Path:
        return self.mnt / "volumes" / export / name

    def target(self, export: str) -> Path:
        return self.state / "mnt" / export

    def backing_mounted(self, export: str) -> bool:
        return bool(mounted_at(self.target(export)))

    def xattr(self, path: Path, key: str) -> str:
        return os.getxattr(path, "user.fusemux." + key).decode()

    def state_of(self, export: str) -> str:
        return self.xattr(self.volumes(export), "state")

    def wait_unmounted(self, export: str, timeout: float = 10.0) -> None:
        wait_for(lambda: not self.backing_mounted(export), timeout, f"{export} to unmount")
        wait_for(lambda: self.state_of(export) == "unmounted", timeout, f"{export} state")


def run(*argv: str | Path, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; with check, fail showing its output."""
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=120, **kw
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{argv} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


@contextlib.contextmanager
def checked_daemon(base: Path, engine: str, label: str = "daemon") -> Iterator[Daemon]:
    """A daemon to configure and start; afterwards stopped (it must exit 0), checked for
    leftover mounts and unexpected log lines, and cleaned up whatever happened."""
    d = Daemon(base, engine=engine)
    try:
        yield d
        if d.proc is not None and d.proc.poll() is None:
            rc = d.stop()
            assert rc == 0, f"{label} exited {rc}:\n{d.log()}"
        left = d.leftover_mounts()
        assert not left, f"{label} left mounts behind: {left}"
        bad = d.unexpected_log_lines()
        assert not bad, f"unexpected {label} log lines:\n" + "\n".join(bad)
    finally:
        d.cleanup()


def as_nobody(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """Run a command as the unprivileged user nobody (uid/gid 65534, no groups)."""
    return run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv, check=False)


def loops_backed_by(match: Callable[[str], bool]) -> list[str]:
    """Attached loop devices (``/dev/loopN``) whose backing file satisfies *match*."""
    return sorted(dev for dev, backing in loopdev.attached_loops().items() if match(backing))


# -- helpers for the fault tests (tests/mount/test_faults.py) ------------------------------


def pid_alive(pid: int) -> bool:
    """True while *pid* exists and is not a zombie (read from /proc, never signalled)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status


def mount_ids_at(path: str | Path) -> list[int]:
    """Mount IDs stacked on *path*, by mountinfo: a remount or a detach changes the list."""
    target = os.path.abspath(path)
    return [m.mount_id for m in read_mountinfo() if m.mountpoint == target]


@contextlib.contextmanager
def mount_helper(fstype: str, script: str) -> Any:
    """Install ``/sbin/mount.<fstype>`` (a shell *script*) for the block; always removed."""
    helper = Path(f"/sbin/mount.{fstype}")
    assert not helper.exists(), f"{helper} already exists"
    helper.write_text(script)
    helper.chmod(0o755)
    try:
        yield helper
    finally:
        with contextlib.suppress(FileNotFoundError):
            helper.unlink()
