"""What each volume image is: format, virtual size, backing file, chain and Cinder's active image.

This module owns the image xattrs of a volume (``format``, ``virtual_size``, ``backing_file``,
``chain``, ``active_image``). Everything is read from the files' own bytes: the first bytes of
an image and, for a qcow2 image, its backing file name; a Cinder ``<name>.info`` JSON file for
the active image. No external process (``qemu-img``) ever runs on this path.

The parsers are pure functions over bytes, so corrupt or truncated headers are handled in one
place and can be fuzzed: they never raise, they fall back to ``raw`` and an empty backing file.

Concurrency: :class:`ImageCache` does blocking file I/O and must be called from a worker
thread (:func:`fusemux.core.workers.run`, the export's own pool). Its dictionary is guarded by a
``threading.Lock``, because several worker threads of one export may use it at once. Entries are
keyed by path and validated against ``(st_mtime_ns, st_size, st_ino)``, so a changed file is
parsed again and an unchanged one never is.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

QCOW2_MAGIC = b"QFI\xfb"
# Bytes read from the start of an image. The qcow2 v2 header is 72 bytes, v3 at least 104.
HEADER_READ = 512
QCOW2_MIN_HEADER = 72
# qemu refuses backing file names longer than this (block/qcow2.c); so do we.
BACKING_NAME_MAX = 1023
# A chain longer than this is treated as broken (qemu has no such limit, but no real chain is
# anywhere near it, and the walk must end on a crafted one).
CHAIN_MAX = 256
# A Cinder .info file larger than this is not read.
INFO_MAX = 1 << 20
INFO_SUFFIX = ".info"


@dataclass(frozen=True)
class Header:
    """What the first bytes of an image say."""

    format: str  # "raw" or "qcow2"
    virtual_size: int
    backing_file: str  # the name as written in the image; "" if none
    # Where the backing name lies in the file, for a second read: (offset, length).
    backing_ref: tuple[int, int] | None = None


@dataclass(frozen=True)
class ImageInfo:
    """The image xattrs of one volume."""

    format: str
    virtual_size: int
    backing_file: str
    chain: tuple[str, ...]
    active_image: str


def parse_header(data: bytes, file_size: int) -> Header:
    """Classify *data* (the first bytes of a file of *file_size* bytes). Never raises.

    Like qemu's format probe: qcow2 needs the magic, a version of at least 2 and a complete
    version-2 header; anything else is raw. A qcow2 backing name that lies outside the file
    or is longer than qemu allows is reported as no backing file.
    """
    if len(data) < QCOW2_MIN_HEADER or data[:4] != QCOW2_MAGIC:
        return Header("raw", max(file_size, 0), "")
    version, backing_offset, backing_size = struct.unpack_from(">IQI", data, 4)
    if version < 2:
        return Header("raw", max(file_size, 0), "")
    (size,) = struct.unpack_from(">Q", data, 24)
    if backing_offset == 0 or backing_size == 0:
        return Header("qcow2", size, "")
    if backing_size > BACKING_NAME_MAX or backing_offset + backing_size > file_size:
        return Header("qcow2", size, "")
    end = backing_offset + backing_size
    if end <= len(data):
        return Header("qcow2", size, _decode_name(data[backing_offset:end]))
    return Header("qcow2", size, "", backing_ref=(backing_offset, backing_size))


def _decode_name(raw: bytes) -> str:
    # A NUL cannot be part of a path; qemu would stop there too.
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def read_header(path: str | Path) -> Header:
    """The header of the regular file at *path* (blocking; follows no symlink)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(22, "not a regular file", str(path))
        header = parse_header(os.pread(fd, HEADER_READ, 0), st.st_size)
        if header.backing_ref is not None:
            offset, length = header.backing_ref
            raw = os.pread(fd, length, offset)
            name = _decode_name(raw) if len(raw) == length else ""
            header = Header(header.format, header.virtual_size, name)
        return header
    finally:
        os.close(fd)


