"""Tier (b): the FUSE handlers of :class:`fusemux.core.fs.FileSystem`, called directly.

A FileSystem runs over a FakeMounter whose exports are "server" directories moved onto the
mount targets while mounted, so a handler that forgot to mount sees an empty directory.
Covers lookup/getattr, open/read/write/flush/fsync/release (buffered, O_DIRECT, O_TRUNC),
opendir/readdir/releasedir (hidden entries, stable offsets), setattr, statfs, every
``user.fusemux.*`` xattr with its errors, read-only exports, refused namespace changes,
mounting on demand and unmounting after the last close, shutdown, and the pyfuse3 adapter
(:class:`fusemux.engines.pyfuse3.Operations`) turning results and errors into pyfuse3 types.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pyfuse3
import pytest
import trio

import fusemux.core.capacity as capacity_mod
import fusemux.core.exports as exports_mod
import fusemux.core.fs as fs_mod
from fusemux import __version__
from fusemux.config import Config
from fusemux.core import handles as hio
from fusemux.core import workers
from fusemux.core.api import BLOCK, Ctx, EngineStatistics, SetAttr
from fusemux.core.exports import State
from fusemux.core.fs import DIR_TIMEOUT, VOLUME_TIMEOUT, FileSystem
from fusemux.core.namespace import ROOT_INO, VOLUMES_INO
from fusemux.engines.pyfuse3 import Operations
from fusemux.errors import FusemuxError, errno_of
from tests.fakes import FakeMounter, install, make_config, make_server, until

VM1 = bytes(range(256)) * 32  # 8192 bytes
GOLD_FILES = {
    "vm1.raw": VM1,
    "vm2.qcow2": b"q" * 100,
    "vm3.img": b"",
    ".hidden": b"secret",
}
ME = Ctx(pid=os.getpid(), uid=0, gid=0)


def own_comm() -> str:
    return Path("/proc/self/comm").read_text().strip().replace(",", "_").replace(":", "_")


@dataclass
class Env:
    fs: FileSystem
    fake: FakeMounter
    config: Config
    servers: dict[str, Path]

    def target(self, export: str) -> Path:
        return self.config.mnt_dir / export

    def ino(self, export: str) -> int:
        return self.fs.namespace.export_node(export).ino

    async def volume(self, export: str, name: str) -> int:
        return (await self.fs.lookup(self.ino(export), name, ME)).ino


def make_env(
    tmp_path: Path,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    *,
    linger: float = 60.0,
    read_only: frozenset[str] = frozenset(),
) -> Env:
    config = make_config(
        tmp_path / "state", ("gold", "silver", "ro"), linger=linger, read_only=read_only
    )
    gold = make_server(tmp_path, "gold", GOLD_FILES)
    (gold / "subdir").mkdir()
    (gold / "link").symlink_to("vm1.raw")
    os.mkfifo(gold / "fifo")
    servers = {
        "gold": gold,
        "silver": make_server(tmp_path, "silver", {"disk": b"silver-disk"}),
        "ro": make_server(tmp_path, "ro", {"base.img": b"read-only-data"}),
    }
    fake = FakeMounter(servers=dict(servers))
    fs = FileSystem(config, fake, nursery)
    fake.manager = fs.exports
    install(monkeypatch, fake)
    return Env(fs, fake, config, servers)


@pytest.fixture
def env(tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> Env:
    return make_env(tmp_path, nursery, monkeypatch)


async def errno_raised(call: Awaitable[object]) -> int:
    """The errno the engine would reply with for *call*'s failure (fails if it succeeds)."""
    try:
        await call
    except (FusemuxError, OSError) as e:
        return errno_of(e)
    raise AssertionError("no error raised")


# -- lookup and getattr -----------------------------------------------------------------


async def test_root_and_volumes_dirs(env: Env) -> None:
    root = await env.fs.getattr(ROOT_INO, ME)
    assert root.ino == ROOT_INO
    assert root.mode == stat.S_IFDIR | 0o755 and root.nlink == 2
    assert root.timeout == DIR_TIMEOUT
    volumes = await env.fs.lookup(ROOT_INO, "volumes", ME)
    assert volumes.ino == VOLUMES_INO and stat.S_ISDIR(volumes.mode)
    assert await errno_raised(env.fs.lookup(ROOT_INO, "other", ME)) == errno.ENOENT
    assert await errno_raised(env.fs.getattr(12345, ME)) == errno.ENOENT
    assert await errno_raised(env.fs.lookup(12345, "x", ME)) == errno.ENOENT


async def test_lookup_of_an_export_does_not_mount(env: Env) -> None:
    attr = await env.fs.lookup(VOLUMES_INO, "gold", ME)
    assert attr.ino == env.ino("gold") and stat.S_ISDIR(attr.mode)
    assert (await env.fs.getattr(attr.ino, ME)) == attr
    assert await errno_raised(env.fs.lookup(VOLUMES_INO, "nope", ME)) == errno.ENOENT
    assert env.fake.mount_calls == []


async def test_lookup_of_a_volume_mounts_its_export(env: Env) -> None:
    attr = await env.fs.lookup(env.ino("gold"), "vm1.raw", ME)
    assert env.fake.mount_count("gold") == 1 and env.fake.mount_count() == 1
    st = (env.target("gold") / "vm1.raw").stat()
    assert attr.ino == env.fs.namespace.volume_node("gold", "vm1.raw").ino
    assert stat.S_ISREG(attr.mode) and attr.nlink == 1
    assert (attr.size, attr.mode, attr.uid, attr.gid) == (8192, st.st_mode, st.st_uid, st.st_gid)
    assert attr.mtime_ns == st.st_mtime_ns and attr.blocks == st.st_blocks
    assert attr.timeout == VOLUME_TIMEOUT
    export = env.fs.exports.get("gold")
    assert export.holders == 0 and export.mounted  # a transient hold, now lingering
    # The same name gives the same inode; getattr stats the backing file again.
    assert (await env.fs.lookup(env.ino("gold"), "vm1.raw", ME)).ino == attr.ino
    (env.target("gold") / "vm1.raw").write_bytes(b"short")
    assert (await env.fs.getattr(attr.ino, ME)).size == 5
    assert env.fake.mount_count() == 1


@pytest.mark.parametrize("name", ["subdir", "link", "fifo", "missing"])
async def test_lookup_of_non_volumes(env: Env, name: str) -> None:
    assert await errno_raised(env.fs.lookup(env.ino("gold"), name, ME)) == errno.ENOENT
    assert env.fs.exports.get("gold").holders == 0


