"""Running mount(8) and umount(8) with timeouts, and reading /proc/self/mountinfo.

This module owns every kernel mount and unmount fusemux makes for backing exports, and the
mapping of mount(8)'s failures to errnos. It decides nothing about *when* to mount: that is
:mod:`fusemux.core.exports`.

Concurrency: helpers run as child processes through :func:`trio.run_process`, each in a new
session (process group) so that a timeout kills ``mount`` *and* its helper (``mount.nfs``)
rather than orphaning the helper. Nothing here blocks the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from fusemux import libc
from fusemux.config import ExportConfig
from fusemux.errors import MountError, MountTimeout, UnmountError

MNT_DETACH = 2
UMOUNT_TIMEOUT = 30.0
# Pauses between quick retries of a busy umount (see SystemMounter.umount).
UMOUNT_SETTLE = (0.02, 0.1)
# umount(8) exits 32 on failure; its message tells why.
_BUSY_MARKERS = ("target is busy", "device is busy", "Device or resource busy")


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf = left.split()
        rf = right.split()
        if len(lf) < 5 or len(rf) < 2:
            continue
        entries.append(
            MountEntry(
                mount_id=int(lf[0]),
                mountpoint=_unescape(lf[4]),
                fstype=rf[0],
                source=_unescape(rf[1]),
            )
        )
    return entries


def read_mountinfo(pid: str = "self") -> list[MountEntry]:
    """One consistent snapshot: the whole file in a single read() call."""
    fd = os.open(f"/proc/{pid}/mountinfo", os.O_RDONLY)
    try:
        chunks = []
        while True:
            # A large buffer makes the kernel produce the table in one go.
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return parse_mountinfo(b"".join(chunks).decode("utf-8", "surrogateescape"))


def mounts_at(path: str | Path) -> list[MountEntry]:
    """Mounts stacked on *path*, compared as absolute strings (never stat()ed)."""
    target = os.path.abspath(path)
    return [m for m in read_mountinfo() if m.mountpoint == target]


def is_mounted(path: str | Path) -> bool:
    return bool(mounts_at(path))


def umount2(path: str | Path, flags: int) -> None:
    """umount2(2) without resolving the path in userspace (safe on stale FUSE mounts)."""
    libc.umount2(path, flags)


def mount_errno(message: str) -> int:
    """The errno an open gets when mount(8) failed with *message*.

    mount(8) reports failures as text and exit status 32, so the cause is recovered from the
    text. Anything unrecognised is EIO; the full text is kept in ``last_error`` either way.
    """
    text = message.lower()
    table = (
        (("unknown filesystem type", "helper program", "no such device"), errno.ENODEV),
        (("permission denied", "access denied", "operation not permitted"), errno.EACCES),
        (("connection refused",), errno.ECONNREFUSED),
        (("no route to host", "network is unreachable"), errno.EHOSTUNREACH),
        (("timed out",), errno.ETIMEDOUT),
        # ENXIO rather than ENOENT: the volume exists, its export's source does not.
        (("does not exist", "no such file or directory", "can't find"), errno.ENXIO),
    )
    for markers, err in table:
        if any(m in text for m in markers):
            return err
    return errno.EIO


class Mounter(Protocol):
    """What the export manager needs from the outside world (faked in unit tests)."""

    async def mount(self, export: ExportConfig, target: Path, timeout: float) -> None: ...

    async def umount(self, target: Path, timeout: float) -> None: ...


async def run_helper(argv: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    """Run a helper command in its own session; raise trio.TooSlowError on timeout.

    On timeout (or cancellation) the whole process group is killed, even when its leader has
    already exited and only a forked child is left holding the output pipes.
    """
    process = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    out, err = bytearray(), bytearray()

    async def drain(stream: trio.abc.ReceiveStream | None, buf: bytearray) -> None:
        assert stream is not None
        async with stream:
            async for chunk in stream:
                buf += chunk

    try:
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, process.stdout, out)
                nursery.start_soon(drain, process.stderr, err)
                await process.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await process.wait()
        raise
    code = process.returncode if process.returncode is not None else -1
    return subprocess.CompletedProcess(argv, code, bytes(out), bytes(err))


def _message(result: subprocess.CompletedProcess[bytes]) -> str:
    text = (result.stderr or b"").decode("utf-8", "replace").strip()
    text = text or (result.stdout or b"").decode("utf-8", "replace").strip()
    return " ".join(text.split()) or f"exit status {result.returncode}"


class SystemMounter:
    """mount(8)/umount(8) as subprocesses."""

    def __init__(self, mount_cmd: str = "mount", umount_cmd: str = "umount") -> None:
        self.mount_cmd = mount_cmd
        self.umount_cmd = umount_cmd

    async def mount(self, export: ExportConfig, target: Path, timeout: float) -> None:
        argv = [self.mount_cmd, "-t", export.fstype]
        opts = export.mount_options()
        if opts:
            argv += ["-o", opts]
        argv += [export.source, str(target)]
        try:
            result = await run_helper(argv, timeout)
        except trio.TooSlowError:
            await self._clear_half_mount(target)
            raise MountTimeout(
                f"mount of {export.source} timed out after {timeout:g}s and was killed"
            ) from None
        except OSError as e:
            # The mount binary itself is missing or not executable.
            raise MountError(f"cannot run {argv[0]}: {e.strerror}", e.errno or errno.EIO) from None
        if result.returncode != 0:
            message = _message(result)
            # A mount(8) that reports failure but left something mounted is cleaned up too.
            await self._clear_half_mount(target)
            raise MountError(message, mount_errno(message))
        if not is_mounted(target):
            raise MountError(f"mount of {export.source} reported success but nothing is mounted")

    async def _clear_half_mount(self, target: Path) -> None:
        # A helper killed mid-way may still have completed the mount(2) call. Nobody holds
        # anything on a mount that was never reported as mounted, so a detach is safe.
        for _ in range(8):
            if not is_mounted(target):
                return
            try:
                await trio.to_thread.run_sync(umount2, target, 0)
            except OSError:
                with contextlib.suppress(OSError):
                    await trio.to_thread.run_sync(umount2, target, MNT_DETACH)

    async def umount(self, target: Path, timeout: float = UMOUNT_TIMEOUT) -> None:
        """umount(8) *target*, with quick retries while it is busy only for a moment.

        The kernel drops some references to files on a backing mount after the RELEASE that
        announced their close (deferred fput of a FUSE passthrough backing file, of an aio or
        loop user), so an unmount right after the last release can meet EBUSY for a few
        milliseconds. Only a mount still busy after UMOUNT_SETTLE counts as busy.
        """
        for delay in UMOUNT_SETTLE:
            try:
                await self._umount_once(target, timeout)
                return
            except UnmountError as e:
                if e.errno != errno.EBUSY:
                    raise
            await trio.sleep(delay)
        await self._umount_once(target, timeout)

    async def _umount_once(self, target: Path, timeout: float) -> None:
        try:
            result = await run_helper([self.umount_cmd, str(target)], timeout)
        except trio.TooSlowError:
            raise UnmountError(
                f"umount of {target} timed out after {timeout:g}s", errno.ETIMEDOUT
            ) from None
        if result.returncode != 0:
            message = _message(result)
            if not is_mounted(target):
                return  # someone else unmounted it; the goal is reached
            busy = any(m in message for m in _BUSY_MARKERS)
            raise UnmountError(message, errno.EBUSY if busy else errno.EIO)
