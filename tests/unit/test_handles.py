"""Tier (a): backing file handles and their blocking I/O (:mod:`fusemux.core.handles`).

Covers ``open_backing`` (regular files only: symlinks, directories and FIFOs are NotFound,
flags forwarded, no fd leaked, the fallback when a filesystem has no ``O_DIRECT``),
``read``/``write`` buffered and with ``O_DIRECT`` on the ext4 test directory (aligned
requests go direct, unaligned ones through the buffered fd), ``flush``/``fsync``/``close``,
the handle table, and ``opener_of`` (thread id -> process id and a sanitised comm).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusemux.config import ExportConfig
from fusemux.core import handles as hio
from fusemux.core.exports import Export
from fusemux.core.handles import DirHandle, Handle, HandleTable, open_backing, opener_of
from fusemux.errors import BadHandle, NotFound, errno_of

PAGE = 4096


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def export(tmp_path: Path) -> Export:
    return Export(ExportConfig(name="e", source="h:/e"), tmp_path)


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    path = tmp_path / "vol"
    path.write_bytes(bytes(range(256)) * 32)  # 8192 bytes
    return path


def make_handle(export: Export, path: Path, flags: int) -> Handle:
    fd, direct = open_backing(path, flags)
    return Handle(
        fh=1,
        ino=1234,
        export=export,
        name=path.name,
        path=path,
        fd=fd,
        flags=flags,
        direct=direct,
        opener_pid=os.getpid(),
        opener_comm="test",
    )


@pytest.fixture
def handles_to_close() -> Iterator[list[Handle]]:
    opened: list[Handle] = []
    yield opened
    for handle in opened:
        for fd in (handle.fd, handle.buffered_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


# -- open_backing ----------------------------------------------------------------------------


def test_open_regular_file(volume: Path) -> None:
    fd, direct = open_backing(volume, os.O_RDONLY)
    try:
        assert not direct
        assert os.pread(fd, 4, 0) == b"\x00\x01\x02\x03"
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    finally:
        os.close(fd)


def test_open_forwards_access_mode_and_sync_flags_only(volume: Path) -> None:
    fd, _ = open_backing(volume, os.O_RDWR | os.O_DSYNC | os.O_APPEND | os.O_NONBLOCK)
    try:
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert fl & os.O_ACCMODE == os.O_RDWR
        assert fl & os.O_DSYNC == os.O_DSYNC
        assert not fl & os.O_APPEND  # positional I/O; the kernel tracks offsets
        assert not fl & os.O_NONBLOCK
    finally:
        os.close(fd)


def test_open_with_o_trunc_truncates(volume: Path) -> None:
    """libfuse negotiates atomic O_TRUNC: the open itself must truncate the backing file."""
    fd, _ = open_backing(volume, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert volume.stat().st_size == 0


def test_open_direct(volume: Path) -> None:
    fd, direct = open_backing(volume, os.O_RDWR | os.O_DIRECT)
    try:
        assert direct
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)


def test_open_direct_falls_back_when_the_filesystem_refuses_it(
    volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_direct(path: str | Path, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", no_direct)
    fd, direct = open_backing(volume, os.O_RDWR | os.O_DIRECT)
    try:
        assert not direct
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)


def test_open_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_backing(tmp_path / "missing", os.O_RDONLY)


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_RDWR])
def test_open_symlink_is_not_found(tmp_path: Path, volume: Path, flags: int) -> None:
    link = tmp_path / "link"
    link.symlink_to(volume)
    before = open_fds()
    with pytest.raises(NotFound) as info:
        open_backing(link, flags)
    assert errno_of(info.value) == errno.ENOENT
    assert open_fds() == before


def test_open_directory_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    before = open_fds()
    with pytest.raises(NotFound):
        open_backing(tmp_path / "dir", os.O_RDONLY)
    assert open_fds() == before  # the fd opened to check it was closed


def test_open_fifo_read_write_is_not_found(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    before = open_fds()
    with pytest.raises(NotFound):
        open_backing(fifo, os.O_RDWR)
    assert open_fds() == before


def test_open_fifo_read_only_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fd, _ = open_backing(fifo, os.O_RDONLY)
            os.close(fd)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(1.0)
    blocked = thread.is_alive()
    if blocked:  # release the thread: open the write end, which completes its open
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        thread.join(5.0)
        os.close(fd)
    assert not blocked, "open_backing blocked on a FIFO"
    assert outcome and isinstance(outcome[0], NotFound)


# -- buffered I/O ----------------------------------------------------------------------------


def test_buffered_read_write(export: Export, volume: Path, handles_to_close: list[Handle]) -> None:
    handle = make_handle(export, volume, os.O_RDWR)
    handles_to_close.append(handle)
    assert not handle.direct and handle.writable
    assert hio.read(handle, 10, 5) == bytes(range(10, 15))
    assert hio.write(handle, 3, b"xyz") == 3
    assert hio.read(handle, 0, 8) == b"\x00\x01\x02xyz\x06\x07"
    assert hio.read(handle, 8190, 100) == b"\xfe\xff"  # short read at EOF
    assert hio.read(handle, 9000, 10) == b""
    assert hio.write(handle, 8192, b"tail") == 4
    assert volume.stat().st_size == 8196
    assert handle.buffered_fd is None


def test_read_only_handle(export: Export, volume: Path, handles_to_close: list[Handle]) -> None:
    handle = make_handle(export, volume, os.O_RDONLY)
    handles_to_close.append(handle)
    assert not handle.writable
    with pytest.raises(OSError) as info:
        hio.write(handle, 0, b"x")
    assert info.value.errno == errno.EBADF


# -- O_DIRECT I/O -----------------------------------------------------------------------------


def direct_handle(export: Export, volume: Path, handles_to_close: list[Handle]) -> Handle:
    handle = make_handle(export, volume, os.O_RDWR | os.O_DIRECT)
    handles_to_close.append(handle)
    if not handle.direct:
        pytest.skip(f"{volume.parent} does not support O_DIRECT")
    return handle


def test_direct_aligned_write_and_read(
    export: Export, volume: Path, handles_to_close: list[Handle]
) -> None:
    handle = direct_handle(export, volume, handles_to_close)
    data = b"D" * PAGE
    assert hio.write(handle, PAGE, data) == PAGE
    assert handle.buffered_fd is None  # served by the O_DIRECT fd
    assert hio.read(handle, PAGE, PAGE) == data
    assert hio.read(handle, 0, PAGE) == (bytes(range(256)) * 16)
    assert volume.read_bytes()[PAGE:] == data
    # 512-byte alignment is enough on this filesystem
    assert hio.write(handle, 512, b"s" * 512) == 512
    assert hio.read(handle, 0, 1024) == bytes(range(256)) * 2 + b"s" * 512
    assert handle.buffered_fd is None


def test_direct_read_of_unaligned_size(
    export: Export, volume: Path, handles_to_close: list[Handle]
) -> None:
    handle = direct_handle(export, volume, handles_to_close)
    assert hio.read(handle, 0, 100) == bytes(range(100))
    assert hio.read(handle, PAGE, 3 * PAGE) == volume.read_bytes()[PAGE:]  # short at EOF
    assert hio.read(handle, 2 * PAGE, PAGE) == b""


def test_direct_unaligned_writes_go_through_the_buffered_fd(
    export: Export, volume: Path, handles_to_close: list[Handle]
) -> None:
    handle = direct_handle(export, volume, handles_to_close)
    assert hio.write(handle, 100, b"xyz") == 3  # unaligned offset and length
    assert handle.buffered_fd is not None
    buffered = handle.buffered_fd
    assert not fcntl.fcntl(buffered, fcntl.F_GETFL) & os.O_DIRECT
    assert hio.write(handle, 1024, b"q" * 100) == 100  # aligned offset, unaligned length
    assert hio.write(handle, 1000, b"r" * 512) == 512  # unaligned offset, aligned length
    assert handle.buffered_fd == buffered  # opened once
    expected = bytearray(bytes(range(256)) * 32)
    expected[100:103] = b"xyz"
    expected[1024:1124] = b"q" * 100
    expected[1000:1512] = b"r" * 512
    # Read back through the O_DIRECT fd: the buffered writes reached the disk.
    assert hio.read(handle, 0, 2 * PAGE) == bytes(expected)
    assert volume.read_bytes() == bytes(expected)


def test_direct_write_falls_back_when_the_device_wants_more_alignment(
    export: Export,
    volume: Path,
    handles_to_close: list[Handle],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 512-aligned write that the filesystem refuses (4k sectors) is written buffered."""
    handle = direct_handle(export, volume, handles_to_close)

    def refuse(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "pwritev", refuse)
    assert hio.write(handle, 512, b"w" * 512) == 512
    assert handle.buffered_fd is not None
    assert volume.read_bytes()[512:1024] == b"w" * 512


