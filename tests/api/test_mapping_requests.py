"""Tier (b): ``user.fusemux.map``/``unmap`` requests through :class:`FileSystem.setxattr`.

The request grammar, the rights check and the errnos, plus one real loop mapping (root only)
to show the mapping holding its export. The full mapping behaviour over a real mount is in
tests/mount/test_mappings.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from fusemux.core import loopdev
from fusemux.core.api import Ctx
from fusemux.core.mappings import MapRequest, parse_request
from fusemux.errors import BadMapRequest
from tests.api.test_fs_api import ME, Env, P, errno_raised, make_env

NOBODY = Ctx(pid=os.getpid(), uid=65534, gid=65534)


@pytest.fixture
def env(tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> Env:
    return make_env(tmp_path, nursery, monkeypatch)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"loop", MapRequest("loop")),
        (b"loop,ro", MapRequest("loop", read_only=True)),
        (b"loop,partitions,ro", MapRequest("loop", read_only=True, partitions=True)),
        (b"nbd", MapRequest("nbd")),
        (b" nbd,ro\n", MapRequest("nbd", read_only=True)),
        (b"auto\0", MapRequest("auto")),
        (b"auto,ro,partitions", MapRequest("auto", read_only=True, partitions=True)),
    ],
)
def test_parse_request(value: bytes, expected: MapRequest) -> None:
    assert parse_request(value) == expected


@pytest.mark.parametrize(
    "value",
    [b"", b" ", b"lop", b"LOOP", b"loop,rw", b"loop,ro,ro", b"nbd,partitions", b"loop,", b"\xff"],
)
def test_bad_requests(value: bytes) -> None:
    with pytest.raises(BadMapRequest):
        parse_request(value)


async def test_request_errnos(env: Env) -> None:
    vol = await env.volume("gold", "vm1.raw")
    fs = env.fs
    assert await errno_raised(fs.setxattr(vol, P + "map", b"loop", NOBODY)) == errno.EPERM
    assert await errno_raised(fs.setxattr(vol, P + "unmap", b"", NOBODY)) == errno.EPERM
    assert await errno_raised(fs.setxattr(vol, P + "map", b"floppy", ME)) == errno.EINVAL
    assert await errno_raised(fs.setxattr(vol, P + "unmap", b"now", ME)) == errno.EINVAL
    assert await errno_raised(fs.setxattr(vol, P + "unmap", b"", ME)) == errno.ENXIO
    # vm2.qcow2 holds no qcow2 header, so it is raw; a real qcow2 cannot be loop-mapped:
    (env.target("gold") / "q").write_bytes(b"QFI\xfb" + b"\0\0\0\x03" + b"\0" * 600)
    q = await env.volume("gold", "q")
    assert await errno_raised(fs.setxattr(q, P + "map", b"loop", ME)) == errno.EINVAL
    # map/unmap are volume keys; on other nodes they are read-only fusemux keys.
    assert await errno_raised(fs.setxattr(env.ino("gold"), P + "map", b"loop", ME)) == errno.EPERM
    assert await errno_raised(fs.removexattr(vol, P + "unmap", ME)) == errno.EPERM
    assert await errno_raised(fs.getxattr(vol, P + "map", ME)) == errno.ENODATA
    assert fs.mappings.all() == []
    assert fs.exports.get("gold").holders == 0


async def test_read_only_export_needs_ro(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(tmp_path, nursery, monkeypatch, read_only=frozenset({"ro"}))
    vol = await env.volume("ro", "base.img")
    assert await errno_raised(env.fs.setxattr(vol, P + "map", b"loop", ME)) == errno.EROFS
    assert env.fs.exports.get("ro").holders == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")
async def test_loop_mapping_holds_its_export(env: Env) -> None:
    vol = await env.volume("gold", "vm1.raw")
    fs = env.fs
    export = fs.exports.get("gold")
    await fs.setxattr(vol, P + "map", b"loop,ro", ME)
    try:
        device = (await fs.getxattr(vol, P + "mapping", ME)).decode()
        assert device.startswith("/dev/loop")
        assert (await fs.getxattr(vol, P + "mapping_options", ME)) == b"loop,ro"
        assert (await fs.getxattr(env.ino("gold"), P + "mapped_volumes", ME)) == b"vm1.raw"
        name = os.path.basename(device)
        sysfs = trio.Path(f"/sys/block/{name}")
        assert loopdev.backing_file(device) == str(env.target("gold") / "vm1.raw")
        assert (await (sysfs / "ro").read_text()).strip() == "1"
        assert export.holders == 1
        assert await errno_raised(fs.setxattr(vol, P + "map", b"loop", ME)) == errno.EBUSY
        assert await fs.mappings.in_use() == []
    finally:
        await fs.setxattr(vol, P + "unmap", b"", ME)
    assert export.holders == 0
    assert (await fs.getxattr(vol, P + "mapping", ME)) == b""
    assert loopdev.backing_file(device) is None
