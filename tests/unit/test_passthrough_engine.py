"""Tier (a): the own engine's protocol pieces (fusemux/engines/kernel/) without a kernel:
layouts, lookup counting, xattr sizing, directory entries, INIT flag choice."""

from __future__ import annotations

import errno
import json
import logging
import stat
import struct
from typing import Any

import pytest

from fusemux.core.api import Attr, DirEntry
from fusemux.engines import fuse_abi as abi
from fusemux.engines.kernel import device, wire
from fusemux.engines.kernel import session as pt
from fusemux.errors import FusemuxError


class _FakeCore:
    """Only what Session.__init__ touches."""

    def attach(self, engine: Any) -> None:
        self.engine = engine


def session() -> pt.Session:
    return pt.Session(_FakeCore(), "/nonexistent")  # type: ignore[arg-type]


def attr(ino: int, mode: int = stat.S_IFREG | 0o644) -> Attr:
    return Attr(
        ino=ino, mode=mode, nlink=1, uid=0, gid=0, size=4096, blocks=8,
        atime_ns=1_500_000_123, mtime_ns=2_000_000_456, ctime_ns=3, timeout=1.5,
    )  # fmt: skip


def test_layouts_match_the_kernel_sizes() -> None:
    assert abi.IN_HEADER.size == 40
    assert abi.INIT_OUT.size == 64
    assert abi.SETATTR_IN.size == 88
    assert len(wire.entry(attr(5))) == 128  # fuse_entry_out
    assert len(wire.attr_out(attr(5))) == 104  # fuse_attr_out
    assert abi.DEV_IOC_BACKING_OPEN == 0x4010E501
    assert abi.DEV_IOC_BACKING_CLOSE == 0x4004E502


def test_entry_encodes_times_and_timeouts() -> None:
    raw = wire.entry(attr(7))
    nodeid, gen, ev, av, evn, avn = abi.ENTRY_OUT_HEAD.unpack_from(raw)
    assert (nodeid, gen, ev, av, evn, avn) == (7, 0, 1, 1, 500_000_000, 500_000_000)
    fields = abi.ATTR.unpack_from(raw, abi.ENTRY_OUT_HEAD.size)
    assert fields[0] == 7 and fields[1] == 4096
    assert fields[3] == 1 and fields[6] == 500_000_123  # atime sec, nsec
    assert fields[4] == 2 and fields[7] == 456  # mtime


def test_dirent_is_padded_to_8_bytes_and_carries_the_type() -> None:
    e = DirEntry(name="vol-1", attr=attr(9), next_offset=3)
    raw = wire.dirent(e, plus=False)
    assert len(raw) % 8 == 0
    ino, off, namelen, typ = abi.DIRENT_HEAD.unpack_from(raw)
    assert (ino, off, namelen, typ) == (9, 3, 5, stat.S_IFREG >> 12)
    assert raw[24:29] == b"vol-1"
    plus = wire.dirent(e, plus=True)
    assert len(plus) == 128 + len(raw)


