"""The things the benchmarks compare: backing filesystems and the five systems over them.

This module owns starting and, in ``finally``, undoing everything a benchmark run sets up:

* backings: an ext4 image loop-mounted by the harness, or a tmpfs, at ``<base>/<kind>/src``;
* A ``native``: the backing directory itself;
* B ``fusemux``: the real daemon (``python -m fusemux serve``, via
  :class:`tests.mount.harness.Daemon`) on the pyfuse3 engine, with one export that
  bind-mounts the backing;
* C ``mergerfs``: mergerfs with that one branch, in the foreground (``-f``), options in
  :data:`MERGERFS_OPTIONS`;
* D ``passthrough``: ``tests/bench/passthrough.py``, the bare pyfuse3 passthrough;
* E ``fusemux-pt``: the same daemon and export as B on fusemux's own engine with kernel FUSE
  passthrough (``engine = "passthrough"``).

All five reach the same backing file. The engine of B and E is written into their config
explicitly (``auto`` may pick either) and checked through the root's
``user.fusemux.engine`` once the daemon is up. Processes are kept as ``Popen`` children and
ended by PID; mounts are undone by path (lazy detach as the last resort); loop devices
autoclear.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fusemux.core.mounter import MNT_DETACH, umount2
from tests.mount.harness import Daemon, mounted_at, run, wait_for

SYSTEMS = ("native", "fusemux", "mergerfs", "passthrough", "fusemux-pt")
LETTERS = {"native": "A", "fusemux": "B", "mergerfs": "C", "passthrough": "D", "fusemux-pt": "E"}
# The fusemux systems and the engine each runs on.
ENGINES = {"fusemux": "pyfuse3", "fusemux-pt": "passthrough"}
# One branch, no page cache of its own (the setting the baseline was measured with), and
# threads left at mergerfs' default.
MERGERFS_OPTIONS = "allow_other,cache.files=off,dropcacheonclose=false,category.create=ff"
PASSTHROUGH = Path(__file__).with_name("passthrough.py")
EXPORT = "bench"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


XATTR_SIZE_MAX = 1 << 16
_libc = ctypes.CDLL(None, use_errno=True)


def getxattr_once(path: Path, name: str) -> bytes:
    """getxattr(2) with a buffer of the largest size an xattr can have: exactly one GETXATTR
    request per call. ``os.getxattr`` tries 128 bytes first and asks again on ERANGE, so the
    requests a reading of engine_stats costs would depend on how long the JSON has grown."""
    buf = ctypes.create_string_buffer(XATTR_SIZE_MAX)
    n = _libc.getxattr(os.fsencode(path), name.encode(), buf, XATTR_SIZE_MAX)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return buf.raw[:n]


def engine_requests(root: Path) -> dict[str, int]:
    """The request counters of the fusemux daemon mounted at *root* (its engine_stats)."""
    stats = json.loads(getxattr_once(root, "user.fusemux.engine_stats"))
    return {str(k): int(v) for k, v in stats.get("requests", {}).items()}


def engine_info(root: Path) -> dict[str, object]:
    """The engine of the daemon mounted at *root* and its stats, less the request counters."""
    stats = json.loads(os.getxattr(root, "user.fusemux.engine_stats"))
    stats.pop("requests", None)
    return {"engine": os.getxattr(root, "user.fusemux.engine").decode(), **stats}


def requests_delta(system: System, before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Requests between two readings of *system*'s counters, less what the reading added."""
    keys = sorted(set(before) | set(after))
    delta = {k: after.get(k, 0) - before.get(k, 0) - system.stats_cost.get(k, 0) for k in keys}
    return {k: v for k, v in delta.items() if v}


def _stats_cost(root: Path) -> dict[str, int]:
    """What one reading of engine_stats adds to the counters (one GETXATTR): the delta
    between two readings in a row, on an idle mount."""
    engine_requests(root)
    first = engine_requests(root)
    second = engine_requests(root)
    return {k: n - first.get(k, 0) for k, n in second.items() if n > first.get(k, 0)}


def check_engine(daemon: Daemon, name: str) -> None:
    """Fail unless the started *daemon* runs the engine fusemux system *name* stands for."""
    running = daemon.xattr(daemon.mnt, "engine")
    if running != ENGINES[name]:
        raise AssertionError(f"{name}: the daemon runs the {running} engine, not {ENGINES[name]}")