@pytest.mark.parametrize(
    ("name", "err"),
    [
        (".hidden", errno.ENOENT),
        ("..", errno.ENOENT),
        ("a/b", errno.ENOENT),
        ("../gold/vm1.raw", errno.ENOENT),
        ("vm1.raw\0", errno.ENOENT),
        ("x" * 256, errno.ENAMETOOLONG),
    ],
)
async def test_lookup_of_invisible_names_does_not_mount(env: Env, name: str, err: int) -> None:
    assert await errno_raised(env.fs.lookup(env.ino("gold"), name, ME)) == err
    assert await errno_raised(env.fs.lookup(VOLUMES_INO, name, ME)) == err
    assert env.fake.mount_calls == []


async def test_lookup_under_a_volume(env: Env) -> None:
    ino = await env.volume("gold", "vm1.raw")
    assert await errno_raised(env.fs.lookup(ino, "x", ME)) == errno.ENOTDIR


async def test_getattr_of_a_volume_that_vanished(env: Env) -> None:
    ino = await env.volume("gold", "vm2.qcow2")
    (env.target("gold") / "vm2.qcow2").unlink()
    assert await errno_raised(env.fs.getattr(ino, ME)) == errno.ENOENT
    (env.target("gold") / "vm2.qcow2").symlink_to("vm1.raw")
    assert await errno_raised(env.fs.getattr(ino, ME)) == errno.ENOENT


async def test_lookup_on_a_failing_export(env: Env) -> None:
    env.fake.fail("gold", "mount.nfs: Connection refused")
    assert await errno_raised(env.fs.lookup(env.ino("gold"), "vm1.raw", ME)) == errno.ECONNREFUSED
    export = env.fs.exports.get("gold")
    assert export.state is State.FAILED and export.holders == 0


# -- files -------------------------------------------------------------------------------


async def test_open_read_write_release(env: Env) -> None:
    ino = await env.volume("gold", "vm1.raw")
    reply = await env.fs.open(ino, os.O_RDWR, ME)
    assert reply.fh > 0 and not reply.direct_io and not reply.keep_cache
    export = env.fs.exports.get("gold")
    assert export.holders == 1
    assert await env.fs.read(reply.fh, 0, 4) == b"\x00\x01\x02\x03"
    assert await env.fs.write(reply.fh, 2, b"hello") == 5
    assert await env.fs.read(reply.fh, 0, 8) == b"\x00\x01hello\x07"
    assert await env.fs.read(reply.fh, 8190, 100) == b"\xfe\xff"
    await env.fs.flush(reply.fh)
    await env.fs.fsync(reply.fh, True)
    await env.fs.fsync(reply.fh, False)
    fd = env.fs.handles.file(reply.fh).fd
    await env.fs.release(reply.fh)
    assert export.holders == 0
    with pytest.raises(OSError):
        os.fstat(fd)  # the backing fd is closed
    assert (env.target("gold") / "vm1.raw").read_bytes()[:8] == b"\x00\x01hello\x07"
    assert await errno_raised(env.fs.read(reply.fh, 0, 1)) == errno.EBADF
    await env.fs.release(reply.fh)  # a second release is ignored
    assert export.holders == 0