def resolve_backing(root: Path, current: str, backing: str) -> str | None:
    """The export-relative name of *backing* (named in image *current*), or None.

    qemu resolves a relative backing name against the directory of the image naming it, and
    fusemux serves only the top level of an export, so the result must be a file at the top
    level of the export: a name that climbs out with ``..``, lies in a subdirectory (which
    could be a symlink leading anywhere), or is an absolute path outside the export's backing
    mount is not followed. An absolute path to the top level of the backing mount
    (``<state_dir>/mnt/<export>/NAME``) is followed, as NAME.
    """
    if not backing:
        return None
    if backing.startswith("/"):
        rel = os.path.normpath(backing)
        base = os.path.normpath(str(root))
        if not rel.startswith(base + "/"):
            return None
        rel = rel[len(base) + 1 :]
    else:
        rel = os.path.normpath(os.path.join(os.path.dirname(current), backing))
    if rel in ("", ".", "..") or "/" in rel:
        return None
    return rel


def parse_info(text: bytes) -> str | None:
    """The ``active`` name of a Cinder .info file, or None if the file is not usable."""
    try:
        data = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    active = data.get("active")
    if not isinstance(active, str) or "\0" in active:
        return None
    return active


class ImageCache:
    """Parsed headers and .info files, valid for as long as the file's stat is unchanged."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._headers: dict[str, tuple[tuple[int, int, int], Header]] = {}
        self._infos: dict[str, tuple[tuple[int, int, int], str]] = {}

    def clear(self) -> None:
        with self._lock:
            self._headers.clear()
            self._infos.clear()

    @staticmethod
    def _key(st: os.stat_result) -> tuple[int, int, int]:
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def header(self, path: Path) -> Header:
        """The header of *path*, from the cache if the file is unchanged (blocking)."""
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(22, "not a regular file", str(path))
        key = self._key(st)
        with self._lock:
            hit = self._headers.get(str(path))
        if hit is not None and hit[0] == key:
            return hit[1]
        header = read_header(path)
        with self._lock:
            self._headers[str(path)] = (key, header)
        return header

    def chain(self, root: Path, name: str) -> tuple[str, ...]:
        """*name* and its backing files, newest first, as export-relative names (blocking).

        The walk stops at the first backing file that is missing, not a regular file, outside
        the export, or already in the chain (a cycle), and after CHAIN_MAX entries.
        """
        chain = [name]
        seen = {name}
        current = name
        while len(chain) < CHAIN_MAX:
            try:
                header = self.header(root / current)
            except OSError:
                break
            nxt = resolve_backing(root, current, header.backing_file)
            if nxt is None or nxt in seen:
                if nxt is not None:
                    log.debug("backing chain of %s/%s loops at %s", root, name, nxt)
                break
            try:
                st = os.lstat(root / nxt)
            except OSError:
                break
            if not stat.S_ISREG(st.st_mode):
                break
            chain.append(nxt)
            seen.add(nxt)
            current = nxt
        return tuple(chain)

    def active_image(self, root: Path, name: str) -> str:
        """The ``active`` of ``<name>.info`` if that file exists; "" otherwise (blocking).

        A .info file that is not valid JSON with a string ``active`` gives "" and one warning
        per version of the file.
        """
        path = root / (name + INFO_SUFFIX)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return ""
        if not stat.S_ISREG(st.st_mode):
            return ""
        key = self._key(st)
        with self._lock:
            hit = self._infos.get(str(path))
        if hit is not None and hit[0] == key:
            return hit[1]
        active: str | None = None
        if st.st_size <= INFO_MAX:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    active = parse_info(os.pread(fd, INFO_MAX + 1, 0))
                finally:
                    os.close(fd)
            except OSError as e:
                log.warning("cannot read %s: %s", path, e.strerror)
                return ""
        if active is None:
            log.warning(
                "%s is not a Cinder .info file (JSON object with a string 'active'); "
                "active_image of %s is empty",
                path,
                name,
            )
            active = ""
        with self._lock:
            self._infos[str(path)] = (key, active)
        return active

    def info(self, root: Path, name: str) -> ImageInfo:
        """All image xattrs of volume *name* in the export mounted at *root* (blocking)."""
        header = self.header(root / name)
        return ImageInfo(
            format=header.format,
            virtual_size=header.virtual_size,
            backing_file=header.backing_file,
            chain=self.chain(root, name),
            active_image=self.active_image(root, name),
        )
