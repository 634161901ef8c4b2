"""Tier (a): image headers, backing chains and Cinder .info files (fusemux.core.images).

Headers are written byte by byte here, in the layout of the qcow2 specification, so the
parser is tested against the format and not against itself. Hypothesis feeds corrupt and
truncated headers to the parser and to the cache reading them from real files.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusemux.core import images
from fusemux.core.images import ImageCache, parse_header, parse_info, resolve_backing


def qcow2(size: int, backing: str = "", version: int = 3, backing_at: int = 0x200) -> bytes:
    """A qcow2 header (no tables: enough for the parser) with an optional backing name."""
    name = backing.encode()
    head = struct.pack(
        ">4sIQIIQ", b"QFI\xfb", version, backing_at if name else 0, len(name), 16, size
    )
    head = head.ljust(104, b"\0")
    data = bytearray(head.ljust(max(backing_at + len(name), 104) + 512, b"\0"))
    if name:
        data[backing_at : backing_at + len(name)] = name
    return bytes(data)


def write(root: Path, name: str, data: bytes) -> None:
    (root / name).write_bytes(data)


def test_raw_and_qcow2_headers() -> None:
    assert parse_header(b"\0" * 512, 10 << 20) == images.Header("raw", 10 << 20, "")
    data = qcow2(1 << 30)
    assert parse_header(data, len(data)) == images.Header("qcow2", 1 << 30, "")
    data = qcow2(5 << 30, "base.raw")
    assert parse_header(data, len(data)) == images.Header("qcow2", 5 << 30, "base.raw")


def test_qcow2_that_is_not_one() -> None:
    # Too short for a header, version 1, or a backing name outside the file.
    assert parse_header(b"QFI\xfb\0\0\0\x03", 8).format == "raw"
    old = qcow2(1 << 20, version=1)
    assert parse_header(old, len(old)) == images.Header("raw", len(old), "")
    data = qcow2(1 << 20, "base", backing_at=0x200)
    assert parse_header(data, 0x201).backing_file == ""  # the name runs past the end
    long_name = qcow2(1 << 20, "x" * 2000)
    assert parse_header(long_name, len(long_name)).backing_file == ""


def test_backing_name_beyond_the_first_read(tmp_path: Path) -> None:
    write(tmp_path, "top", qcow2(1 << 20, "far-away-base", backing_at=0x3000))
    header = images.read_header(tmp_path / "top")
    assert header == images.Header("qcow2", 1 << 20, "far-away-base")


@pytest.mark.parametrize(
    ("current", "backing", "expected"),
    [
        ("top", "base", "base"),
        ("top", "./base", "base"),
        ("top", "", None),
        ("top", "../base", None),
        ("top", "../../etc/passwd", None),
        ("top", "sub/base", None),  # subdirectories are not served (and may be symlinks)
        ("top", "sub/../base", "base"),
        ("top", "/etc/passwd", None),
        ("top", "/srv/mnt/gold/base", "base"),
        ("top", "/srv/mnt/gold/../silver/base", None),
        ("top", "/srv/mnt/golden/base", None),
        ("top", "/srv/mnt/gold", None),
        ("top", ".", None),
    ],
)
def test_resolve_backing(current: str, backing: str, expected: str | None) -> None:
    assert resolve_backing(Path("/srv/mnt/gold"), current, backing) == expected


def test_chain_newest_first(tmp_path: Path) -> None:
    write(tmp_path, "vol", b"\0" * 4096)
    write(tmp_path, "vol.snap1", qcow2(4096, "vol"))
    write(tmp_path, "vol.snap2", qcow2(4096, "vol.snap1"))
    cache = ImageCache()
    info = cache.info(tmp_path, "vol.snap2")
    assert info.chain == ("vol.snap2", "vol.snap1", "vol")
    assert info.backing_file == "vol.snap1"
    assert info.format == "qcow2" and info.virtual_size == 4096
    assert cache.info(tmp_path, "vol").chain == ("vol",)


def test_chain_stops_at_cycles_missing_files_and_escapes(tmp_path: Path) -> None:
    root = tmp_path / "export"
    root.mkdir()
    write(tmp_path, "outside", b"\0" * 512)
    write(root, "a", qcow2(1, "b"))
    write(root, "b", qcow2(1, "a"))  # a -> b -> a
    write(root, "self", qcow2(1, "self"))
    write(root, "gone", qcow2(1, "missing"))
    write(root, "escape", qcow2(1, "../outside"))
    write(root, "absolute", qcow2(1, str(tmp_path / "outside")))
    write(root, "inside-abs", qcow2(1, str(root / "a")))
    os.symlink(tmp_path / "outside", root / "link")
    write(root, "via-link", qcow2(1, "link"))
    os.mkdir(root / "dir")
    write(root, "to-dir", qcow2(1, "dir"))
    cache = ImageCache()
    assert cache.chain(root, "a") == ("a", "b")
    assert cache.chain(root, "self") == ("self",)
    assert cache.chain(root, "gone") == ("gone",)
    assert cache.chain(root, "escape") == ("escape",)
    assert cache.chain(root, "absolute") == ("absolute",)
    assert cache.chain(root, "inside-abs") == ("inside-abs", "a", "b")
    assert cache.chain(root, "via-link") == ("via-link",)  # a symlink is not followed
    assert cache.chain(root, "to-dir") == ("to-dir",)


def test_long_chain_is_bounded(tmp_path: Path) -> None:
    n = images.CHAIN_MAX + 10
    write(tmp_path, "v0", b"\0" * 512)
    for i in range(1, n):
        write(tmp_path, f"v{i}", qcow2(1, f"v{i - 1}"))
    assert len(ImageCache().chain(tmp_path, f"v{n - 1}")) == images.CHAIN_MAX


def test_cache_follows_mtime_and_size(tmp_path: Path) -> None:
    cache = ImageCache()
    write(tmp_path, "v", b"\0" * 1024)
    assert cache.info(tmp_path, "v").format == "raw"
    data = qcow2(7 << 20)
    write(tmp_path, "v", data)
    assert cache.info(tmp_path, "v").virtual_size == 7 << 20
    # Same size and mtime: the cached header is kept (it is not read again).
    st = os.stat(tmp_path / "v")
    with open(tmp_path / "v", "r+b") as f:
        f.write(qcow2(9 << 20)[:104])
    os.utime(tmp_path / "v", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.info(tmp_path, "v").virtual_size == 7 << 20
    os.utime(tmp_path / "v", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert cache.info(tmp_path, "v").virtual_size == 9 << 20


def test_info_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = ImageCache()
    write(tmp_path, "volume-1", b"\0" * 512)
    assert cache.active_image(tmp_path, "volume-1") == ""  # no .info file
    info = {"active": "volume-1.snap-a", "snap-a": "volume-1.snap-a"}
    write(tmp_path, "volume-1.info", json.dumps(info).encode())
    assert cache.active_image(tmp_path, "volume-1") == "volume-1.snap-a"
    write(tmp_path, "volume-1.info", b"{not json")
    with caplog.at_level(logging.WARNING):
        assert cache.active_image(tmp_path, "volume-1") == ""
        assert cache.active_image(tmp_path, "volume-1") == ""  # cached: one warning
    assert len([r for r in caplog.records if "not a Cinder .info" in r.message]) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b'{"active": "v.1"}', "v.1"),
        (b'{"active": 3}', None),
        (b'{"snap": "x"}', None),
        (b'["active"]', None),
        (b"\xff\xfe", None),
        (b"", None),
        (b"[" * 100000, None),
        (b'{"active": "a\\u0000b"}', None),
    ],
)
def test_parse_info(text: bytes, expected: str | None) -> None:
    assert parse_info(text) == expected


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=600), size=st.integers(min_value=-1, max_value=1 << 70))
def test_fuzz_parse_header_never_raises(data: bytes, size: int) -> None:
    header = parse_header(data, size)
    assert header.format in ("raw", "qcow2")
    assert header.virtual_size >= 0


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    prefix=st.binary(max_size=64),
    version=st.integers(min_value=0, max_value=2**32 - 1),
    offset=st.integers(min_value=0, max_value=2**64 - 1),
    length=st.integers(min_value=0, max_value=2**32 - 1),
    size=st.integers(min_value=0, max_value=2**64 - 1),
    tail=st.binary(max_size=1200),
    cut=st.integers(min_value=0, max_value=2000),
)
def test_fuzz_corrupt_qcow2_files(
    tmp_path: Path,
    prefix: bytes,
    version: int,
    offset: int,
    length: int,
    size: int,
    tail: bytes,
    cut: int,
) -> None:
    """Corrupt and truncated qcow2 files, read through the cache from disk, never raise."""
    head = struct.pack(">4sIQIIQ", b"QFI\xfb", version, offset, length, 16, size)
    data = (head + prefix + tail)[:cut]
    write(tmp_path, "img", data)
    cache = ImageCache()
    info = cache.info(tmp_path, "img")
    assert info.format in ("raw", "qcow2")
    assert info.chain[0] == "img"
    assert len(info.backing_file) <= images.BACKING_NAME_MAX
