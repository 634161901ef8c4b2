"""The systemd notification protocol (``sd_notify``): readiness, status, stop, watchdog.

This module owns the datagrams fusemux sends to ``$NOTIFY_SOCKET`` under ``Type=notify``:
``READY=1`` once the FUSE mount answers, ``STATUS=`` lines (exports, mounted, open volumes),
``STOPPING=1`` when the shutdown begins, and ``WATCHDOG=1`` every half ``WatchdogSec=``
from a task of the event loop, so a wedged loop stops the keep-alives and systemd restarts
the service. Without ``$NOTIFY_SOCKET`` every call does nothing. An abstract socket name
starts with ``@``. No dependency: one ``AF_UNIX``/``SOCK_DGRAM`` socket.

Concurrency: called from the trio thread only; a send never blocks (the socket is
non-blocking, and a full or missing receiver only loses that datagram, logged at DEBUG).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends to ``$NOTIFY_SOCKET`` if it is set (read once, at creation)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        name = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + name[1:] if name.startswith("@") else name
        self.sock: socket.socket | None = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.setblocking(False)
        self.watchdog_interval = 0.0  # seconds between WATCHDOG=1; 0: no watchdog
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        if self.sock is not None and usec.isdigit() and int(usec) > 0 and mine:
            self.watchdog_interval = int(usec) / 1e6 / 2

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram; False if not sent."""
        if self.sock is None:
            return False
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            log.debug("sd_notify %s to %r failed: %s", fields, self.address, e)
            return False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
