"""qemu-nbd servers for nbd mappings, supervised as tasks in the daemon's trio nursery.

This module owns the qemu-nbd processes fusemux runs: their command lines, their files under
``<state_dir>/nbd/`` (``<id>.sock``, ``<id>.pid``, ``<id>.log``), readiness, restarts with
backoff, and stopping them. It also knows how to find and stop the qemu-nbd processes a daemon
killed with SIGKILL left behind (:func:`kill_leftovers`).

Concurrency and processes:

* A :class:`Supervisor` is one task in the nursery (``await nursery.start(sup.run)``). It
  starts qemu-nbd in the foreground as its own child, in a new session, reports ready once the
  pid file names that child (qemu-nbd writes it after its socket listens), and then waits for
  it. If it exits while the mapping still exists, it is started again after 0.5 s, 1 s, 2 s ...
  up to 30 s; a server that ran for 30 s resets the delay.
* The child is always reaped: ``Process.wait()`` runs in a shielded ``finally``, after
  SIGTERM and, 5 s later, SIGKILL. PID 1 of a container may not reap orphans, so a child
  fusemux does not wait for would stay a zombie.
* :meth:`Supervisor.stop` cancels the task and waits until the child is gone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from fusemux.errors import MappingFailed

log = logging.getLogger(__name__)

QEMU_NBD = "qemu-nbd"
READY_TIMEOUT = 10.0
STOP_GRACE = 5.0
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
SOCKET_PATH_MAX = 107


def kernel_has_nbd() -> bool:
    """Whether this kernel can attach ``/dev/nbdX`` (the nbd module or a built-in driver)."""
    return os.path.exists("/sys/module/nbd") or os.path.exists("/dev/nbd0")


def mapping_id(export: str, name: str) -> str:
    """A short, stable file name stem for the mapping of *export*/*name*."""
    return hashlib.blake2b(
        f"{export}\0{name}".encode("utf-8", "surrogateescape"), digest_size=8
    ).hexdigest()


def uri(socket_path: Path) -> str:
    return f"nbd+unix:///?socket={socket_path}"


class Supervisor:
    """One supervised qemu-nbd process (serving an image, or attaching ``/dev/nbdX``)."""

    def __init__(
        self,
        label: str,
        argv: list[str],
        pid_file: Path,
        log_file: Path,
        cleanup: list[Path],
    ) -> None:
        self.label = label
        self.argv = argv
        self.pid_file = pid_file
        self.log_file = log_file
        self.cleanup = cleanup  # files to remove when it stops for good
        self.pid = 0
        self.starts = 0
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start qemu-nbd, report ready, and keep it running until cancelled."""
        self._scope = trio.CancelScope()
        try:
            with self._scope:
                started = time.monotonic()
                await self._run_once(task_status)  # a failed first start fails the map
                delay = BACKOFF_MIN
                while True:
                    if time.monotonic() - started >= STABLE_AFTER:
                        delay = BACKOFF_MIN
                    log.warning(
                        "%s: qemu-nbd (pid %d) exited; restarting in %gs",
                        self.label,
                        self.pid,
                        delay,
                    )
                    await trio.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX)
                    started = time.monotonic()
                    try:
                        await self._run_once(None)
                    except (MappingFailed, OSError) as e:
                        log.warning("%s: restarting qemu-nbd failed: %s", self.label, e)
        finally:
            self.pid = 0
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_remove, self.cleanup)
            self._done.set()

    async def _run_once(self, task_status: Any) -> None:
        """One life of the process. Raises MappingFailed if the first start never gets ready."""
        await trio.to_thread.run_sync(_remove, [self.pid_file])
        logf = await trio.to_thread.run_sync(lambda: open(self.log_file, "ab"))  # noqa: SIM115
        try:
            proc = await trio.lowlevel.open_process(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
            )
        except OSError as e:
            raise MappingFailed(f"cannot run {self.argv[0]}: {e.strerror}", e.errno) from None
        finally:
            logf.close()
        self.starts += 1
        try:
            ready = await self._wait_ready(proc)
            # Published only now, after a restart too: whoever sees the new pid (mapping_pid)
            # can connect, instead of meeting the killed server's stale socket.
            self.pid = proc.pid
            if task_status is not None:
                if not ready:
                    tail = await trio.to_thread.run_sync(_tail, self.log_file)
                    raise MappingFailed(f"qemu-nbd did not start: {tail}", errno.EIO)
                log.info("%s: qemu-nbd running (pid %d)", self.label, proc.pid)
                task_status.started()
            else:
                log.info("%s: qemu-nbd restarted (pid %d)", self.label, proc.pid)
            await proc.wait()
        finally:
            with trio.CancelScope(shield=True):
                await _reap(proc)

    async def _wait_ready(self, proc: trio.Process) -> bool:
        with trio.move_on_after(READY_TIMEOUT):
            while proc.returncode is None and proc.poll() is None:
                text = await trio.to_thread.run_sync(_read_text, self.pid_file)
                if text.strip() == str(proc.pid):
                    return True
                await trio.sleep(0.01)
        return False

    async def stop(self) -> None:
        """Stop the process for good and wait until it is reaped and its files are removed."""
        if self._scope is not None:
            self._scope.cancel()
            await self._done.wait()


async def _reap(proc: trio.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        with trio.move_on_after(STOP_GRACE):
            await proc.wait()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def _tail(path: Path, limit: int = 400) -> str:
    text = " ".join(_read_text(path).split())
    return text[-limit:] or "no output"


def _remove(paths: list[Path]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def server_argv(
    image: Path, fmt: str, socket_path: Path, pid_file: Path, read_only: bool, direct: bool
) -> list[str]:
    """The qemu-nbd command line serving *image* (format never probed) on *socket_path*."""
    argv = [
        QEMU_NBD,
        f"--socket={socket_path}",
        f"--format={fmt}",
        "--persistent",
        "--shared=8",
        "--discard=unmap",
        f"--pid-file={pid_file}",
    ]
    # cache=none opens the image with O_DIRECT, like libvirt's cache=none on NFS. Where the
    # backing filesystem refuses O_DIRECT (tmpfs), qemu's default writeback cache is used.
    argv += ["--cache=none", "--aio=native"] if direct else ["--cache=writeback"]
    if read_only:
        argv.append("--read-only")
    argv.append(str(image))
    return argv


def connect_argv(device: str, socket_path: Path, pid_file: Path, read_only: bool) -> list[str]:
    """qemu-nbd attaching kernel device *device* to the server on *socket_path*."""
    argv = [QEMU_NBD, f"--connect={device}", "--format=raw", f"--pid-file={pid_file}"]
    if read_only:
        argv.append("--read-only")
    argv.append(uri(socket_path))
    return argv


def free_nbd_device() -> str | None:
    """A ``/dev/nbdX`` no client is attached to (no ``pid`` in sysfs, size 0), or None."""

    def number(p: Path) -> int:
        return int(p.name[3:]) if p.name[3:].isdigit() else math.inf  # type: ignore[return-value]

    for entry in sorted(Path("/sys/block").glob("nbd*"), key=number):
        if (entry / "pid").exists():
            continue
        with contextlib.suppress(OSError, ValueError):
            if int((entry / "size").read_text()) == 0 and os.path.exists(f"/dev/{entry.name}"):
                return f"/dev/{entry.name}"
    return None


def supports_direct_io(path: Path) -> bool:
    """Whether *path* can be opened with O_DIRECT (blocking)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    os.close(fd)
    return True


def _is_our_qemu_nbd(pid: int, marker: str) -> bool:
    """Whether *pid* is a live qemu-nbd whose command line contains *marker* (our socket)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z" or not argv or os.path.basename(argv[0]) != QEMU_NBD.encode():
        return False
    return any(marker.encode() in a for a in argv[1:])


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def kill_leftovers(nbd_dir: Path, wait: Callable[[float], None] = time.sleep) -> list[str]:
    """Stop qemu-nbd processes named by pid files in *nbd_dir*; remove its files (blocking).

    A pid is signalled only if ``/proc/PID/cmdline`` shows qemu-nbd with one of our sockets
    (for a server) or our pid file (for a ``--connect`` client), so a recycled pid is never
    hit. Such a process is not our child: if nothing reaps it, it stays a zombie, which counts
    as stopped. Returns what was done, one line each, for the log.
    """
    done: list[str] = []
    if not nbd_dir.is_dir():
        return done
    for pid_file in sorted(nbd_dir.glob("*.pid")):
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        stem = pid_file.name[: -len(".pid")]
        sock = nbd_dir / (stem.split(".", 1)[0] + ".sock")
        if pid > 0 and (_is_our_qemu_nbd(pid, str(sock)) or _is_our_qemu_nbd(pid, str(pid_file))):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE
            while not _gone(pid) and time.monotonic() < deadline:
                wait(0.02)
            if not _gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + STOP_GRACE
                while not _gone(pid) and time.monotonic() < deadline:
                    wait(0.02)
            done.append(f"stopped leftover qemu-nbd (pid {pid}) of {pid_file}")
    for leftover in sorted(nbd_dir.iterdir()):
        if leftover.suffix in (".sock", ".pid", ".log"):
            with contextlib.suppress(OSError):
                leftover.unlink()
    return done
