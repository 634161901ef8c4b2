"""Prometheus metrics: the instruments, the collector of the core's state, the endpoint.

This module owns every ``fusemux_*`` metric (docs/admin.md has the table) and the HTTP
endpoint given by the config key ``metrics_listen``. It uses ``prometheus_client`` for the
instruments and the text exposition (:func:`prometheus_client.generate_latest`); fusemux
only supplies the small HTTP/1.0 server around it, on trio, for TCP and unix sockets alike.

Three kinds of series:

* events counted where they happen, in the core or at an engine's edge: FUSE requests and
  their latency by opcode (:func:`request_done`, one call per request in each engine), and
  the duration of each mount (:func:`mount_done`);
* the core's state, read when scraped by :class:`CoreCollector`: per export its state,
  health, holders, open volumes, backing calls in flight, mounts, mount failures by errno and
  io_timeouts; mappings by kind; the engine's :class:`~fusemux.core.api.EngineStatistics`;
* the process (``fusemux_process_*``: CPU, memory, file descriptors), from prometheus_client
  (named with the ``fusemux_`` prefix like every other series).

Concurrency: everything runs in the trio thread. The instruments are thread-safe anyway; the
collector reads the live (mutable) state of the core, which is safe only because a scrape
runs :func:`generate_latest` in the trio thread too (the endpoint is a trio task, not
prometheus_client's own server thread). Serving a scrape costs the event loop a few ms; at
most :data:`MAX_CLIENTS` connections are served at once, each for at most
:data:`CLIENT_TIMEOUT` seconds.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import prometheus_client
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fusemux import __version__
from fusemux.config import MetricsListen

# A module import: exports.py imports this module (mount_done) while it loads.
from fusemux.core import exports as core_exports

if TYPE_CHECKING:
    from fusemux.core.fs import FileSystem

log = logging.getLogger(__name__)

# One registry for the daemon (not prometheus_client's global one, which tests share).
REGISTRY = CollectorRegistry()
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call] # no *_created series: they only add noise
prometheus_client.ProcessCollector(namespace="fusemux", registry=REGISTRY)

REQUESTS = Counter("fusemux_requests", "FUSE requests served, by opcode", ["op"], registry=REGISTRY)
REQUEST_SECONDS = Histogram(
    "fusemux_request_duration_seconds",
    "Time from a FUSE request's arrival in the engine to its reply, by opcode",
    ["op"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
    + (0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
MOUNT_SECONDS = Histogram(
    "fusemux_export_mount_duration_seconds",
    "Duration of the mounts of an export (mount(8) included), by result (ok, failed)",
    ["export", "result"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
    registry=REGISTRY,
)

# generate_latest() writes the classic text format (names escaped with underscores), which
# every Prometheus 2.x reads; newer clients would announce it as version=1.0.0.
CONTENT_TYPE: str = getattr(
    prometheus_client.exposition, "CONTENT_TYPE_PLAIN_0_0_4", prometheus_client.CONTENT_TYPE_LATEST
)

_enabled = False  # request_done costs nothing until an endpoint is configured

MAX_CLIENTS = 8
CLIENT_TIMEOUT = 10.0
MAX_REQUEST = 8192
MAPPING_KINDS = ("loop", "nbd")


def now() -> float:
    """The clock of :func:`request_done` (engines call it when a request arrives)."""
    return time.perf_counter()


def request_done(op: str, started: float) -> None:
    """One FUSE request of opcode *op* answered; *started* is :func:`now` at its arrival."""
    if _enabled:
        label = op.lower()
        REQUESTS.labels(label).inc()
        REQUEST_SECONDS.labels(label).observe(time.perf_counter() - started)


def mount_done(export: str, seconds: float, ok: bool) -> None:
    """One mount of *export* finished (successfully or not) after *seconds*."""
    MOUNT_SECONDS.labels(export, "ok" if ok else "failed").observe(seconds)


class CoreCollector(Collector):
    """The core's state as metric families, read at scrape time (in the trio thread)."""

    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs

    def collect(self) -> Iterator[Metric]:
        fs = self.fs
        engine = fs.engine
        info = GaugeMetricFamily(
            "fusemux_info",
            "Always 1; the version and the FUSE engine",
            labels=["version", "engine"],
        )
        info.add_metric([__version__, engine.name if engine is not None else ""], 1)
        yield info
        exports = list(fs.exports.exports.values())
        count = GaugeMetricFamily(
            "fusemux_exports", "Exports configured (and removed ones still held)"
        )
        count.add_metric([], len(exports))
        yield count

        def gauge(name: str, doc: str, *extra: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["export", *extra])

        def counter(name: str, doc: str, *extra: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=["export", *extra])

        state = gauge("fusemux_export_state", "1 for the export's current state, else 0", "state")
        health = gauge(
            "fusemux_export_health", "1 for the export's current health, else 0", "health"
        )
        probe = gauge(
            "fusemux_export_health_probe_seconds",
            "Duration of the last statvfs health probe of the backing filesystem",
        )
        mounts = counter("fusemux_export_mounts", "Successful mounts of the export")
        failures = counter(
            "fusemux_export_mount_failures", "Failed mounts of the export, by errno", "errno"
        )
        holders = gauge(
            "fusemux_export_holders", "Holders: open files, directory handles, short holds, pin"
        )
        volumes = gauge("fusemux_export_open_volumes", "Volumes of the export open now")
        handles = gauge("fusemux_export_open_handles", "File handles open on the export now")
        inflight = gauge(
            "fusemux_export_backing_calls_in_flight",
            "Blocking calls on the backing filesystem running or queued now",
        )
        timeouts = counter(
            "fusemux_export_io_timeouts",
            "Backing calls abandoned after the export's io_timeout (callers got ETIMEDOUT)",
        )
        open_by_export: dict[str, list[str]] = {}
        for handle in fs.handles.files.values():
            open_by_export.setdefault(handle.export.name, []).append(handle.name)
        for export in exports:
            name = export.name
            for s in core_exports.State:
                state.add_metric([name, s.value], 1 if export.state is s else 0)
            for h in core_exports.Health:
                health.add_metric([name, h.value], 1 if export.health is h else 0)
            probe.add_metric([name], export.probe_seconds)
            mounts.add_metric([name], export.mount_count)
            for reason, n in sorted(export.mount_failures.items()):
                failures.add_metric([name, reason], n)
            holders.add_metric([name], export.holders)
            opened = open_by_export.get(name, [])
            volumes.add_metric([name], len(set(opened)))
            handles.add_metric([name], len(opened))
            inflight.add_metric([name], export.inflight)
            timeouts.add_metric([name], export.io_timeouts)
        yield from (state, health, probe, mounts, failures, holders, volumes, handles)
        yield from (inflight, timeouts)

        mappings = GaugeMetricFamily(
            "fusemux_mappings", "Volume mappings now, by kind", labels=["kind"]
        )
        kinds = dict.fromkeys(MAPPING_KINDS, 0)
        for m in fs.mappings.all():
            kinds[m.kind] = kinds.get(m.kind, 0) + 1
        for kind, n in kinds.items():
            mappings.add_metric([kind], n)
        yield mappings

        if engine is None:
            return
        stats = engine.statistics()
        einfo = GaugeMetricFamily(
            "fusemux_engine_info",
            "Always 1; the FUSE engine, its protocol and whether passthrough is on",
            labels=["engine", "protocol", "passthrough"],
        )
        einfo.add_metric([engine.name, stats.protocol, str(stats.passthrough).lower()], 1)
        yield einfo
        events = CounterMetricFamily(
            "fusemux_engine_events",
            "The engine's own counters (engine_stats): requests by opcode and events such as "
            "interrupted or passthrough_refused",
            labels=["event"],
        )
        for event, n in sorted(stats.requests.items()):
            events.add_metric([event], n)
        yield events
        backing = GaugeMetricFamily(
            "fusemux_engine_backing_registered", "Passthrough backing files registered now"
        )
        backing.add_metric([], stats.backing_registered)
        yield backing
        nodes = GaugeMetricFamily(
            "fusemux_engine_nodes_looked_up", "Nodes the kernel holds a lookup count on"
        )
        nodes.add_metric([], stats.nodes_looked_up)
        yield nodes


