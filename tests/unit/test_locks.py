"""Tier (a): fusemux.core.locks on real files: the range table, the errno policy, owners on
their own open file descriptions, SETLKW in the export's wait pool and its interruption."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from fusemux.config import ExportConfig
from fusemux.core import api, locks
from fusemux.core.exports import Export
from fusemux.core.handles import Handle, HandleTable
from fusemux.core.locks import OFFSET_MAX, READ, UNLOCK, WRITE, Lock, LockManager, Range
from fusemux.errors import FusemuxError

FLOCK = struct.Struct("hhqqi4x")


def test_apply_splits_and_merges_like_the_kernel() -> None:
    held = locks.apply([], Lock(WRITE, 0, 99))
    assert held == [Range(0, 99, WRITE)]
    held = locks.apply(held, Lock(UNLOCK, 40, 49))
    assert held == [Range(0, 39, WRITE), Range(50, 99, WRITE)]
    held = locks.apply(held, Lock(READ, 30, 59))
    assert held == [Range(0, 29, WRITE), Range(30, 59, READ), Range(60, 99, WRITE)]
    held = locks.apply(held, Lock(WRITE, 30, 59))  # adjacent ranges of one type merge
    assert held == [Range(0, 99, WRITE)]
    assert locks.apply(held, Lock(UNLOCK, 500, OFFSET_MAX)) == held  # never locked: no change
    assert locks.apply(held, Lock(UNLOCK, 0, OFFSET_MAX)) == []


@pytest.mark.parametrize(
    "lock",
    [
        Lock(WRITE, 0, OFFSET_MAX + 1),  # past 2^63-1
        Lock(WRITE, OFFSET_MAX + 5, OFFSET_MAX + 9),
        Lock(WRITE, 10, 9),  # ends before it starts
        Lock(WRITE, -1, 9),
        Lock(7, 0, 9),  # no such type
    ],
)
def test_bad_ranges_are_einval(lock: Lock) -> None:
    with pytest.raises(FusemuxError) as info:
        lock.check()
    assert info.value.errno == errno.EINVAL


def test_errno_policy_and_what_may_be_interrupted() -> None:
    assert locks.lock_error(OSError(errno.EAGAIN, "x"), "l").errno == errno.EAGAIN
    assert locks.lock_error(OSError(errno.EACCES, "x"), "l").errno == errno.EACCES
    assert locks.lock_error(OSError(errno.ENOLCK, "x"), "l").errno == errno.ENOLCK
    assert api.interrupt_policy(api.Op.SETLKW) is api.Interrupt.NOW
    assert api.interrupt_policy(api.Op.GETLK) is api.Interrupt.IF_DYING
    assert api.interrupt_policy(api.Op.SETLK) is api.Interrupt.NEVER
    assert Lock(WRITE, 5, OFFSET_MAX).length == 0 and Lock(WRITE, 5, 9).length == 5


def _other_fd_try(path: Path, start: int, length: int) -> int:
    """A stranger (its own open file description) tries an OFD write lock: 0 or the errno."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, locks.F_OFD_SETLK, FLOCK.pack(fcntl.F_WRLCK, 0, start, length, 0))
        return 0
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[tuple[LockManager, HandleTable, Path]]:
    path = tmp_path / "disk"
    path.write_bytes(b"\0" * 4096)
    export = Export(ExportConfig(name="gold", source=str(tmp_path)), tmp_path)
    table = HandleTable()
    for flags in (os.O_RDWR, os.O_RDWR, os.O_RDONLY):
        fh = table.next_fh()
        fd = os.open(path, flags)
        table.files[fh] = Handle(fh, 7, export, "disk", path, fd, flags, False, os.getpid(), "t")
    try:
        yield LockManager(table), table, path
    finally:
        for h in table.files.values():
            os.close(h.fd)