def _start(daemon: Daemon, name: str, src: Path) -> System:
    """Serve *src* as the one export of *daemon*, on *name*'s engine (the caller stops it)."""
    engine = ENGINES[name]
    daemon.exports[EXPORT] = {"source": str(src), "fstype": "none", "options": "bind"}
    daemon.write_config(linger=600.0, engine=engine)
    daemon.start(verbose=False)
    check_engine(daemon, name)
    root = daemon.mnt
    return System(name, daemon.volumes(EXPORT), daemon.proc, root, _stats_cost(root))


def stop_daemon(daemon: Daemon) -> None:
    """Stop a started daemon by PID (SIGTERM, then kill) and detach what it left."""
    try:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
    finally:
        daemon.cleanup()


def detach(path: Path) -> None:
    """Unmount *path* if something is mounted there (plain first, lazily if busy)."""
    while mounted_at(path):
        try:
            umount2(str(path), 0)
        except OSError:
            with contextlib.suppress(OSError):
                umount2(str(path), MNT_DETACH)


@contextlib.contextmanager
def backing(base: Path, kind: str, size_mib: int) -> Iterator[Path]:
    """A mounted backing filesystem (``ext4`` image on a loop device, or ``tmpfs``)."""
    src = base / kind / "src"
    src.mkdir(parents=True)
    try:
        if kind == "ext4":
            image = base / kind / "backing.img"
            run("mkfs.ext4", "-q", "-F", image, f"{size_mib}M")
            run("mount", "-t", "ext4", "-o", "loop", image, src)
        elif kind == "tmpfs":
            run("mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", src)
        else:
            raise ValueError(f"unknown backing {kind!r}")
        yield src
    finally:
        detach(src)


@dataclass
class System:
    """One system under test: where its copy of the backing directory is, and its PID.

    For a fusemux daemon, *stats_root* is its mount root (``user.fusemux.engine_stats``) and
    *stats_cost* the requests one reading of those stats itself adds to them.
    """

    name: str
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    stats_root: Path | None = None
    stats_cost: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def path(self, name: str) -> Path:
        return self.root / name


class _FuseProcess:
    """A FUSE daemon run in the foreground: started, waited for, stopped by PID."""

    def __init__(self, argv: list[str], mnt: Path, fstype: str, log: Path) -> None:
        mnt.mkdir(parents=True, exist_ok=True)
        self.mnt, self.fstype = mnt, fstype
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{argv[0]} exited {proc.returncode}: {log.read_text()}")
            return fstype in mounted_at(mnt)

        try:
            wait_for(up, 20, f"the {fstype} mount")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            detach(self.mnt)


@contextlib.contextmanager
def systems(base: Path, src: Path, which: tuple[str, ...] = SYSTEMS) -> Iterator[dict[str, System]]:
    """Start every system in *which* over the backing directory *src*; stop all afterwards."""
    out: dict[str, System] = {}
    with contextlib.ExitStack() as undo:  # every undo runs, last started first
        if "native" in which:
            out["native"] = System("native", src)
        for name in (s for s in SYSTEMS if s in which):
            if name in ENGINES:  # B, E: a fusemux daemon
                daemon = Daemon(base / name)
                undo.callback(stop_daemon, daemon)
                out[name] = _start(daemon, name, src)
            elif name == "mergerfs":
                mnt = base / "mergerfs"
                argv = ["mergerfs", "-f", "-o", MERGERFS_OPTIONS, str(src), str(mnt)]
                fuse = _FuseProcess(argv, mnt, "fuse.mergerfs", base / "mergerfs.log")
                undo.callback(fuse.stop)
                out["mergerfs"] = System("mergerfs", mnt, fuse.proc)
            elif name == "passthrough":
                mnt = base / "passthrough"
                argv = [sys.executable, str(PASSTHROUGH), str(src), str(mnt)]
                fuse = _FuseProcess(argv, mnt, "fuse.benchpt", base / "passthrough.log")
                undo.callback(fuse.stop)
                out["passthrough"] = System("passthrough", mnt, fuse.proc)
        yield out