# -- the endpoint -----------------------------------------------------------------------------


class ListenError(Exception):
    """The metrics endpoint cannot be opened (address in use, bad address...)."""


def bind(listen: MetricsListen) -> socket.socket:
    """A listening socket for *listen*, made before the FUSE mount so a bad one stops startup.

    A unix socket path left by a dead daemon is replaced; one that a live process still
    accepts connections on is "in use".
    """
    try:
        if listen.path:
            return _bind_unix(Path(listen.path))
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((listen.host, listen.port))
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        return sock
    except OSError as e:
        raise ListenError(f"metrics_listen {listen}: cannot listen: {e.strerror or e}") from None


def _bind_unix(path: Path) -> socket.socket:
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, "a file that is not a socket is in the way")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: left by a daemon that died
        else:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o666)  # read-only numbers; let a prometheus user connect
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    sock: socket.socket,
    fs: FileSystem,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on the bound *sock* until cancelled; then close it."""
    global _enabled
    collector = CoreCollector(fs)
    REGISTRY.register(collector)
    _enabled = True
    clients = [0]  # connections being served now
    try:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                if clients[0] >= MAX_CLIENTS:
                    await stream.aclose()
                    continue
                clients[0] += 1
                nursery.start_soon(_client, stream, clients)
    finally:
        _enabled = False
        REGISTRY.unregister(collector)


def close(sock: socket.socket, listen: MetricsListen) -> None:
    """Close a socket from :func:`bind` (again: serve closes it) and remove its unix path."""
    sock.close()
    if listen.path:
        with contextlib.suppress(OSError):
            os.unlink(listen.path)


async def _client(stream: trio.SocketStream, clients: list[int]) -> None:
    try:
        with trio.move_on_after(CLIENT_TIMEOUT):
            request = b""
            while b"\r\n\r\n" not in request and b"\n\n" not in request:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
                if len(request) > MAX_REQUEST:
                    await _reply(stream, 431, b"request too large\n")
                    return
            method, _, rest = request.partition(b" ")
            target = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if method not in (b"GET", b"HEAD"):
                await _reply(stream, 405, b"only GET and HEAD\n")
            elif target != b"/metrics":
                await _reply(stream, 404, b"fusemux serves /metrics\n", head=method == b"HEAD")
            else:
                body = prometheus_client.generate_latest(REGISTRY)
                await _reply(
                    stream,
                    200,
                    body,
                    CONTENT_TYPE,
                    head=method == b"HEAD",
                )
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the client went away
    finally:
        clients[0] -= 1
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.aclose()


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Too Large"}


async def _reply(
    stream: trio.SocketStream,
    code: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    head: bool = False,
) -> None:
    header = (
        f"HTTP/1.0 {code} {_REASONS[code]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    await stream.send_all(header if head else header + body)