def test_forget_accounting_balances_and_fails_loudly_below_zero(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = session()
    for _ in range(3):
        s.looked_up(42)
    s._forget_one(42, 2)
    assert s.lookups == {42: 1}
    body = abi.BATCH_FORGET_IN.pack(1, 0) + abi.FORGET_ONE.pack(42, 1)
    s._batch_forget(body)
    assert s.lookups == {}
    assert s.stats["forget_errors"] == 0
    with caplog.at_level(logging.ERROR):
        s._forget_one(42, 1)  # never looked up again: the kernel and the engine disagree
    assert s.stats["forget_errors"] == 1
    assert any("FORGET accounting" in r.getMessage() for r in caplog.records)
    assert json.loads(s.statistics().as_json())["requests"]["forget_errors"] == 1


def test_xattr_size_protocol() -> None:
    assert wire.sized(b"abc", 0) == abi.GETXATTR_OUT.pack(3, 0)
    assert wire.sized(b"abc", 3) == b"abc"
    with pytest.raises(FusemuxError) as e:
        wire.sized(b"abcd", 3)
    assert e.value.errno == errno.ERANGE


def test_interrupt_follows_the_core_policy() -> None:
    """SETLKW: cancelled at once. READ: only once its caller is dying (here: a thread id
    that does not exist; a live caller with a harmless signal is left alone). OPEN: never."""
    import os

    import trio

    async def main() -> None:
        s = session()
        live, gone = os.getpid(), 2**22 + 12345  # above pid_max: no such thread
        scopes = {u: trio.CancelScope() for u in (10, 11, 12, 13)}
        async with trio.open_nursery() as nursery:
            s._nursery = nursery
            s.inflight[10] = (abi.SETLKW, scopes[10], live)
            s.inflight[11] = (abi.READ, scopes[11], live)
            s.inflight[12] = (abi.READ, scopes[12], gone)
            s.inflight[13] = (abi.OPEN, scopes[13], gone)
            for unique in (10, 11, 12, 13, 14):  # 14: already answered, ignored
                s._interrupt(unique)
            assert scopes[10].cancel_called
            await trio.sleep(3 * pt.INTERRUPT_POLL)
            assert scopes[12].cancel_called
            assert not scopes[11].cancel_called and not scopes[13].cancel_called
            s.inflight.clear()  # answered: the watcher of 11 ends

    trio.run(main)


def test_init_reply_declares_only_what_the_kernel_offers(monkeypatch: pytest.MonkeyPatch) -> None:
    s = session()
    sent: list[bytes] = []

    def capture(unique: int, error: int, parts: list[bytes]) -> bool:
        sent.extend(parts)
        return True

    monkeypatch.setattr(s, "write_reply", capture)
    offered = abi.ASYNC_READ | abi.INIT_EXT | abi.HANDLE_KILLPRIV_V2 | abi.PASSTHROUGH
    offered |= 1 << 20  # POSIX_ACL: offered, not implemented, so not declared
    s._init_reply(1, 7, 45, offered)
    out = abi.INIT_OUT.unpack(sent[0])
    flags = out[3] | out[10] << 32
    assert flags == abi.ASYNC_READ | abi.INIT_EXT | abi.HANDLE_KILLPRIV_V2 | abi.PASSTHROUGH
    assert out[6] == device.MAX_WRITE and out[8] == device.MAX_PAGES
    assert out[11] == abi.MAX_STACK_DEPTH and s.passthrough
    # An older kernel (no passthrough offered): no passthrough, no stack depth.
    s2 = session()
    sent.clear()
    monkeypatch.setattr(s2, "write_reply", capture)
    s2._init_reply(1, 7, 38, abi.ASYNC_READ | abi.INIT_EXT)
    out = abi.INIT_OUT.unpack(sent[0])
    assert not s2.passthrough and out[11] == 0
    assert struct.unpack_from("<I", sent[0], 4)[0] == abi.KERNEL_MINOR_VERSION


def test_engine_selection(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from fusemux import engines

    calls: list[Any] = []

    def probe(workdir: Any, ok: bool = True) -> tuple[bool, str]:
        calls.append(workdir)
        return ok, "probe says so"

    from fusemux.engines import kernel

    monkeypatch.setattr(kernel, "probe", probe)
    assert engines.select("pyfuse3", tmp_path) == ("pyfuse3", "configured")
    assert calls == []  # no probe mount when pyfuse3 is configured
    assert engines.select("auto", tmp_path) == ("passthrough", "auto: probe says so")
    monkeypatch.setattr(kernel, "probe", lambda w: (False, "no passthrough here"))
    assert engines.select("auto", tmp_path) == ("pyfuse3", "auto: no passthrough here")
    name, why = engines.select("passthrough", tmp_path)
    assert name == "passthrough" and "without passthrough: no passthrough here" in why
