"""Export health: whether each mounted export's backing filesystem still answers.

This module owns ``user.fusemux.health`` (``ok``, ``slow``, ``unresponsive``), the
``last_error`` it fills in while an export is not ok, and the log lines of its changes. A
check is one ``statvfs`` of the backing mount through the shared probe of
:mod:`fusemux.core.capacity` (so a hung server costs one stuck thread per export, however
often it is asked):

* the probe answered within :data:`HEALTH_SLOW` seconds (timed inside its thread, so waiting
  for a busy worker thread does not count): ``ok``;
* it answered, but took longer: ``slow``;
* it has not answered :data:`HEALTH_TIMEOUT` seconds after it started, or it failed
  (``ENOTCONN`` of a dead FUSE server, ``ESTALE``, ``EIO``, ...): ``unresponsive``.

A check runs every :data:`HEALTH_INTERVAL` seconds per *mounted* export only, and never
mounts one: it takes a peek hold just long enough to start (or join) the probe, then waits
without a hold, so it never delays an unmount or a linger. An export that is not mounted is
``ok`` (there is nothing to ask; a failed mount shows in ``state`` and ``last_error``). A
health change is logged once: WARNING for ``unresponsive``, INFO otherwise.

Concurrency: everything runs in the trio thread; one check task per export at a time, in the
nursery given to :meth:`HealthMonitor.run`. The statvfs itself runs in the export's threads.
"""

from __future__ import annotations

import logging

import trio

from fusemux.core.capacity import Capacity, StatvfsProbe
from fusemux.core.exports import Export, ExportManager, Health, State
from fusemux.logfmt import fields

log = logging.getLogger(__name__)

HEALTH_INTERVAL = 2.0  # seconds between the checks of one mounted export
HEALTH_SLOW = 1.0  # a statvfs slower than this makes the export "slow"
HEALTH_TIMEOUT = 3.0  # a statvfs still running this long makes it "unresponsive"


class HealthMonitor:
    """Periodic statvfs checks of the mounted exports."""

    def __init__(self, exports: ExportManager, capacity: Capacity) -> None:
        self.exports = exports
        self.capacity = capacity
        self._checking: set[str] = set()

    async def run(self) -> None:
        """Check every mounted export every HEALTH_INTERVAL seconds, until cancelled."""
        async with trio.open_nursery() as nursery:
            while True:
                for name, export in list(self.exports.exports.items()):
                    if export.state is not State.MOUNTED:
                        if export.health is not Health.OK:
                            export.reset_health()
                        continue
                    if name not in self._checking and not self.exports.closing:
                        self._checking.add(name)
                        nursery.start_soon(self._check, name)
                await trio.sleep(HEALTH_INTERVAL)

    async def _check(self, name: str) -> None:
        try:
            await self.check(name)
        finally:
            self._checking.discard(name)

    async def check(self, name: str) -> Health | None:
        """One check of export *name*; its new health, or None if it is not mounted."""
        probe = await self._probe(name)
        if probe is None:
            return None
        if probe.done.is_set() and probe.error is None and probe.seconds > HEALTH_TIMEOUT:
            # A probe that hung and has just come back says the backend answers again, but
            # not how fast: ask once more.
            probe = await self._probe(name)
            if probe is None:
                return None
        with trio.move_on_at(probe.started + HEALTH_TIMEOUT):
            await probe.done.wait()
        export = self.exports.exports.get(name)
        if export is None or export.state is not State.MOUNTED:
            return None
        if not probe.done.is_set():
            waited = trio.current_time() - probe.started
            return self._set(
                export,
                Health.UNRESPONSIVE,
                f"statvfs of {export.target} has not answered for {waited:.0f}s",
            )
        export.probe_seconds = probe.seconds
        if probe.error is not None:
            reason = probe.error.strerror or str(probe.error)
            return self._set(
                export, Health.UNRESPONSIVE, f"statvfs of {export.target} failed: {reason}"
            )
        if probe.seconds > HEALTH_SLOW:
            return self._set(
                export, Health.SLOW, f"statvfs of {export.target} took {probe.seconds:.1f}s"
            )
        return self._set(export, Health.OK, "")

    async def _probe(self, name: str) -> StatvfsProbe | None:
        export = self.exports.exports.get(name)
        if export is None:
            return None
        async with self.exports.hold_if_mounted(name) as held:
            if held is None:
                return None
            return self.capacity.probe(held)

    @staticmethod
    def _set(export: Export, health: Health, detail: str) -> Health:
        before = export.health
        export.health = health
        export.health_error = f"health {health.value}: {detail}" if detail else ""
        if health is not before:
            level = logging.WARNING if health is Health.UNRESPONSIVE else logging.INFO
            log.log(
                level,
                "export %s: health %s -> %s%s",
                export.name,
                before.value,
                health.value,
                f" ({detail})" if detail else "",
                extra=fields(export=export.name, op="health"),
            )
        return health