async def test_owners_conflict_on_the_backing_file_and_close_releases(
    volume: tuple[LockManager, HandleTable, Path],
) -> None:
    mgr, _table, path = volume
    await mgr.setlk(1, 111, Lock(WRITE, 0, 99, os.getpid()))
    assert _other_fd_try(path, 50, 1) == errno.EAGAIN  # real on the backing file
    assert _other_fd_try(path, 100, 1) == 0
    with pytest.raises(FusemuxError) as info:  # another owner, through another handle
        await mgr.setlk(2, 222, Lock(WRITE, 50, 60))
    assert info.value.errno == errno.EAGAIN
    found = await mgr.getlk(2, 222, Lock(READ, 10, 10))
    assert (found.type, found.start, found.end, found.pid) == (WRITE, 0, 99, os.getpid())
    assert (await mgr.getlk(1, 111, Lock(WRITE, 0, OFFSET_MAX))).type == UNLOCK  # its own
    # The same owner through a second handle (a POSIX owner with two fds): no conflict.
    await mgr.setlk(2, 111, Lock(READ, 200, 299))
    assert [ln.split()[1:] for ln in mgr.lines(7)] == [["write", "0-99"], ["read", "200-299"]]
    assert mgr.count("gold") == 2
    # A close by the owning process drops its POSIX locks, through whichever handle.
    await mgr.flush(2, 111)
    assert mgr.lines(7) == [] and _other_fd_try(path, 0, 0) == 0
    await mgr.flush(2, 999)  # an owner that holds nothing: no call
    # OFD-style: held until the last handle of the owner is released.
    await mgr.setlk(1, 333, Lock(WRITE, 0, OFFSET_MAX))
    await mgr.release(2)
    assert _other_fd_try(path, 0, 1) == errno.EAGAIN
    await mgr.release(1)
    assert mgr.owners == {} and _other_fd_try(path, 0, 1) == 0


async def test_write_lock_needs_a_writable_handle(
    volume: tuple[LockManager, HandleTable, Path],
) -> None:
    mgr, _table, _path = volume
    with pytest.raises(FusemuxError) as info:
        await mgr.setlk(3, 1, Lock(WRITE, 0, 0))
    assert info.value.errno == errno.EBADF
    await mgr.setlk(3, 1, Lock(READ, 0, 0))
    await mgr.setlk(3, 42, Lock(UNLOCK, 0, OFFSET_MAX))  # never locked: fine, no owner made
    assert (7, 42) not in mgr.owners
    await mgr.release(3)


async def test_flock_is_exclusive_between_owners(
    volume: tuple[LockManager, HandleTable, Path],
) -> None:
    mgr, _table, path = volume
    await mgr.setlk(1, 10, Lock(WRITE, 0, OFFSET_MAX), is_flock=True)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert mgr.lines(7)[0].endswith("write 0-max")
    await mgr.setlk(1, 10, Lock(UNLOCK, 0, OFFSET_MAX), is_flock=True)
    assert mgr.lines(7) == []
    await mgr.release(1)


async def test_setlkw_waits_and_an_interrupt_ends_it_with_eintr(
    volume: tuple[LockManager, HandleTable, Path],
) -> None:
    mgr, _table, _path = volume
    await mgr.setlk(1, 1, Lock(WRITE, 0, OFFSET_MAX))
    with trio.CancelScope() as scope:
        errors: list[int] = []

        async def wait() -> None:
            try:
                await mgr.setlk(2, 2, Lock(WRITE, 0, 9), wait=True)
            except FusemuxError as e:
                errors.append(e.errno)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.sleep(0.3)
            assert errors == []  # still waiting
            scope.cancel()  # as an INTERRUPT does to the request
    assert errors == [errno.EINTR]
    assert [ln.split()[2] for ln in mgr.lines(7)] == ["0-max"]
    # And a wait that ends with the lock: the holder lets go.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: mgr.setlk(2, 2, Lock(WRITE, 0, 9), wait=True))
        await trio.sleep(0.2)
        await mgr.setlk(1, 1, Lock(UNLOCK, 0, OFFSET_MAX))
    assert [ln.split()[2] for ln in mgr.lines(7)] == ["0-9"]
    await mgr.release(1)
    await mgr.release(2)
