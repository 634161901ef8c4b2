"""Test doubles shared by tiers (a) and (b): a fake :class:`Mounter` and config builders.

:class:`FakeMounter` implements the ``Mounter`` protocol without touching the kernel. It
records every call, keeps the set of targets it has "mounted", and can be told to fail a
mount, hang until the mount timeout, or answer EBUSY to an unmount. It also checks the
export manager's two safety rules on every call: it never mounts a target twice, and it is
never asked to unmount an export that has holders (outside shutdown, where that is the
documented behaviour). A broken rule is recorded in ``violations`` *and* raised as an
AssertionError, so it crashes the task that caused it.

Given ``servers`` (see :func:`make_server`), the fake simulates a filesystem appearing on the
target: mounting moves the export's "server" directory onto the (empty) target and unmounting
moves it back, so backing files are visible only while the export is mounted.

:func:`install` points ``fusemux.core.exports`` at the fake's view of what is mounted
(``is_mounted`` normally reads /proc/self/mountinfo) and at its lazy detach (``umount2``).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

import fusemux.core.exports as exports_mod
from fusemux.config import Config, ExportConfig
from fusemux.core.exports import ExportManager
from fusemux.core.mounter import mount_errno
from fusemux.errors import MountError, MountTimeout, UnmountError


def _abs(path: str | Path) -> Path:
    return Path(os.path.abspath(path))


@dataclass
class MountCall:
    export: str
    source: str
    target: Path
    timeout: float


@dataclass
class FakeMounter:
    """A Mounter that mounts nothing; see the module docstring."""

    manager: ExportManager | None = None
    mounted: set[Path] = field(default_factory=set)
    mount_calls: list[MountCall] = field(default_factory=list)
    umount_calls: list[Path] = field(default_factory=list)
    detach_calls: list[Path] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    mounts_ok: int = 0  # mounts that succeeded
    umounts_ok: int = 0  # umounts that succeeded
    # export name -> (message, errno) of the MountError its mounts raise; "*" = every export
    failures: dict[str, tuple[str, int]] = field(default_factory=dict)
    hang: bool = False  # mounts sleep until their timeout, then raise MountTimeout
    busy: bool = False  # umounts raise UnmountError(EBUSY) and leave the target mounted
    mount_delay: float = 0.0  # seconds each mount takes (trio time)
    umount_delay: float = 0.0  # seconds each umount takes (trio time)
    # export name -> a "server" directory. Mounting moves it onto the target and unmounting
    # moves it back, leaving an empty mountpoint: its files are visible only while mounted.
    servers: dict[str, Path] = field(default_factory=dict)
    _server_at: dict[Path, Path] = field(default_factory=dict)

    # -- configuration helpers -----------------------------------------------------------

    def fail(self, export: str = "*", message: str = "mount.nfs: Connection refused") -> None:
        """Make mounts of *export* fail with *message* (and the errno mount(8) implies)."""
        self.failures[export] = (message, mount_errno(message))

    def stop_failing(self) -> None:
        self.failures.clear()

    def mount_count(self, export: str | None = None) -> int:
        return sum(1 for c in self.mount_calls if export is None or c.export == export)

    def umount_count(self, target: Path | None = None) -> int:
        return sum(1 for t in self.umount_calls if target is None or t == target)

    # -- what the patched module functions consult -----------------------------------------

    def is_mounted(self, path: str | Path) -> bool:
        return _abs(path) in self.mounted

    def umount2(self, path: str | Path, flags: int) -> None:
        target = _abs(path)
        self.detach_calls.append(target)
        if target not in self.mounted:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path))
        self._take_down(target)

    # -- the Mounter protocol ----------------------------------------------------------------

    def _violation(self, message: str) -> None:
        self.violations.append(message)
        raise AssertionError(message)

    async def mount(self, export: ExportConfig, target: Path, timeout: float) -> None:
        target = _abs(target)
        self.mount_calls.append(MountCall(export.name, export.source, target, timeout))
        if target in self.mounted:
            self._violation(f"mount of {target} while it is already mounted")
        try:
            with trio.fail_after(timeout):
                if self.hang:
                    await trio.sleep_forever()
                await trio.sleep(self.mount_delay)
        except trio.TooSlowError:
            raise MountTimeout(
                f"mount of {export.source} timed out after {timeout:g}s and was killed"
            ) from None
        failure = self.failures.get(export.name) or self.failures.get("*")
        if failure is not None:
            raise MountError(*failure)
        server = self.servers.get(export.name)
        if server is not None:
            os.rename(server, target)  # replaces the empty mountpoint directory
            self._server_at[target] = server
        self.mounted.add(target)
        self.mounts_ok += 1

    async def umount(self, target: Path, timeout: float) -> None:
        target = _abs(target)
        self.umount_calls.append(target)
        if self.manager is not None and not self.manager.closing:
            for export in self.manager.exports.values():
                if _abs(export.target) == target and export.holders != 0:
                    self._violation(f"umount of {target} with {export.holders} holder(s)")
        await trio.sleep(self.umount_delay)
        if self.busy:
            raise UnmountError(f"umount: {target}: target is busy.", errno.EBUSY)
        if target not in self.mounted:
            self._violation(f"umount of {target} which is not mounted")
        self._take_down(target)
        self.umounts_ok += 1

    def _take_down(self, target: Path) -> None:
        server = self._server_at.pop(target, None)
        if server is not None:
            os.rename(target, server)
            os.mkdir(target, 0o700)
        self.mounted.discard(target)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Yield to other tasks until *predicate* holds, for at most *timeout* real seconds.

    Spinning on checkpoints (rather than sleeping) means pytest-trio's autojump clock does
    not jump ahead while, say, a worker thread runs. So under that clock this cannot wait
    for trio time to pass; under the real clock it can (a short linger, for example).
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s")
        await trio.lowlevel.checkpoint()


def make_server(root: Path, name: str, files: dict[str, bytes]) -> Path:
    """A directory standing for the export *name* on its server, holding *files*."""
    server = root / "servers" / name
    server.mkdir(parents=True)
    for fname, data in files.items():
        (server / fname).write_bytes(data)
    return server


def install(monkeypatch: pytest.MonkeyPatch, fake: FakeMounter) -> None:
    """Make the export manager see the fake's mounts instead of /proc/self/mountinfo."""
    monkeypatch.setattr(exports_mod, "is_mounted", fake.is_mounted)
    monkeypatch.setattr(exports_mod, "umount2", fake.umount2)


def make_config(
    state_dir: Path,
    names: list[str] | tuple[str, ...] = ("alpha",),
    *,
    linger: float = 10.0,
    mount_timeout: float = 60.0,
    read_only: frozenset[str] = frozenset(),
) -> Config:
    """A Config with one NFS-looking export per name, under *state_dir*."""
    return Config(
        state_dir=state_dir,
        linger=linger,
        mount_timeout=mount_timeout,
        exports={
            name: ExportConfig(
                name=name,
                source=f"server:/{name}",
                fstype="nfs",
                options="vers=4.2",
                read_only=name in read_only,
                origin="test:1",
            )
            for name in names
        },
    )


def make_manager(
    config: Config, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> tuple[ExportManager, FakeMounter]:
    """An ExportManager over a FakeMounter that checks the manager's holders."""
    fake = FakeMounter()
    manager = ExportManager(config, fake, nursery)
    fake.manager = manager
    install(monkeypatch, fake)
    return manager, fake
