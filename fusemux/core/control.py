"""The admin interface: every ``user.fusemux.*`` xattr read, and the control writes.

This module owns what ``getfattr``/``setfattr`` on the mount do: the read-only views (root,
export and volume keys, rendered by :mod:`fusemux.core.xattrs`), the ``ctl`` write on an
export directory (pin/unpin), the ``map``/``unmap`` writes on a volume, and the answer for
every name outside ``user.fusemux.`` (EOPNOTSUPP: fusemux stores no xattrs). The file
operations live in :mod:`fusemux.core.fs`, which hands xattr requests here.

Concurrency: state lives in the trio thread. Reads never touch a backing filesystem except
the image keys (an image header, read in the export's worker threads under a transient
hold) and ``capacity``/``free`` (a shared statvfs probe, see :mod:`fusemux.core.capacity`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
from typing import Any

from fusemux import __version__
from fusemux.core import workers, xattrs
from fusemux.core.api import Ctx, Engine
from fusemux.core.capacity import Capacity
from fusemux.core.exports import ExportManager, State
from fusemux.core.handles import HandleTable
from fusemux.core.images import ImageCache
from fusemux.core.locks import LockManager
from fusemux.core.mappings import MappingManager, parse_request, parse_unmap
from fusemux.core.namespace import Kind, Namespace, Node
from fusemux.errors import (
    FusemuxError,
    InvalidRequest,
    MapNotPermitted,
    NoSuchAttribute,
    NotPermitted,
    XattrNotSupported,
    XattrReadOnly,
)
from fusemux.logfmt import errname, fields

log = logging.getLogger(__name__)

_XATTR_PREFIX = xattrs.PREFIX.encode()


def xattr_refusal(name: bytes) -> int:
    """0 if fusemux answers xattr *name* (``user.fusemux.*``); otherwise the errno for a get,
    set or remove of it on any node, so an engine may answer without a call.

    fusemux can never store or show any other name, so it answers as a filesystem without
    xattr support does: EOPNOTSUPP for get, set and remove alike. libvirt's DAC driver probes
    ``trusted.libvirt.security.ref_dac`` with a get and skips owner remembering only on
    EOPNOTSUPP/ENOSYS; ``ls -l`` asks every file for security.selinux and
    system.posix_acl_access; the kernel probes security.capability before writes and takes
    any error as "no capability". Never ENOSYS: the kernel would then stop asking for every
    name, ``user.fusemux.*`` included.
    """
    return 0 if name.startswith(_XATTR_PREFIX) else XattrNotSupported.errno


class AdminXattrs:
    """``user.fusemux.*``: the views and the control writes."""

    def __init__(
        self,
        namespace: Namespace,
        exports: ExportManager,
        handles: HandleTable,
        mappings: MappingManager,
        images: ImageCache,
        capacity: Capacity,
        locks: LockManager,
    ) -> None:
        self.namespace = namespace
        self.exports = exports
        self.handles = handles
        self.mappings = mappings
        self.images = images
        self.capacity = capacity
        self.locks = locks
        self.engine: Engine | None = None  # set by the engine that serves the core

    def _status_json(self, export: str) -> str:
        """Open handles and mappings of *export*'s volumes as one JSON object.

        ``fusemux status`` reads this instead of each volume's keys: a volume's keys need a
        lookup of the volume, which stats the backing file and blocks while an NFS server
        is down; this never touches a backing filesystem.
        """
        opened: dict[str, dict[str, Any]] = {}
        for h in self.handles.for_export(export):
            entry = opened.setdefault(h.name, {"open_count": 0, "openers": set()})
            entry["open_count"] += 1
            entry["openers"].add((h.opener_pid, h.opener_comm))
        mapped: dict[str, dict[str, Any]] = {}
        for name in self.mappings.mapped_volumes(export):
            mapping = self.mappings.get(export, name)
            if mapping is not None:
                mapped[name] = {
                    "mapping": [v for v in mapping.value().split(",") if v],
                    "options": mapping.options(),
                    "pid": mapping.pid() or None,
                }
        return json.dumps(
            {
                "open": {
                    name: {
                        "open_count": e["open_count"],
                        "openers": [f"{pid}:{comm}" for pid, comm in sorted(e["openers"])],
                    }
                    for name, e in sorted(opened.items())
                },
                "mappings": dict(sorted(mapped.items())),
                "locks": self.locks.count(export),
            },
            sort_keys=True,
        )

    def _open_volumes(self, export: str) -> list[str]:
        return sorted({h.name for h in self.handles.for_export(export)})

    async def listxattr(self, ino: int, ctx: Ctx) -> list[str]:
        node = self.namespace.node(ino)
        if node.kind is Kind.ROOT:
            return xattrs.full(xattrs.ROOT_KEYS)
        if node.kind is Kind.EXPORT:
            return xattrs.export_keys(self.exports.get(node.export).snapshot())
        if node.kind is Kind.VOLUME:
            return xattrs.full(xattrs.VOLUME_KEYS)
        return []

    async def getxattr(self, ino: int, name: str, ctx: Ctx) -> bytes:
        # Foreign names first, without work: the kernel probes security.capability before
        # writes (once per inode with KILLPRIV_V2, before every write without it).
        if not name.startswith(xattrs.PREFIX):
            raise XattrNotSupported(f"{name}: fusemux stores no extended attributes")
        key = name[len(xattrs.PREFIX) :]
        node = self.namespace.node(ino)
        values: dict[str, str] = {}
        if node.kind is Kind.ROOT:
            engine = self.engine
            stats = engine.statistics().as_json() if engine is not None else "{}"
            name_ = engine.name if engine is not None else ""
            values = dict(xattrs.render_root(__version__, os.getpid(), name_, stats))
        elif node.kind is Kind.EXPORT:
            export = self.exports.get(node.export)
            snap = export.snapshot()
            if key in xattrs.MOUNTED_ONLY:
                if snap.state is not State.MOUNTED:
                    raise NoSuchAttribute(name)
                st = await self.capacity.statvfs(node.export)
                if st is None:
                    raise FusemuxError(f"statvfs of {export.target} failed", errno.EIO)
                values = {
                    "capacity": str(st.f_blocks * st.f_frsize),
                    "free": str(st.f_bavail * st.f_frsize),
                }
            else:
                values = xattrs.render_export(
                    snap,
                    export.config.read_only,
                    self._open_volumes(node.export),
                    self.mappings.mapped_volumes(node.export),
                )
                values["status_json"] = self._status_json(node.export)
        elif node.kind is Kind.VOLUME:
            snap = self.exports.get(node.export).snapshot()
            openers = [
                xattrs.Opener(h.opener_pid, h.opener_comm) for h in self.handles.for_inode(ino)
            ]
            values = xattrs.render_volume(snap, node.name, openers)
            values.update(xattrs.render_mapping(self._mapping_view(node)))
            values.update(xattrs.render_locks(self.locks.lines(ino)))
            if key in xattrs.IMAGE_KEYS:
                # Read from the image's own header (cached against mtime and size).
                async with self.exports.hold(node.export) as export:
                    info = await workers.run(
                        export, self.images.info, export.target, node.name, abandonable=True
                    )
                values.update(xattrs.render_image(info))
        if key not in values:
            raise NoSuchAttribute(name)
        return values[key].encode("utf-8", "surrogateescape")

    def _mapping_view(self, node: Node) -> xattrs.MappingView:
        mapping = self.mappings.get(node.export, node.name)
        if mapping is None:
            return xattrs.MappingView()
        return xattrs.MappingView(mapping.value(), mapping.options(), mapping.pid())

    async def _map_request(self, node: Node, key: str, value: bytes, ctx: Ctx) -> None:
        """``user.fusemux.map`` / ``unmap`` on a volume: root only (the FUSE request's uid)."""
        label = f"{node.export}/{node.name}"
        try:
            if ctx.uid != 0:
                raise MapNotPermitted(f"{key} of {label} refused: uid {ctx.uid} is not root")
            if key == xattrs.MAP_KEY:
                request = parse_request(value)
                await self.mappings.map(node.export, node.name, request)
            else:
                parse_unmap(value)
                await self.mappings.unmap(node.export, node.name)
        except FusemuxError as e:
            log.info(
                "%s request for %s refused: %s",
                key,
                label,
                e.message,
                extra=fields(export=node.export, volume=node.name, op=key, errno=errname(e.errno)),
            )
            raise

    async def setxattr(self, ino: int, name: str, value: bytes, ctx: Ctx) -> None:
        node = self.namespace.node(ino)
        if name == xattrs.CTL and node.kind is Kind.EXPORT:
            await self._control(node.export, value, ctx)
            return
        key = name[len(xattrs.PREFIX) :] if name.startswith(xattrs.PREFIX) else ""
        if node.kind is Kind.VOLUME and key in (xattrs.MAP_KEY, xattrs.UNMAP_KEY):
            await self._map_request(node, key, value, ctx)
            return
        if name.startswith(xattrs.PREFIX):
            raise XattrReadOnly(f"{name} is read-only")
        raise XattrNotSupported("fusemux stores no extended attributes")

    async def _control(self, export: str, value: bytes, ctx: Ctx) -> None:
        """``user.fusemux.ctl`` on an export directory: ``mount`` pins, ``unmount`` unpins."""
        if ctx.uid != 0:
            log.warning(
                "export %s: ctl refused for uid %d (root only)",
                export,
                ctx.uid,
                extra=fields(export=export, op="ctl", pid=ctx.pid, errno="EPERM"),
            )
            raise NotPermitted(f"only root may control export {export}")
        try:
            command = value.decode("ascii").strip()
        except UnicodeDecodeError:
            command = None
        if command not in xattrs.CTL_COMMANDS:
            shown = value[:64].decode("ascii", "backslashreplace")
            log.warning(
                "export %s: ctl value %r refused: expected one of %s",
                export,
                shown,
                ", ".join(xattrs.CTL_COMMANDS),
            )
            raise InvalidRequest(f"unknown ctl value {shown!r}")
        log.info("export %s: ctl %s", export, command, extra=fields(export=export, op="ctl"))
        if command == "mount":
            await self.exports.pin(export)
        else:
            await self.exports.unpin(export)

    async def removexattr(self, ino: int, name: str, ctx: Ctx) -> None:
        self.namespace.node(ino)
        if name.startswith(xattrs.PREFIX):  # also map/unmap: removing one requests nothing
            raise XattrReadOnly(f"{name} is read-only")
        raise XattrNotSupported("fusemux stores no extended attributes")