async def test_flush_runs_only_after_writes(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    flushed: list[int] = []
    real_flush = hio.flush

    def counting_flush(handle: hio.Handle) -> None:
        flushed.append(handle.fh)
        real_flush(handle)

    monkeypatch.setattr(hio, "flush", counting_flush)
    ino = await env.volume("gold", "vm1.raw")
    reply = await env.fs.open(ino, os.O_RDWR, ME)
    await env.fs.read(reply.fh, 0, 4)
    await env.fs.flush(reply.fh)
    assert flushed == []  # nothing written: no write-back error to report, no syscalls
    await env.fs.write(reply.fh, 0, b"x")
    await env.fs.flush(reply.fh)
    await env.fs.flush(reply.fh)
    assert flushed == [reply.fh]
    await env.fs.write(reply.fh, 1, b"y")
    await env.fs.flush(reply.fh)
    assert flushed == [reply.fh, reply.fh]
    await env.fs.release(reply.fh)


async def test_each_open_is_a_holder(env: Env) -> None:
    ino = await env.volume("gold", "vm1.raw")
    fhs = [(await env.fs.open(ino, os.O_RDONLY, ME)).fh for _ in range(3)]
    assert len(set(fhs)) == 3
    assert env.fs.exports.get("gold").holders == 3
    assert env.fs.open_volumes() == ["gold/vm1.raw"]
    for fh in fhs:
        await env.fs.release(fh)
    assert env.fs.exports.get("gold").holders == 0
    assert env.fs.open_volumes() == []
    assert env.fake.mount_count() == 1


async def test_open_direct(env: Env) -> None:
    ino = await env.volume("gold", "vm1.raw")
    reply = await env.fs.open(ino, os.O_RDWR | os.O_DIRECT, ME)
    assert reply.direct_io
    handle = env.fs.handles.file(reply.fh)
    if not handle.direct:
        await env.fs.release(reply.fh)
        pytest.skip("the test directory has no O_DIRECT")
    assert await env.fs.write(reply.fh, 4096, b"D" * 4096) == 4096
    assert await env.fs.read(reply.fh, 4096, 4096) == b"D" * 4096
    assert await env.fs.write(reply.fh, 1, b"xy") == 2  # unaligned: through the buffered fd
    assert await env.fs.read(reply.fh, 0, 4) == b"\x00xy\x03"
    assert await env.fs.read(reply.fh, 1, 2) == b"xy"
    await env.fs.release(reply.fh)
    assert env.fs.exports.get("gold").holders == 0


async def test_open_with_o_trunc_truncates(env: Env) -> None:
    ino = await env.volume("gold", "vm1.raw")
    reply = await env.fs.open(ino, os.O_WRONLY | os.O_TRUNC, ME)
    try:
        assert (await env.fs.getattr(ino, ME)).size == 0
    finally:
        await env.fs.release(reply.fh)


async def test_open_of_directories_is_eisdir(env: Env) -> None:
    for ino in (ROOT_INO, VOLUMES_INO, env.ino("gold")):
        assert await errno_raised(env.fs.open(ino, os.O_RDONLY, ME)) == errno.EISDIR
    assert await errno_raised(env.fs.open(999999, os.O_RDONLY, ME)) == errno.ENOENT
    assert env.fake.mount_calls == []


async def test_open_of_a_volume_replaced_by_a_symlink(env: Env) -> None:
    ino = await env.volume("gold", "vm2.qcow2")
    path = env.target("gold") / "vm2.qcow2"
    path.unlink()
    path.symlink_to("vm1.raw")
    assert await errno_raised(env.fs.open(ino, os.O_RDONLY, ME)) == errno.ENOENT
    assert env.fs.exports.get("gold").holders == 0
    assert env.fs.handles.files == {}


async def test_open_on_a_failing_export(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exports_mod, "TRANSIENT_GRACE", 0.01)
    env = make_env(tmp_path, nursery, monkeypatch, linger=0)
    export = env.fs.exports.get("gold")
    ino = await env.volume("gold", "vm1.raw")
    await until(lambda: export.state is State.UNMOUNTED)
    env.fake.fail("gold", "mount.nfs: Connection timed out")
    assert await errno_raised(env.fs.open(ino, os.O_RDWR, ME)) == errno.ETIMEDOUT
    assert export.holders == 0 and export.state is State.FAILED
    assert env.fs.handles.files == {}
    env.fake.stop_failing()
    # Within the backoff the failure repeats without a new mount attempt.
    calls = len(env.fake.mount_calls)
    assert await errno_raised(env.fs.open(ino, os.O_RDWR, ME)) == errno.ETIMEDOUT
    assert len(env.fake.mount_calls) == calls
    assert export.mount_failures == {"ETIMEDOUT": 1}  # fusemux_export_mount_failures_total
    monkeypatch.setattr(export, "retry_at", 0.0)  # the backoff has passed
    reply = await env.fs.open(ino, os.O_RDWR, ME)  # retried
    assert export.mounted and export.holders == 1
    await env.fs.release(reply.fh)


async def test_write_on_a_read_only_handle(env: Env) -> None:
    ino = await env.volume("gold", "vm1.raw")
    reply = await env.fs.open(ino, os.O_RDONLY, ME)
    assert await errno_raised(env.fs.write(reply.fh, 0, b"x")) == errno.EBADF
    await env.fs.release(reply.fh)


# -- read-only exports and the namespace -----------------------------------------------------


async def test_read_only_export(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(tmp_path, nursery, monkeypatch, read_only=frozenset({"ro"}))
    ino = await env.volume("ro", "base.img")
    mounts = env.fake.mount_count()
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDWR | os.O_DIRECT):
        assert await errno_raised(env.fs.open(ino, flags, ME)) == errno.EROFS
    assert env.fs.exports.get("ro").holders == 0
    assert env.fake.mount_count() == mounts
    reply = await env.fs.open(ino, os.O_RDONLY, ME)
    assert await env.fs.read(reply.fh, 0, 100) == b"read-only-data"
    assert await errno_raised(env.fs.write(reply.fh, 0, b"x")) == errno.EROFS
    assert await errno_raised(env.fs.setattr(ino, SetAttr(size=0), None, ME)) == errno.EROFS
    await env.fs.release(reply.fh)
    assert (env.target("ro") / "base.img").read_bytes() == b"read-only-data"
    assert await env.fs.getxattr(env.ino("ro"), "user.fusemux.read_only", ME) == b"1"
    assert await env.fs.getxattr(env.ino("gold"), "user.fusemux.read_only", ME) == b"0"
    # The other exports stay writable.
    gold = await env.volume("gold", "vm2.qcow2")
    reply = await env.fs.open(gold, os.O_RDWR, ME)
    await env.fs.release(reply.fh)


@pytest.mark.parametrize("op", ["create", "mknod", "mkdir", "unlink", "rmdir", "rename"])
async def test_namespace_changes_are_refused(env: Env, op: str) -> None:
    error = env.fs.refuse_namespace_change(op)
    assert errno_of(error) == errno.EPERM
    assert op in error.message


# -- directories ---------------------------------------------------------------------------


async def test_readdir_root(env: Env) -> None:
    fh = await env.fs.opendir(ROOT_INO, ME)
    entries = await env.fs.readdir(fh, 0)
    assert [(e.name, e.attr.ino, e.next_offset) for e in entries] == [
        ("volumes", VOLUMES_INO, VOLUMES_INO)
    ]
    assert await env.fs.readdir(fh, VOLUMES_INO) == []
    await env.fs.releasedir(fh)
    assert env.fs.handles.dirs == {}


async def test_readdir_volumes_lists_exports_without_mounting(env: Env) -> None:
    fh = await env.fs.opendir(VOLUMES_INO, ME)
    entries = await env.fs.readdir(fh, 0)
    assert {e.name for e in entries} == {"gold", "silver", "ro"}
    assert [e.attr.ino for e in entries] == sorted(e.attr.ino for e in entries)
    assert all(e.next_offset == e.attr.ino == env.ino(e.name) for e in entries)
    assert await env.fs.readdir(fh, entries[0].next_offset) == entries[1:]
    await env.fs.releasedir(fh)
    assert env.fake.mount_calls == []


async def test_readdir_export(env: Env) -> None:
    fh = await env.fs.opendir(env.ino("gold"), ME)
    export = env.fs.exports.get("gold")
    assert env.fake.mount_count() == 1 and export.holders == 1  # the handle holds it
    entries = await env.fs.readdir(fh, 0)
    # Dot files, directories, symlinks and FIFOs are not volumes.
    assert sorted(e.name for e in entries) == ["vm1.raw", "vm2.qcow2", "vm3.img"]
    assert [e.next_offset for e in entries] == sorted(e.attr.ino for e in entries)
    by_name = {e.name: e for e in entries}
    assert by_name["vm1.raw"].attr.size == 8192 and by_name["vm2.qcow2"].attr.size == 100
    assert by_name["vm1.raw"].attr.ino == await env.volume("gold", "vm1.raw")
    # Offsets are stable: resuming after the 2nd entry gives the rest.
    assert await env.fs.readdir(fh, entries[1].next_offset) == entries[2:]
    assert await env.fs.readdir(fh, entries[-1].next_offset) == []
    await env.fs.releasedir(fh)
    assert export.holders == 0
    await env.fs.releasedir(fh)  # unknown handle: ignored
    assert export.holders == 0


async def test_readdir_snapshot_and_refresh(env: Env) -> None:
    fh = await env.fs.opendir(env.ino("gold"), ME)
    first = await env.fs.readdir(fh, 0)
    (env.target("gold") / "new.raw").write_bytes(b"n")
    # A continuation uses the snapshot taken at offset 0 ...
    assert await env.fs.readdir(fh, first[0].next_offset) == first[1:]
    # ... a rewind lists again.
    again = await env.fs.readdir(fh, 0)
    assert sorted(e.name for e in again) == ["new.raw", "vm1.raw", "vm2.qcow2", "vm3.img"]
    await env.fs.releasedir(fh)


async def test_directory_handle_errors(env: Env) -> None:
    ino = await env.volume("gold", "vm1.raw")
    assert await errno_raised(env.fs.opendir(ino, ME)) == errno.ENOTDIR
    assert await errno_raised(env.fs.readdir(4242, 0)) == errno.EBADF
    env.fake.fail("silver")
    assert await errno_raised(env.fs.opendir(env.ino("silver"), ME)) == errno.ECONNREFUSED
    assert env.fs.handles.dirs == {} and env.fs.exports.get("silver").holders == 0


# -- setattr -----------------------------------------------------------------------------


async def test_setattr_size_times_mode_owner(env: Env) -> None:
    ino = await env.volume("gold", "vm1.raw")
    path = env.target("gold") / "vm1.raw"
    attr = await env.fs.setattr(ino, SetAttr(size=100), None, ME)
    assert attr.size == 100 == path.stat().st_size
    before = path.stat()
    attr = await env.fs.setattr(ino, SetAttr(mtime_ns=1_000_000_000_123), None, ME)
    assert attr.mtime_ns == 1_000_000_000_123 == path.stat().st_mtime_ns
    assert attr.atime_ns == before.st_atime_ns  # unchanged
    attr = await env.fs.setattr(ino, SetAttr(atime_ns=2_000_000_000_000, mtime_ns=5), None, ME)
    assert (attr.atime_ns, attr.mtime_ns) == (2_000_000_000_000, 5)
    attr = await env.fs.setattr(ino, SetAttr(mode=stat.S_IFREG | 0o600), None, ME)
    assert stat.S_IMODE(attr.mode) == 0o600 and stat.S_ISREG(attr.mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    if os.geteuid() == 0:
        attr = await env.fs.setattr(ino, SetAttr(uid=1234, gid=5678), None, ME)
        assert (attr.uid, attr.gid) == (1234, 5678)
        attr = await env.fs.setattr(ino, SetAttr(gid=4321), None, ME)
        assert (attr.uid, attr.gid) == (1234, 4321)
    assert env.fs.exports.get("gold").holders == 0


async def test_setattr_size_through_an_open_handle(env: Env) -> None:
    ino = await env.volume("gold", "vm1.raw")
    reply = await env.fs.open(ino, os.O_RDWR, ME)
    attr = await env.fs.setattr(ino, SetAttr(size=10), reply.fh, ME)
    assert attr.size == 10
    assert await env.fs.read(reply.fh, 0, 100) == VM1[:10]
    await env.fs.release(reply.fh)


async def test_setattr_of_directories_is_refused(env: Env) -> None:
    for ino in (ROOT_INO, VOLUMES_INO, env.ino("gold")):
        assert await errno_raised(env.fs.setattr(ino, SetAttr(mode=0o777), None, ME)) == errno.EPERM


async def test_setattr_does_not_follow_a_symlinked_volume(env: Env, tmp_path: Path) -> None:
    ino = await env.volume("gold", "vm2.qcow2")
    victim = tmp_path / "victim"  # outside every export
    victim.write_bytes(b"precious")
    victim.chmod(0o644)
    path = env.target("gold") / "vm2.qcow2"
    path.unlink()
    path.symlink_to(victim)
    for change in (SetAttr(size=0), SetAttr(mode=stat.S_IFREG | 0o777)):
        assert await errno_raised(env.fs.setattr(ino, change, None, ME)) == errno.ENOENT
    assert victim.read_bytes() == b"precious"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


# -- statfs --------------------------------------------------------------------------------


async def test_statfs_sums_mounted_exports_and_never_mounts(env: Env) -> None:
    empty = await env.fs.statfs(ME)
    assert (empty.bsize, empty.blocks, empty.bfree, empty.files, empty.namemax) == (
        BLOCK,
        0,
        0,
        0,
        255,
    )
    assert env.fake.mount_calls == []
    await env.volume("gold", "vm1.raw")
    st = os.statvfs(env.target("gold"))
    one = await env.fs.statfs(ME)
    assert one.blocks == int(st.f_blocks * st.f_frsize / BLOCK)
    assert one.files == st.f_files
    assert 0 < one.bavail <= one.bfree <= one.blocks
    await env.volume("silver", "disk")
    two = await env.fs.statfs(ME)
    assert two.blocks == 2 * one.blocks  # both live on the test filesystem
    assert env.fake.mount_count() == 2
    assert all(e.holders == 0 for e in env.fs.exports.exports.values())


# -- xattrs --------------------------------------------------------------------------------

EXPORT_KEYS = [
    "state",
    "source",
    "fstype",
    "holders",
    "mount_count",
    "last_error",
    "capacity",
    "free",
    "open_volumes",
    "backing_path",
    "read_only",
    "pinned",
    "retry_in",
    "removed",
    "mapped_volumes",
    "health",
    "status_json",
]
VOLUME_KEYS = [
    "export",
    "source",
    "backing_path",
    "open_count",
    "openers",
    "format",
    "virtual_size",
    "backing_file",
    "chain",
    "active_image",
    "mapping",
    "mapping_options",
    "mapping_pid",
    "locks",
]
P = "user.fusemux."


async def xattrs_of(env: Env, ino: int) -> dict[str, str]:
    return {
        key.removeprefix(P): (await env.fs.getxattr(ino, key, ME)).decode()
        for key in await env.fs.listxattr(ino, ME)
    }


async def test_root_xattrs(env: Env) -> None:
    assert await env.fs.listxattr(ROOT_INO, ME) == [
        P + "version",
        P + "pid",
        P + "engine",
        P + "engine_stats",
    ]
    # No engine serves this core: the engine keys are empty.
    assert await xattrs_of(env, ROOT_INO) == {
        "version": __version__,
        "pid": str(os.getpid()),
        "engine": "",
        "engine_stats": "{}",
    }

    class Engine:
        name = "test"
        served = 0

        def statistics(self) -> EngineStatistics:
            return EngineStatistics(passthrough=False, requests={"READ": self.served})

    engine = Engine()
    env.fs.attach(engine)
    assert (await env.fs.getxattr(ROOT_INO, P + "engine", ME)) == b"test"
    stats = json.loads(await env.fs.getxattr(ROOT_INO, P + "engine_stats", ME))
    assert stats == {"passthrough": False, "requests": {"READ": 0}}
    engine.served = 7  # read live, at every getxattr
    stats = json.loads(await env.fs.getxattr(ROOT_INO, P + "engine_stats", ME))
    assert stats["requests"] == {"READ": 7}
    assert await env.fs.listxattr(VOLUMES_INO, ME) == []
    assert await errno_raised(env.fs.getxattr(VOLUMES_INO, P + "state", ME)) == errno.ENODATA


async def test_export_xattrs_while_unmounted_never_mount(env: Env) -> None:
    ino = env.ino("gold")
    keys = await env.fs.listxattr(ino, ME)
    assert keys == [P + k for k in EXPORT_KEYS if k not in ("capacity", "free")]
    assert await xattrs_of(env, ino) == {
        "state": "unmounted",
        "source": "server:/gold",
        "fstype": "nfs",
        "holders": "0",
        "mount_count": "0",
        "last_error": "",
        "open_volumes": "",
        "backing_path": str(env.target("gold")),
        "read_only": "0",
        "pinned": "0",
        "retry_in": "0",
        "removed": "0",
        "mapped_volumes": "",
        "health": "ok",
        "status_json": '{"locks": 0, "mappings": {}, "open": {}}',
    }
    for key in ("capacity", "free"):
        assert await errno_raised(env.fs.getxattr(ino, P + key, ME)) == errno.ENODATA
    assert env.fake.mount_calls == []


async def test_export_xattrs_while_mounted(env: Env) -> None:
    vol = await env.volume("gold", "vm1.raw")
    fhs = [(await env.fs.open(vol, os.O_RDONLY, ME)).fh for _ in range(2)]
    other = await env.volume("gold", "vm3.img")
    fhs.append((await env.fs.open(other, os.O_RDONLY, ME)).fh)
    ino = env.ino("gold")
    assert await env.fs.listxattr(ino, ME) == [P + k for k in EXPORT_KEYS]
    values = await xattrs_of(env, ino)
    st = os.statvfs(env.target("gold"))
    assert values["state"] == "mounted"
    assert values["holders"] == "3" and values["mount_count"] == "1"
    assert values["open_volumes"] == "vm1.raw,vm3.img"
    assert int(values["capacity"]) == st.f_blocks * st.f_frsize
    assert 0 < int(values["free"]) <= int(values["capacity"])
    assert env.fs.exports.get("gold").holders == 3  # the statvfs hold was dropped
    for fh in fhs:
        await env.fs.release(fh)
    assert (await xattrs_of(env, ino))["holders"] == "0"


async def test_export_xattrs_after_a_failed_mount(env: Env) -> None:
    env.fake.fail("silver", "mount.nfs: access denied by server while mounting server:/silver")
    assert await errno_raised(env.fs.lookup(env.ino("silver"), "disk", ME)) == errno.EACCES
    values = await xattrs_of(env, env.ino("silver"))
    assert values["state"] == "failed"
    assert values["last_error"] == (
        "mount failed: mount.nfs: access denied by server while mounting server:/silver"
    )
    assert values["holders"] == "0" and values["mount_count"] == "0"
    assert "capacity" not in values


async def test_volume_xattrs(env: Env) -> None:
    ino = await env.volume("gold", "vm1.raw")
    assert await env.fs.listxattr(ino, ME) == [P + k for k in VOLUME_KEYS]
    assert await xattrs_of(env, ino) == {
        "export": "gold",
        "source": "server:/gold",
        "backing_path": str(env.target("gold") / "vm1.raw"),
        "open_count": "0",
        "openers": "",
        "format": "raw",
        "virtual_size": str(len(VM1)),
        "backing_file": "",
        "chain": "vm1.raw",
        "active_image": "",
        "mapping": "",
        "mapping_options": "",
        "mapping_pid": "",
        "locks": "",
    }
    fhs = [(await env.fs.open(ino, os.O_RDONLY, ME)).fh for _ in range(2)]
    values = await xattrs_of(env, ino)
    assert values["open_count"] == "2"
    assert values["openers"] == f"{os.getpid()}:{own_comm()}"  # unique pairs
    fhs.append((await env.fs.open(ino, os.O_RDONLY, Ctx())).fh)  # no pid: "0:?"
    values = await xattrs_of(env, ino)
    assert values["open_count"] == "3"
    assert values["openers"] == f"0:?,{os.getpid()}:{own_comm()}"
    other = await env.volume("gold", "vm2.qcow2")
    assert (await xattrs_of(env, other))["open_count"] == "0"
    for fh in fhs:
        await env.fs.release(fh)
    assert (await xattrs_of(env, ino))["openers"] == ""


@pytest.mark.parametrize("name", [P + "nope", P + "state"])
async def test_unknown_fusemux_keys_are_enodata(env: Env, name: str) -> None:
    ino = await env.volume("gold", "vm1.raw")  # "state" is an export key, not a volume key
    assert await errno_raised(env.fs.getxattr(ino, name, ME)) == errno.ENODATA
    if name != P + "state":
        for node in (ROOT_INO, env.ino("gold")):
            assert await errno_raised(env.fs.getxattr(node, name, ME)) == errno.ENODATA


@pytest.mark.parametrize(
    "name",
    [
        "security.capability",
        "security.selinux",
        "system.posix_acl_access",
        "user.other",
        "trusted.x",
        "trusted.libvirt.security.ref_dac",
        "user.fusemu",  # a prefix of the namespace is not in it
    ],
)
async def test_foreign_xattrs_are_not_supported(env: Env, name: str) -> None:
    """Get, set and remove of a name fusemux can never store all answer EOPNOTSUPP, on
    every node, and the engines' shortcut agrees with the core."""
    ino = await env.volume("gold", "vm1.raw")
    for node in (ROOT_INO, VOLUMES_INO, env.ino("gold"), ino):
        assert await errno_raised(env.fs.getxattr(node, name, ME)) == errno.EOPNOTSUPP
        assert await errno_raised(env.fs.setxattr(node, name, b"x", ME)) == errno.EOPNOTSUPP
        assert await errno_raised(env.fs.removexattr(node, name, ME)) == errno.EOPNOTSUPP
    assert env.fs.xattr_refusal(name.encode()) == errno.EOPNOTSUPP
    assert env.fs.xattr_refusal((P + "state").encode()) == 0


async def test_set_and_remove_xattr(env: Env) -> None:
    ino = await env.volume("gold", "vm1.raw")
    for node in (ROOT_INO, VOLUMES_INO, env.ino("gold"), ino):
        assert await errno_raised(env.fs.setxattr(node, P + "state", b"x", ME)) == errno.EPERM
        assert await errno_raised(env.fs.setxattr(node, P + "new", b"x", ME)) == errno.EPERM
        assert await errno_raised(env.fs.setxattr(node, "user.tag", b"x", ME)) == errno.ENOTSUP
        assert await errno_raised(env.fs.removexattr(node, P + "pid", ME)) == errno.EPERM
        assert await errno_raised(env.fs.removexattr(node, "user.tag", ME)) == errno.ENOTSUP
    assert await errno_raised(env.fs.setxattr(999999, "user.tag", b"x", ME)) == errno.ENOENT
    assert os.listxattr(env.target("gold") / "vm1.raw") == []  # nothing reached the backing


# -- mount lifecycle through the handlers --------------------------------------------------


async def test_last_close_unmounts_after_linger(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exports_mod, "TRANSIENT_GRACE", 0.05)
    env = make_env(tmp_path, nursery, monkeypatch, linger=0)
    export = env.fs.exports.get("gold")
    ino = await env.volume("gold", "vm1.raw")
    reply = await env.fs.open(ino, os.O_RDWR, ME)  # joins the mount of the lookup
    assert env.fake.mount_count() == 1
    await env.fs.write(reply.fh, 0, b"persist")
    await env.fs.release(reply.fh)
    await until(lambda: export.state is State.UNMOUNTED)
    assert os.listdir(env.target("gold")) == []  # an empty mountpoint again
    assert env.fake.umount_count() == 1
    # The next lookup mounts again and sees what was written.
    reply = await env.fs.open(await env.volume("gold", "vm1.raw"), os.O_RDONLY, ME)
    assert await env.fs.read(reply.fh, 0, 7) == b"persist"
    assert env.fake.mount_count() == 2 and export.mount_count == 2
    await env.fs.release(reply.fh)


async def test_shutdown_closes_everything(env: Env) -> None:
    ino = await env.volume("gold", "vm1.raw")
    reply = await env.fs.open(ino, os.O_RDWR, ME)
    fd = env.fs.handles.file(reply.fh).fd
    dh = await env.fs.opendir(env.ino("silver"), ME)
    await env.fs.shutdown()
    assert env.fs.handles.files == {} and env.fs.handles.dirs == {}
    with pytest.raises(OSError):
        os.fstat(fd)
    assert env.fake.mounted == set()
    assert all(e.holders == 0 for e in env.fs.exports.exports.values())
    assert all(e.state is State.UNMOUNTED for e in env.fs.exports.exports.values())
    assert await errno_raised(env.fs.open(ino, os.O_RDONLY, ME)) == errno.ESHUTDOWN
    assert await errno_raised(env.fs.readdir(dh, 0)) == errno.EBADF


# -- the pyfuse3 adapter --------------------------------------------------------------------


def rctx(pid: int = 0) -> pyfuse3.RequestContext:
    return cast(pyfuse3.RequestContext, SimpleNamespace(pid=pid, uid=0, gid=0, umask=0))


async def fuse_errno(call: Callable[[], Awaitable[object]]) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call()
    return info.value.errno


async def test_adapter_lookup_getattr_open_read(env: Env) -> None:
    ops = Operations(env.fs)
    ctx = rctx(os.getpid())
    gold = await ops.lookup(pyfuse3.InodeT(VOLUMES_INO), b"gold", ctx)
    assert isinstance(gold, pyfuse3.EntryAttributes)
    assert gold.st_ino == env.ino("gold") and stat.S_ISDIR(gold.st_mode)
    assert gold.entry_timeout == DIR_TIMEOUT
    vol = await ops.lookup(pyfuse3.InodeT(env.ino("gold")), b"vm1.raw", ctx)
    core = env.fs.namespace.volume_node("gold", "vm1.raw")
    assert vol.st_ino == core.ino and vol.st_size == 8192
    assert vol.attr_timeout == VOLUME_TIMEOUT
    attr = await ops.getattr(pyfuse3.InodeT(core.ino), ctx)
    assert (attr.st_ino, attr.st_size, attr.st_nlink) == (core.ino, 8192, 1)
    assert (await ops.getattr(pyfuse3.InodeT(ROOT_INO))).st_ino == ROOT_INO  # no ctx
    info = await ops.open(pyfuse3.InodeT(core.ino), os.O_RDONLY | os.O_DIRECT, ctx)
    assert isinstance(info, pyfuse3.FileInfo) and info.direct_io and not info.keep_cache
    assert await ops.read(info.fh, 0, 4) == b"\x00\x01\x02\x03"
    handle = env.fs.handles.file(info.fh)
    assert (handle.opener_pid, handle.opener_comm) == (os.getpid(), own_comm())
    await ops.release(info.fh)
    assert env.fs.handles.files == {}


async def test_adapter_errors(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    ops = Operations(env.fs)
    ctx = rctx()
    gold = pyfuse3.InodeT(env.ino("gold"))
    assert await fuse_errno(lambda: ops.lookup(gold, b"missing", ctx)) == errno.ENOENT
    assert await fuse_errno(lambda: ops.lookup(pyfuse3.InodeT(1), b"x", ctx)) == errno.ENOENT
    assert await fuse_errno(lambda: ops.getattr(pyfuse3.InodeT(999999), ctx)) == errno.ENOENT
    assert await fuse_errno(lambda: ops.open(gold, os.O_RDONLY, ctx)) == errno.EISDIR
    assert await fuse_errno(lambda: ops.read(pyfuse3.FileHandleT(777), 0, 1)) == errno.EBADF
    name = b"user.fusemux.nope"
    assert await fuse_errno(lambda: ops.getxattr(gold, name, ctx)) == errno.ENODATA
    cap = b"security.capability"
    assert await fuse_errno(lambda: ops.getxattr(gold, cap, ctx)) == errno.EOPNOTSUPP
    pid_key = b"user.fusemux.pid"
    assert await fuse_errno(lambda: ops.setxattr(gold, pid_key, b"1", ctx)) == errno.EPERM
    assert await fuse_errno(lambda: ops.removexattr(gold, b"user.x", ctx)) == errno.ENOTSUP
    assert await fuse_errno(lambda: ops.unlink(gold, b"vm1.raw", ctx)) == errno.EPERM
    assert await fuse_errno(lambda: ops.mkdir(gold, b"d", 0o755, ctx)) == errno.EPERM
    assert await fuse_errno(lambda: ops.create(gold, b"f", 0o644, os.O_RDWR, ctx)) == errno.EPERM
    root = pyfuse3.InodeT(ROOT_INO)
    assert await fuse_errno(lambda: ops.rename(gold, b"a", root, b"b", 0, ctx)) == errno.EPERM
    env.fake.fail("silver", "mount.nfs: Connection refused")
    silver = pyfuse3.InodeT(env.ino("silver"))
    assert await fuse_errno(lambda: ops.lookup(silver, b"disk", ctx)) == errno.ECONNREFUSED
    assert await fuse_errno(lambda: ops.opendir(silver, ctx)) == errno.ECONNREFUSED

    async def broken(*args: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(env.fs, "getattr", broken)
    assert await fuse_errno(lambda: ops.getattr(root, ctx)) == errno.EIO


async def test_adapter_xattrs_statfs_and_readdir_handles(env: Env) -> None:
    ops = Operations(env.fs)
    ctx = rctx()
    root = pyfuse3.InodeT(ROOT_INO)
    assert await ops.listxattr(root, ctx) == [
        b"user.fusemux.version",
        b"user.fusemux.pid",
        b"user.fusemux.engine",
        b"user.fusemux.engine_stats",
    ]
    assert await ops.getxattr(root, b"user.fusemux.version", ctx) == __version__.encode()
    st = await ops.statfs(ctx)
    assert st.f_bsize == st.f_frsize == BLOCK and st.f_blocks == 0 and st.f_namemax == 255
    fh = await ops.opendir(pyfuse3.InodeT(env.ino("gold")), ctx)
    assert env.fs.exports.get("gold").holders == 1
    await ops.releasedir(fh)
    assert env.fs.exports.get("gold").holders == 0
    await ops.forget([(root, 1)])


async def test_adapter_write_flush_fsync(env: Env) -> None:
    ops = Operations(env.fs)
    ctx = rctx()
    ino = pyfuse3.InodeT(await env.volume("gold", "vm2.qcow2"))
    info = await ops.open(ino, os.O_RDWR, ctx)
    assert await ops.write(info.fh, 0, b"abc") == 3
    await ops.flush(info.fh)
    await ops.fsync(info.fh, True)
    await ops.release(info.fh)
    assert (env.target("gold") / "vm2.qcow2").read_bytes()[:3] == b"abc"
    ro = await ops.open(ino, os.O_RDONLY, ctx)
    assert await fuse_errno(lambda: ops.write(ro.fh, 0, b"x")) == errno.EBADF
    await ops.release(ro.fh)
    attrs = pyfuse3.EntryAttributes()
    attrs.st_size = 1
    flags = dict.fromkeys(["atime", "mtime", "mode", "uid", "gid"], False)
    fields = cast(
        pyfuse3.SetattrFields,
        SimpleNamespace(update_size=True, **{f"update_{k}": v for k, v in flags.items()}),
    )
    entry = await ops.setattr(ino, attrs, fields, None, ctx)
    assert entry.st_size == 1 and entry.st_ino == ino


async def test_adapter_readdir_replies_until_the_buffer_is_full(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = Operations(env.fs)
    replies: list[tuple[bytes, int, int]] = []
    room = 2

    def readdir_reply(
        token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int
    ) -> bool:
        if len(replies) == room:
            return False
        replies.append((name, attr.st_ino, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", readdir_reply)
    token = cast(pyfuse3.ReaddirToken, object())
    fh = await ops.opendir(pyfuse3.InodeT(env.ino("gold")), rctx())
    await ops.readdir(fh, 0, token)
    entries = await env.fs.readdir(fh, 0)
    assert replies == [(e.name.encode(), e.attr.ino, e.next_offset) for e in entries[:2]]
    room = 10
    await ops.readdir(fh, replies[-1][2], token)  # the kernel resumes after the last one
    assert [r[0] for r in replies] == [e.name.encode() for e in entries]
    await ops.releasedir(fh)


async def test_backing_mount_that_vanished_is_mounted_again(env: Env) -> None:
    ino = await env.volume("gold", "vm1.raw")
    reply = await env.fs.open(ino, os.O_RDONLY, ME)
    export = env.fs.exports.get("gold")
    assert export.mount_count == 1
    env.fake._take_down(env.target("gold").resolve())  # unmounted from outside (umount -l)
    # The open handle keeps its file; a new lookup and open mount the export again.
    assert await env.fs.read(reply.fh, 0, 4) == GOLD_FILES["vm1.raw"][:4]
    attr = await env.fs.lookup(env.ino("gold"), "vm1.raw", ME)
    assert attr.ino == ino
    assert export.mount_count == 2 and export.mounted and export.holders == 1
    second = await env.fs.open(ino, os.O_RDONLY, ME)
    assert export.holders == 2
    # A volume that really does not exist is still ENOENT, without another mount.
    assert await errno_raised(env.fs.lookup(env.ino("gold"), "missing", ME)) == errno.ENOENT
    assert export.mount_count == 2
    await env.fs.release(second.fh)
    await env.fs.release(reply.fh)


async def test_a_hung_export_cannot_take_every_request_slot(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "MAX_INFLIGHT_PER_EXPORT", 4)
    gold = await env.fs.open(await env.volume("gold", "vm1.raw"), os.O_RDONLY, ME)
    silver = await env.fs.open(await env.volume("silver", "disk"), os.O_RDONLY, ME)
    release = threading.Event()
    real_read = hio.read

    def hung_read(handle: Any, off: int, size: int) -> bytes:
        if handle.export.name == "gold":
            release.wait(10)
        return real_read(handle, off, size)

    monkeypatch.setattr(hio, "read", hung_read)
    results: list[object] = []

    async def reader() -> None:
        try:
            results.append(await env.fs.read(gold.fh, 0, 4))
        except FusemuxError as e:
            results.append(e.errno)

    async with trio.open_nursery() as tasks:
        for _ in range(4):
            tasks.start_soon(reader)
        await until(lambda: env.fs.exports.get("gold").inflight == 4)
        # The fifth request for the hung export fails at once; other exports are served.
        assert await errno_raised(env.fs.read(gold.fh, 0, 4)) == errno.EIO
        assert await env.fs.read(silver.fh, 0, 6) == b"silver"
        release.set()
    assert results == [GOLD_FILES["vm1.raw"][:4]] * 4
    assert env.fs.exports.get("gold").inflight == 0
    assert await env.fs.read(gold.fh, 0, 4) == GOLD_FILES["vm1.raw"][:4]
    await env.fs.release(gold.fh)
    await env.fs.release(silver.fh)


async def test_status_json_names_open_handles_without_touching_volumes(env: Env) -> None:
    ino = await env.volume("gold", "vm1.raw")
    a = await env.fs.open(ino, os.O_RDONLY, Ctx(pid=os.getpid()))
    b = await env.fs.open(ino, os.O_RDONLY, Ctx(pid=os.getpid()))
    raw = await env.fs.getxattr(env.ino("gold"), P + "status_json", ME)
    detail = json.loads(raw)
    assert detail["mappings"] == {}
    assert detail["open"]["vm1.raw"]["open_count"] == 2
    [opener] = detail["open"]["vm1.raw"]["openers"]
    assert opener.startswith(f"{os.getpid()}:")
    await env.fs.release(a.fh)
    await env.fs.release(b.fh)
    raw = await env.fs.getxattr(env.ino("gold"), P + "status_json", ME)
    assert json.loads(raw) == {"locks": 0, "mappings": {}, "open": {}}


async def test_a_stuck_statvfs_is_shared_and_answered_quickly(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capacity_mod, "STATVFS_TIMEOUT", 0.2)
    gold = await env.fs.open(await env.volume("gold", "vm1.raw"), os.O_RDONLY, ME)
    release = threading.Event()
    calls: list[str] = []
    real_statvfs = os.statvfs

    def stuck_statvfs(path: Any) -> os.statvfs_result:
        calls.append(str(path))
        release.wait(10)
        return real_statvfs(path)

    monkeypatch.setattr(os, "statvfs", stuck_statvfs)
    ino = env.ino("gold")
    start = trio.current_time()
    assert await errno_raised(env.fs.getxattr(ino, P + "capacity", ME)) == errno.EIO
    assert trio.current_time() - start >= 0.2
    # The probe is overdue: later readers get EIO at once, and no second thread starts.
    start = trio.current_time()
    assert await errno_raised(env.fs.getxattr(ino, P + "free", ME)) == errno.EIO
    assert (await env.fs.statfs(ME)).blocks == 0
    assert trio.current_time() - start < 0.1
    assert len(calls) == 1
    release.set()
    await until(lambda: env.fs.exports.get("gold").statvfs_probe is None)
    monkeypatch.setattr(os, "statvfs", real_statvfs)
    assert int(await env.fs.getxattr(ino, P + "capacity", ME)) > 0
    await env.fs.release(gold.fh)


async def test_readdir_of_many_volumes_comes_in_batches(env: Env) -> None:
    for i in range(600):
        (env.servers["gold"] / f"vol-{i:04d}").write_bytes(b"")
    fh = await env.fs.opendir(env.ino("gold"), ME)
    seen: list[str] = []
    offset = 0
    calls = 0
    while True:
        batch = await env.fs.readdir(fh, offset)
        if not batch:
            break
        calls += 1
        assert len(batch) <= fs_mod.READDIR_BATCH
        # The kernel may stop part-way through a batch and ask again from there.
        taken = batch[: max(1, len(batch) // 2)]
        seen += [e.name for e in taken]
        offset = taken[-1].next_offset
    await env.fs.releasedir(fh)
    assert calls > 600 // fs_mod.READDIR_BATCH
    assert len(seen) == len(set(seen))
    assert set(seen) == {f"vol-{i:04d}" for i in range(600)} | {"vm1.raw", "vm2.qcow2", "vm3.img"}


# -- health and metrics (issue 14) -----------------------------------------------------------


async def test_health_check_classifies_the_probe(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """ok, slow (answered after HEALTH_SLOW), unresponsive (no answer after HEALTH_TIMEOUT, or
    ENOTCONN), back to ok; last_error while not ok; an unmounted export is not probed."""
    import fusemux.core.health as health_mod

    monkeypatch.setattr(health_mod, "HEALTH_SLOW", 0.05)
    monkeypatch.setattr(health_mod, "HEALTH_TIMEOUT", 0.3)
    real_statvfs = os.statvfs
    calls: list[str] = []

    def counted(path: Any) -> os.statvfs_result:
        calls.append(str(path))
        return real_statvfs(path)

    monkeypatch.setattr(os, "statvfs", counted)
    assert await env.fs.health.check("gold") is None  # not mounted: nothing is probed
    assert calls == [] and env.fs.exports.get("gold").state is State.UNMOUNTED
    handle = await env.fs.open(await env.volume("gold", "vm1.raw"), os.O_RDONLY, ME)
    ino = env.ino("gold")
    assert await env.fs.health.check("gold") is exports_mod.Health.OK
    assert await env.fs.getxattr(ino, P + "health", ME) == b"ok"

    def slow(path: Any) -> os.statvfs_result:
        threading.Event().wait(0.1)
        return real_statvfs(path)

    monkeypatch.setattr(os, "statvfs", slow)
    assert await env.fs.health.check("gold") is exports_mod.Health.SLOW
    assert (await env.fs.getxattr(ino, P + "last_error", ME)).startswith(b"health slow: ")

    release = threading.Event()

    def stuck(path: Any) -> os.statvfs_result:
        release.wait(10)
        return real_statvfs(path)

    monkeypatch.setattr(os, "statvfs", stuck)
    start = trio.current_time()
    assert await env.fs.health.check("gold") is exports_mod.Health.UNRESPONSIVE
    assert 0.3 <= trio.current_time() - start < 2
    assert b"has not answered" in await env.fs.getxattr(ino, P + "last_error", ME)
    assert await env.fs.getxattr(ino, P + "health", ME) == b"unresponsive"
    # While it hangs, a check joins the same probe and answers at once.
    start = trio.current_time()
    assert await env.fs.health.check("gold") is exports_mod.Health.UNRESPONSIVE
    assert trio.current_time() - start < 0.1
    monkeypatch.setattr(os, "statvfs", real_statvfs)
    release.set()
    await until(lambda: env.fs.exports.get("gold").statvfs_probe is None)
    # The hung probe came back after > HEALTH_TIMEOUT: the check asks again, and it is ok.
    assert await env.fs.health.check("gold") is exports_mod.Health.OK
    assert await env.fs.getxattr(ino, P + "last_error", ME) == b""

    def dead(path: Any) -> os.statvfs_result:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    monkeypatch.setattr(os, "statvfs", dead)
    assert await env.fs.health.check("gold") is exports_mod.Health.UNRESPONSIVE
    assert b"Transport endpoint" in await env.fs.getxattr(ino, P + "last_error", ME)
    monkeypatch.setattr(os, "statvfs", real_statvfs)
    await env.fs.release(handle.fh)


async def test_metrics_collector_reads_the_core(env: Env) -> None:
    """The exposition of the core's state (what a scrape returns), parsed back."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from fusemux.core import metrics

    handle = await env.fs.open(await env.volume("gold", "vm1.raw"), os.O_RDONLY, ME)
    registry = CollectorRegistry()
    registry.register(metrics.CoreCollector(env.fs))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples[("fusemux_export_open_volumes", (("export", "gold"),))] == 1
    assert samples[("fusemux_export_holders", (("export", "gold"),))] == 1
    assert samples[("fusemux_export_mounts_total", (("export", "gold"),))] == 1
    assert samples[("fusemux_export_state", (("export", "gold"), ("state", "mounted")))] == 1
    assert samples[("fusemux_export_state", (("export", "gold"), ("state", "failed")))] == 0
    assert samples[("fusemux_export_health", (("export", "gold"), ("health", "ok")))] == 1
    assert samples[("fusemux_mappings", (("kind", "loop"),))] == 0
    await env.fs.release(handle.fh)
