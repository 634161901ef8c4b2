"""Tier (c): the daemon under systemd's notification protocol (``Type=notify``), with a
notify socket made by the test: ``READY=1`` only once the mount answers, ``STATUS=``,
``WATCHDOG=1`` from the event loop at half ``WATCHDOG_USEC``, ``STOPPING=1`` at stop; an
abstract socket name (``@...``) works too.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.mount.harness import Daemon, wait_for

VOL = b"notify-test\n" * 100


class NotifyReceiver:
    """A datagram socket playing systemd's notify socket; on READY=1 it stats the mount
    (in a thread of its own, with a time limit: a mount not yet served would block)."""

    def __init__(self, address: str, mnt: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.mnt = mnt
        self.messages: list[tuple[float, list[str]]] = []
        self.stat_at_ready: str = ""
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while not self.done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = data.decode().split("\n")
            if "READY=1" in fields:  # before the message is published to the test
                self.stat_at_ready = self._stat_now()
            self.messages.append((time.monotonic(), fields))

    def _stat_now(self) -> str:
        result: list[str] = []

        def stat() -> None:
            try:
                result.append("dir" if os.path.isdir(self.mnt / "volumes") else "not a dir")
            except OSError as e:
                result.append(f"error {e}")

        worker = threading.Thread(target=stat, daemon=True)
        worker.start()
        worker.join(2.0)
        return result[0] if result else "blocked"

    def fields(self, key: str) -> list[str]:
        return [f for _, fs in self.messages for f in fs if f.startswith(key)]

    def first(self, field: str) -> int:
        """Index of the first message carrying *field*."""
        return next(i for i, (_, fs) in enumerate(self.messages) if field in fs)

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_ready_status_watchdog_stopping(
    daemon: Daemon, tmp_path: Path, abstract: bool
) -> None:
    address = (
        f"@fusemux-test-{os.getpid()}-{id(tmp_path)}" if abstract else str(tmp_path / "notify")
    )
    receiver = NotifyReceiver(address, daemon.mnt)
    try:
        daemon.add_bind_export("gold", {"a": VOL})
        daemon.write_config(linger=0)
        daemon.start(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"})
        assert daemon.proc is not None
        wait_for(lambda: receiver.fields("READY=1"), 20, "READY=1")
        assert receiver.stat_at_ready == "dir"  # the mount answered when READY=1 came
        assert f"MAINPID={daemon.proc.pid}" in receiver.fields("MAINPID=")
        status = receiver.fields("STATUS=")[0]
        assert status == "STATUS=1 export(s), 0 mounted, 0 open volume(s)", status
        with open(daemon.volume("gold", "a"), "rb") as f:
            assert f.read() == VOL
        # The watchdog every 0.5 s: at least 3 in 2 s, from the event loop.
        before = len(receiver.fields("WATCHDOG=1"))
        time.sleep(2.0)
        assert len(receiver.fields("WATCHDOG=1")) - before >= 3
        assert not receiver.fields("STOPPING=1")
        assert daemon.stop() == 0
        wait_for(lambda: receiver.fields("STOPPING=1"), 5, "STOPPING=1")
        assert receiver.first("READY=1") < receiver.first("STOPPING=1")
        assert "the mount at" in daemon.log() and "answers" in daemon.log()
    finally:
        receiver.close()
