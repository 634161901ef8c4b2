"""PID 1 of a private libvirt "host": runs virtlogd, virtlockd and libvirtd, reaps, stops them.

``tests/libvirt/harness.py`` starts this script as
``unshare --mount --pid --uts --net --fork --kill-child --mount-proc python nsinit.py SPEC``.
Inside those fresh namespaces it:

1. mounts a tmpfs on ``/run`` and binds the test's private directories over ``/etc/libvirt``,
   ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/log/libvirt`` and ``/var/cache/libvirt``
   (so the daemons, which always use these system paths as root, touch nothing of the host's;
   the mount namespace dies with this process, so nothing stays mounted), plus the test's
   own binds (a fusemux mount at a path common to several hosts, a shared lockspace);
2. sets the host name (libvirt refuses a migration to a host of its own name) and brings up
   ``lo`` (the only network of the namespace, which a second host may join);
3. starts the three daemons in the foreground (never ``-d``) with their pid files in the
   private run directory, and logs to files the harness reads;
4. reaps every child, including the qemu processes libvirtd daemonizes (they are reparented
   to this PID 1), until SIGTERM;
5. on SIGTERM stops libvirtd, then virtlockd and virtlogd, each by PID with SIGTERM, waits
   for them (SIGKILL after a timeout) and exits 0. Whatever is left dies with the PID
   namespace when this process exits.

Concurrency: single-threaded; the SIGTERM handler only sets a flag that the main loop,
which sleeps in short ``waitpid`` polls, acts on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

_stop = False


def _on_term(signum: int, frame: object) -> None:
    global _stop
    _stop = True


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _reap(ours: dict[int, str], dead: set[int]) -> None:
    """Reap every exited child; note which of them were our daemons."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in ours:
            dead.add(pid)


def _stop_daemon(pid: int, ours: dict[int, str], dead: set[int], timeout: float) -> None:
    if pid in dead:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid not in dead:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
        _reap(ours, dead)
        time.sleep(0.05)


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    _mount("--make-rprivate", "/")
    _mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run")
    os.mkdir("/run/libvirt")
    for src, dst in spec["binds"]:
        if dst.startswith("/run/"):
            os.makedirs(dst, exist_ok=True)  # on the private tmpfs
        _mount("--bind", src, dst)
    if spec.get("hostname"):
        socket.sethostname(spec["hostname"])  # the UTS namespace is private too
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    run = "/run/libvirt"
    logs = Path(spec["logs"])
    ours: dict[int, str] = {}
    dead: set[int] = set()
    env = dict(os.environ, **spec.get("env", {}))
    for name in ("virtlogd", "virtlockd", "libvirtd"):
        log = open(logs / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [f"/usr/sbin/{name}", "-p", f"{run}/{name}.pid"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
        )
        log.close()
        ours[proc.pid] = name
    Path(spec["ready"]).write_text(json.dumps(ours))
    while not _stop and not dead:  # a daemon that dies stops the rest (its log says why)
        _reap(ours, dead)
        time.sleep(0.1)
    for pid in reversed(list(ours)):  # libvirtd first, virtlogd last
        _stop_daemon(pid, ours, dead, 30)
    _reap(ours, dead)
    return 0


if __name__ == "__main__":
    sys.exit(main())
