"""The ``user.fusemux.*`` views: which keys each node has, and their values.

This module owns the names and the rendering of every introspection xattr (docs/xattrs.md is
the reference). Values are rendered from frozen snapshots handed in by
:mod:`fusemux.core.fs`; nothing here touches a backing filesystem or blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fusemux.core.exports import ExportSnapshot, State
from fusemux.core.images import ImageInfo

PREFIX = "user.fusemux."
# The one writable key: setxattr on an export directory, root only.
CTL = PREFIX + "ctl"
CTL_COMMANDS = ("mount", "unmount")

# Contract keys first, then fusemux additions; listxattr returns them in this order.
ROOT_KEYS = ("version", "pid", "engine", "engine_stats")
EXPORT_KEYS = (
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
)
VOLUME_KEYS = (
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
)
# Present only while the export is mounted.
MOUNTED_ONLY = frozenset({"capacity", "free"})
# Volume keys read from the image itself (images.py); only these need the backing file.
IMAGE_KEYS = frozenset({"format", "virtual_size", "backing_file", "chain", "active_image"})
# Volume keys written by an administrator (root only) to request or end a mapping. They are
# not listed and cannot be read.
MAP_KEY = "map"
UNMAP_KEY = "unmap"


@dataclass(frozen=True)
class Opener:
    pid: int
    comm: str


def full(keys: tuple[str, ...]) -> list[str]:
    return [PREFIX + k for k in keys]


def export_keys(snapshot: ExportSnapshot) -> list[str]:
    keys = [k for k in EXPORT_KEYS if k not in MOUNTED_ONLY or snapshot.state is State.MOUNTED]
    return full(tuple(keys))


def render_root(version: str, pid: int, engine: str, engine_stats: str) -> Mapping[str, str]:
    return {"version": version, "pid": str(pid), "engine": engine, "engine_stats": engine_stats}


def render_export(
    snapshot: ExportSnapshot,
    read_only: bool,
    open_volumes: list[str],
    mapped_volumes: list[str] | None = None,
) -> dict[str, str]:
    return {
        "state": snapshot.state.value,
        "source": snapshot.source,
        "fstype": snapshot.fstype,
        "holders": str(snapshot.holders),
        "mount_count": str(snapshot.mount_count),
        "last_error": snapshot.last_error,
        "open_volumes": ",".join(sorted(open_volumes)),
        "backing_path": str(snapshot.target),
        "read_only": "1" if read_only else "0",
        "pinned": "1" if snapshot.pinned else "0",
        "retry_in": f"{snapshot.retry_in:.1f}" if snapshot.retry_in > 0 else "0",
        "removed": "1" if snapshot.removed else "0",
        "mapped_volumes": ",".join(sorted(mapped_volumes or [])),
        "health": snapshot.health.value,
    }


def render_volume(snapshot: ExportSnapshot, name: str, openers: list[Opener]) -> dict[str, str]:
    unique = sorted({(o.pid, o.comm) for o in openers})
    return {
        "export": snapshot.name,
        "source": snapshot.source,
        "backing_path": str(snapshot.target / name),
        "open_count": str(len(openers)),
        "openers": ",".join(f"{pid}:{comm}" for pid, comm in unique),
    }


@dataclass(frozen=True)
class MappingView:
    """What the mapping keys of a volume show; all empty when it is not mapped."""

    value: str = ""
    options: str = ""
    pid: int = 0


def render_mapping(view: MappingView) -> dict[str, str]:
    return {
        "mapping": view.value,
        "mapping_options": view.options,
        "mapping_pid": str(view.pid) if view.pid else "",
    }


def render_image(info: ImageInfo) -> dict[str, str]:
    return {
        "format": info.format,
        "virtual_size": str(info.virtual_size),
        "backing_file": info.backing_file,
        "chain": ",".join(info.chain),
        "active_image": info.active_image,
    }


def render_locks(lines: list[str]) -> dict[str, str]:
    """``locks``: the locks held through fusemux on a volume, ``pid:comm type start-end``
    one per line (:mod:`fusemux.core.locks` renders the lines)."""
    return {"locks": "".join(line + "\n" for line in lines)}
