"""Block mappings of volumes: loop devices and qemu-nbd servers, and who holds what.

This module owns the mappings of volumes to block devices or NBD URIs: parsing a request
(``user.fusemux.map``), setting a mapping up, ending it (``user.fusemux.unmap`` or shutdown),
reporting it (``user.fusemux.mapping``), telling which mappings are in use, and cleaning up
what a daemon killed with SIGKILL left behind (:func:`cleanup_leftover_mappings`).

* A mapping is a holder of its export (``ExportManager.acquire``, a non-transient hold): the
  export stays mounted while the mapping exists and lingers after the unmap like after the
  last close.
* Loop devices are attached to the backing file inside the private export mount
  (``<state_dir>/mnt/<export>/<name>``), never to the file on fusemux's own FUSE mount: a loop
  device over our own mount could deadlock under memory pressure.
* qemu-nbd servers are tasks in the daemon's nursery (:class:`fusemux.core.nbd.Supervisor`).

Concurrency: all state lives in the trio thread. ``_busy`` marks volumes with a map or unmap
under way, so two requests for the same volume never interleave (the second gets EBUSY).
Ioctls, sysfs and image reads run in worker threads under the export's limiter.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from fusemux.config import Config
from fusemux.core import loopdev, nbd, partitions, workers
from fusemux.core.exports import Export, ExportManager
from fusemux.core.images import ImageCache
from fusemux.errors import (
    AlreadyMapped,
    BadMapRequest,
    FusemuxError,
    MappingFailed,
    MappingInUse,
    NotMapped,
    ReadOnlyExport,
    ShuttingDown,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

KINDS = ("loop", "nbd", "auto")
OPTIONS = {"loop": ("ro", "partitions"), "nbd": ("ro",), "auto": ("ro", "partitions")}


@dataclass(frozen=True)
class MapRequest:
    """A parsed ``user.fusemux.map`` value."""

    kind: str  # loop, nbd or auto
    read_only: bool = False
    partitions: bool = False


def parse_request(value: bytes) -> MapRequest:
    """Parse ``loop[,ro][,partitions]``, ``nbd[,ro]`` or ``auto[,ro][,partitions]``.

    Surrounding whitespace and a trailing NUL are ignored; anything else that is not exactly
    this grammar raises BadMapRequest with the reason.
    """
    try:
        text = value.decode("ascii").strip().rstrip("\0").strip()
    except UnicodeDecodeError:
        raise BadMapRequest("map value is not ASCII") from None
    if not text:
        raise BadMapRequest("map value is empty; expected loop, nbd or auto")
    kind, *options = [t.strip() for t in text.split(",")]
    if kind not in KINDS:
        raise BadMapRequest(f"unknown mapping kind {kind!r}; expected loop, nbd or auto")
    seen: set[str] = set()
    for opt in options:
        if opt not in OPTIONS[kind]:
            allowed = ", ".join(OPTIONS[kind])
            raise BadMapRequest(f"option {opt!r} is not valid for {kind} (valid: {allowed})")
        if opt in seen:
            raise BadMapRequest(f"option {opt!r} given twice")
        seen.add(opt)
    return MapRequest(kind, "ro" in seen, "partitions" in seen)


def parse_unmap(value: bytes) -> None:
    """``user.fusemux.unmap`` takes an empty value (whitespace and a NUL are tolerated)."""
    if value.strip(b" \t\n\0"):
        raise BadMapRequest("unmap takes an empty value")


@dataclass
class Mapping:
    """One live mapping of one volume."""

    export: Export
    name: str
    kind: str  # loop or nbd (auto is resolved at map time)
    read_only: bool
    partitions: bool
    device: str  # /dev/loopN, or the NBD URI
    extra: list[str] = field(default_factory=list)  # loop partitions, or /dev/nbdX
    servers: list[nbd.Supervisor] = field(default_factory=list)  # qemu-nbd server first

    @property
    def label(self) -> str:
        return f"{self.export.name}/{self.name}"

    def value(self) -> str:
        """The ``user.fusemux.mapping`` value: device or URI, then its partitions/device."""
        return ",".join([self.device, *self.extra])

    def options(self) -> str:
        opts = [self.kind]
        if self.read_only:
            opts.append("ro")
        if self.partitions:
            opts.append("partitions")
        return ",".join(opts)

    def pid(self) -> int:
        return self.servers[0].pid if self.servers else 0

    def block_devices(self) -> list[str]:
        """The kernel block devices of this mapping (for in-use checks)."""
        if self.kind == "loop":
            return [self.device, *self.extra]
        return [d for d in self.extra if d.startswith("/dev/")]


class MappingManager:
    """Every mapping of the daemon, keyed by (export, volume name)."""

    def __init__(self, config: Config, exports: ExportManager, images: ImageCache) -> None:
        self.config = config
        self.exports = exports
        self.images = images
        self.nursery: trio.Nursery | None = None  # where qemu-nbd supervisors run
        self.mappings: dict[tuple[str, str], Mapping] = {}
        self._busy: set[tuple[str, str]] = set()
        self.closing = False

    @property
    def nbd_dir(self) -> Path:
        return self.config.state_dir / "nbd"

    # -- reading -----------------------------------------------------------------------

    def get(self, export: str, name: str) -> Mapping | None:
        return self.mappings.get((export, name))

    def mapped_volumes(self, export: str) -> list[str]:
        return sorted(name for exp, name in self.mappings if exp == export)

    def all(self) -> list[Mapping]:
        return [self.mappings[k] for k in sorted(self.mappings)]

    async def in_use(self) -> list[str]:
        """``export/name`` of every mapping whose device or a partition is mounted or held.

        For the shutdown policy ("refuse while in use unless forced"). An NBD URI client
        cannot be seen from here; only a ``/dev/nbdX`` of the mapping counts.
        """
        return sorted(label for label in (await self.in_use_details()))

    async def in_use_details(self) -> dict[str, list[str]]:
        """Like :meth:`in_use`, with what uses each mapping (``/dev/loop3p1 mounted on /x``)."""
        out: dict[str, list[str]] = {}
        for m in self.all():
            devices = m.block_devices()
            if not devices:
                continue
            users = await trio.to_thread.run_sync(loopdev.users, devices)
            if users:
                out[m.label] = users
        return out

    # -- map and unmap -----------------------------------------------------------------

    async def _io(self, export: Export, fn: Callable[..., T], *args: object) -> T:
        return await workers.run(export, fn, *args)

    async def map(self, export_name: str, name: str, request: MapRequest) -> Mapping:
        """Map volume *name* of *export_name*; the mapping holds the export until unmapped."""
        key = (export_name, name)
        if self.closing:
            raise ShuttingDown("fusemux is shutting down")
        if key in self.mappings:
            raise AlreadyMapped(f"{export_name}/{name} is mapped already")
        if key in self._busy:
            raise AlreadyMapped(f"a map or unmap of {export_name}/{name} is in progress")
        self._busy.add(key)
        try:
            export = await self.exports.acquire(export_name)
            try:
                mapping = await self._setup(export, name, request)
            except BaseException:
                self.exports.release(export)
                raise
            self.mappings[key] = mapping
            log.info("mapped %s as %s: %s", mapping.label, mapping.options(), mapping.value())
            return mapping
        finally:
            self._busy.discard(key)

    async def _setup(self, export: Export, name: str, request: MapRequest) -> Mapping:
        path = export.backing_path(name)
        header = await self._io(export, self.images.header, path)
        kind = request.kind
        if kind == "auto":
            kind = "loop" if header.format == "raw" else "nbd"
        if export.config.read_only and not request.read_only:
            raise ReadOnlyExport(f"export {export.name} is read-only; map it with ro")
        if kind == "loop":
            if header.format != "raw":
                raise BadMapRequest(
                    f"{export.name}/{name} is {header.format}; loop maps raw images only "
                    "(use nbd or auto)"
                )
            device, parts = await self._io(
                export, _attach_loop, path, request.read_only, request.partitions
            )
            return Mapping(
                export, name, "loop", request.read_only, request.partitions, device, parts
            )
        if request.partitions:
            log.info("%s/%s: partitions ignored for an nbd mapping", export.name, name)
        return await self._setup_nbd(export, name, path, header.format, request.read_only)

    async def _setup_nbd(
        self, export: Export, name: str, path: Path, fmt: str, read_only: bool
    ) -> Mapping:
        assert self.nursery is not None, "MappingManager used before it got a nursery"
        stem = nbd.mapping_id(export.name, name)
        sock = self.nbd_dir / f"{stem}.sock"
        if len(os.fsencode(sock)) > nbd.SOCKET_PATH_MAX:
            raise FusemuxError(
                f"socket path {sock} is too long for a unix socket; use a shorter state_dir",
                errno.ENAMETOOLONG,
            )
        await trio.to_thread.run_sync(lambda: self.nbd_dir.mkdir(mode=0o700, exist_ok=True))
        direct = await self._io(export, nbd.supports_direct_io, path)
        pid_file = self.nbd_dir / f"{stem}.pid"
        log_file = self.nbd_dir / f"{stem}.log"
        server = nbd.Supervisor(
            f"{export.name}/{name}",
            nbd.server_argv(path, fmt, sock, pid_file, read_only, direct),
            pid_file,
            log_file,
            [sock, pid_file, log_file],
        )
        await self.nursery.start(server.run)
        mapping = Mapping(export, name, "nbd", read_only, False, nbd.uri(sock), [], [server])
        if not nbd.kernel_has_nbd():
            return mapping
        try:
            device = await trio.to_thread.run_sync(nbd.free_nbd_device)
            if device is None:
                raise MappingFailed("no free /dev/nbd device", errno.EBUSY)
            cpid = self.nbd_dir / f"{stem}.dev.pid"
            clog = self.nbd_dir / f"{stem}.dev.log"
            client = nbd.Supervisor(
                f"{export.name}/{name} {device}",
                nbd.connect_argv(device, sock, cpid, read_only),
                cpid,
                clog,
                [cpid, clog],
            )
            await self.nursery.start(client.run)
        except BaseException:
            with trio.CancelScope(shield=True):
                await server.stop()
            raise
        mapping.extra.append(device)
        mapping.servers.append(client)
        return mapping

    async def unmap(self, export_name: str, name: str) -> None:
        """End the mapping of *export_name*/*name*; refused (EBUSY) while its device is used."""
        key = (export_name, name)
        if key in self._busy:
            raise AlreadyMapped(f"a map or unmap of {export_name}/{name} is in progress")
        mapping = self.mappings.get(key)
        if mapping is None:
            raise NotMapped(f"{export_name}/{name} is not mapped")
        self._busy.add(key)
        try:
            devices = mapping.block_devices()
            if devices:
                users = await self._io(mapping.export, loopdev.users, devices)
                if users:
                    raise MappingInUse(f"{mapping.label} is in use: {'; '.join(users)}")
            with trio.CancelScope(shield=True):
                await self._teardown(mapping, force=False)
            del self.mappings[key]
            self.exports.release(mapping.export)
            log.info("unmapped %s (%s)", mapping.label, mapping.value())
        finally:
            self._busy.discard(key)

    async def _teardown(self, mapping: Mapping, force: bool) -> None:
        for server in reversed(mapping.servers):
            await server.stop()
        if mapping.kind == "loop":
            try:
                await self._io(mapping.export, _detach_loop, mapping.device, force)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    raise MappingInUse(f"{mapping.label}: {e.strerror}") from None
                raise

    # -- shutdown ----------------------------------------------------------------------

    async def shutdown(self) -> None:
        """End every mapping (before the exports are unmounted), whatever uses them.

        A loop device still in use is detached by the kernel when its last user lets go
        (``LOOP_CLR_FD`` on a busy device sets autoclear); its partitions may then stay until
        that moment. Each such case is logged as a warning.
        """
        self.closing = True
        for mapping in self.all():
            try:
                await self._teardown(mapping, force=True)
                log.info("unmapped %s at shutdown", mapping.label)
            except (OSError, FusemuxError) as e:
                log.warning("unmapping %s at shutdown failed: %s", mapping.label, e)
            self.mappings.pop((mapping.export.name, mapping.name), None)
            self.exports.release(mapping.export)


def _attach_loop(path: Path, read_only: bool, want_partitions: bool) -> tuple[str, list[str]]:
    """Attach *path*; with partitions, add the nodes of its GPT/MBR (blocking)."""
    device = loopdev.attach(path, read_only, partscan=want_partitions)
    try:
        parts: list[str] = []
        if want_partitions:
            table = partitions.parse_file(str(path))
            partitions.add_partitions(device, table)
            parts = loopdev.partition_devices(device)
        return device, parts
    except BaseException:
        _detach_loop(device, force=True)
        raise


def _detach_loop(device: str, force: bool) -> None:
    """Delete the partitions of *device*, then detach it (blocking).

    Without *force* a partition that cannot be deleted (EBUSY: mounted) aborts the detach.
    """
    numbers = [int(p.rsplit("p", 1)[1]) for p in loopdev.partition_devices(device)]
    try:
        partitions.delete_partitions(device, numbers)
    except OSError as e:
        if not force:
            raise
        log.warning("%s: %s; detaching anyway", device, e.strerror)
    loopdev.detach(device)


def cleanup_leftover_mappings(config: Config) -> None:
    """Remove the mappings a daemon killed with SIGKILL left behind (blocking, at startup).

    Loop devices whose backing file lies under ``<state_dir>/mnt/`` lose their partitions and
    are detached; qemu-nbd processes named by pid files in ``<state_dir>/nbd/`` are stopped
    (after checking their command line) and their sockets, pid and log files removed. This
    runs before the stale backing mounts are cleared, because those loop devices keep them
    busy. Nothing is re-adopted: the mappings are gone and must be requested again.
    """
    prefix = str(config.mnt_dir) + "/"
    for device, backing in loopdev.attached_loops().items():
        if not backing.startswith(prefix):
            continue
        log.warning("detaching leftover loop device %s (%s)", device, backing)
        try:
            _detach_loop(device, force=True)
        except OSError as e:
            log.warning("cannot detach leftover loop device %s: %s", device, e.strerror)
    with contextlib.suppress(OSError):
        for line in nbd.kill_leftovers(config.state_dir / "nbd"):
            log.warning("%s", line)