def test_direct_read_at_unaligned_offset_goes_through_the_buffered_fd(
    export: Export, volume: Path, handles_to_close: list[Handle]
) -> None:
    handle = direct_handle(export, volume, handles_to_close)
    assert hio.read(handle, 100, 10) == bytes(range(100, 110))
    assert handle.buffered_fd is not None
    assert hio.read(handle, 8190, 10) == b"\xfe\xff"


def test_direct_read_error_is_raised_as_is(
    export: Export,
    volume: Path,
    handles_to_close: list[Handle],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An I/O error of the O_DIRECT read keeps its errno (no buffered retry, no BufferError)."""
    handle = direct_handle(export, volume, handles_to_close)

    def fail(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", fail)
    with pytest.raises(OSError) as info:
        hio.read(handle, 0, PAGE)
    assert type(info.value) is OSError and info.value.errno == errno.EIO
    assert handle.buffered_fd is None


# -- flush, fsync, close -------------------------------------------------------------------


def test_flush_and_fsync(export: Export, volume: Path, handles_to_close: list[Handle]) -> None:
    handle = direct_handle(export, volume, handles_to_close)
    hio.write(handle, 1, b"x")  # creates the buffered fd
    before = open_fds()
    hio.flush(handle)
    hio.fsync(handle, datasync=False)
    hio.fsync(handle, datasync=True)
    assert open_fds() == before
    assert hio.read(handle, 0, 2) == b"\x00x"  # both fds still usable


def test_close_closes_both_fds(export: Export, volume: Path) -> None:
    handle = make_handle(export, volume, os.O_RDWR | os.O_DIRECT)
    if not handle.direct:
        os.close(handle.fd)
        pytest.skip("no O_DIRECT here")
    hio.write(handle, 1, b"x")
    assert handle.buffered_fd is not None
    fds = [handle.fd, handle.buffered_fd]
    hio.close(handle)
    assert handle.buffered_fd is None
    for fd in fds:
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF


def test_close_reports_the_first_error_and_closes_the_rest(export: Export, volume: Path) -> None:
    handle = make_handle(export, volume, os.O_RDWR)
    buffered = os.open(volume, os.O_RDONLY)
    handle.buffered_fd = buffered
    os.close(handle.fd)  # the first close will fail with EBADF
    with pytest.raises(OSError) as info:
        hio.close(handle)
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError):
        os.fstat(buffered)  # closed anyway


# -- the handle table ------------------------------------------------------------------------


def test_handle_table(export: Export, volume: Path, handles_to_close: list[Handle]) -> None:
    table = HandleTable()
    fhs = [table.next_fh() for _ in range(3)]
    assert fhs == [1, 2, 3]
    handle = make_handle(export, volume, os.O_RDONLY)
    handles_to_close.append(handle)
    table.files[fhs[0]] = handle
    table.dirs[fhs[1]] = DirHandle(fh=fhs[1], ino=2, export=None)
    assert table.file(fhs[0]) is handle
    assert table.dir(fhs[1]).ino == 2
    assert table.for_inode(1234) == [handle] and table.for_inode(99) == []
    assert table.for_export("e") == [handle] and table.for_export("f") == []
    with pytest.raises(BadHandle) as info:
        table.file(fhs[1])
    assert errno_of(info.value) == errno.EBADF
    with pytest.raises(BadHandle):
        table.dir(fhs[0])
    del table.files[fhs[0]]
    assert table.next_fh() == 4  # never reused


# -- opener_of -----------------------------------------------------------------------------


def own_comm() -> str:
    return Path("/proc/self/comm").read_text().strip().replace(",", "_").replace(":", "_")


def test_opener_of_this_process() -> None:
    assert opener_of(os.getpid()) == (os.getpid(), own_comm())


def test_opener_of_a_thread_is_its_process() -> None:
    seen: list[tuple[int, tuple[int, str]]] = []
    release = threading.Event()

    def target() -> None:
        tid = threading.get_native_id()
        seen.append((tid, opener_of(tid)))
        release.wait(5)

    thread = threading.Thread(target=target, name="worker-thread")
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        release.set()
        thread.join()
    ((tid, result),) = seen
    assert tid != os.getpid()
    assert result == (os.getpid(), own_comm())


def test_opener_of_a_vanished_thread() -> None:
    assert opener_of(2**31 - 1) == (2**31 - 1, "?")


def test_opener_comm_is_sanitised(tmp_path: Path) -> None:
    """Commas and colons would break the ``pid:comm,pid:comm`` openers list."""
    sleeper = tmp_path / "we:ird,name"
    shutil.copy("/bin/sleep", sleeper)
    proc = subprocess.Popen([str(sleeper), "30"])
    try:
        deadline = time.monotonic() + 5
        while opener_of(proc.pid)[1] != "we_ird_name" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert opener_of(proc.pid) == (proc.pid, "we_ird_name")
    finally:
        proc.kill()
        proc.wait()
