"""The fusemux namespace: inode numbers, the node kinds and the rules for volume names.

This module owns the identity of every entry the mount shows::

    /                         ROOT_INO (1)
    /volumes                  VOLUMES_INO (2)
    /volumes/<export>         one directory per configured export
    /volumes/<export>/<name>  one regular file per visible file of the backing export

Inode numbers belong to fusemux, never to a backing filesystem: they are derived from the
path by a hash, so the same export/volume gets the same inode for the daemon's whole life and
across restarts (unless two paths collide, when the later one is probed to the next free
number). Readdir offsets are the inode numbers of the entries, listed in inode order, so an
offset stays valid while entries come and go.

Concurrency: plain data, mutated only from the trio thread.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from fusemux.errors import NotFound

ROOT_INO = 1
VOLUMES_INO = 2
VOLUMES_DIR = "volumes"
_FIRST_DYNAMIC_INO = 1 << 10
_INO_MASK = (1 << 62) - 1
NAME_MAX = 255


class Kind(enum.Enum):
    ROOT = "root"
    VOLUMES = "volumes"
    EXPORT = "export"
    VOLUME = "volume"


@dataclass(frozen=True)
class Node:
    ino: int
    kind: Kind
    export: str = ""
    name: str = ""

    @property
    def is_dir(self) -> bool:
        return self.kind is not Kind.VOLUME


def visible_volume_name(name: str) -> bool:
    """Whether *name* may appear as a volume (hidden: dot files; invalid: slashes, NUL)."""
    return (
        bool(name)
        and not name.startswith(".")
        and "/" not in name
        and "\0" not in name
        and len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX
    )


class Namespace:
    """Allocates and resolves fusemux inodes."""

    def __init__(self, export_names: list[str]) -> None:
        self._by_ino: dict[int, Node] = {
            ROOT_INO: Node(ROOT_INO, Kind.ROOT),
            VOLUMES_INO: Node(VOLUMES_INO, Kind.VOLUMES),
        }
        self._by_key: dict[tuple[str, str], int] = {}
        self.exports: dict[str, Node] = {}
        for name in sorted(export_names):
            self.add_export(name)

    def add_export(self, name: str) -> Node:
        """The directory node of export *name*, created if new (a config reload adds one)."""
        if name in self.exports:
            return self.exports[name]
        ino = self._allocate(name, "")
        node = Node(ino, Kind.EXPORT, export=name)
        self._by_ino[ino] = node
        self.exports[name] = node
        return node

    def remove_export(self, name: str) -> None:
        """Forget export *name* and its volumes: their inodes answer ENOENT from now on."""
        self.exports.pop(name, None)
        for key in [k for k in self._by_key if k[0] == name]:
            self._by_ino.pop(self._by_key.pop(key), None)

    def _allocate(self, export: str, name: str) -> int:
        key = (export, name)
        if key in self._by_key:
            return self._by_key[key]
        digest = hashlib.blake2b(f"{export}\0{name}".encode("utf-8", "surrogateescape"))
        ino = int.from_bytes(digest.digest()[:8], "little") & _INO_MASK
        ino = max(ino, _FIRST_DYNAMIC_INO)
        while ino in self._by_ino:  # a collision: probe to the next free number
            ino = ino + 1 if ino < _INO_MASK else _FIRST_DYNAMIC_INO
        self._by_key[key] = ino
        return ino

    def node(self, ino: int) -> Node:
        try:
            return self._by_ino[ino]
        except KeyError:
            raise NotFound(f"unknown inode {ino}") from None

    def export_node(self, export: str) -> Node:
        try:
            return self.exports[export]
        except KeyError:
            raise NotFound(f"no export named {export!r}") from None

    def volume_node(self, export: str, name: str) -> Node:
        """The node of a volume, allocated on first sight. The caller checked it exists."""
        ino = self._allocate(export, name)
        node = self._by_ino.get(ino)
        if node is None:
            node = Node(ino, Kind.VOLUME, export=export, name=name)
            self._by_ino[ino] = node
        return node

    def export_nodes(self) -> list[Node]:
        return sorted(self.exports.values(), key=lambda n: n.ino)
