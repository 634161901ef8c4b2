"""The things the benchmarks compare: backing filesystems and the four systems over them.

This module owns starting and, in ``finally``, undoing everything a benchmark run sets up:

* backings: an ext4 image loop-mounted by the harness, or a tmpfs, at ``<base>/<kind>/src``;
* A ``native``: the backing directory itself;
* B ``fusemux``: the real daemon (``python -m fusemux serve``, via
  :class:`tests.mount.harness.Daemon`) with one export that bind-mounts the backing;
* C ``mergerfs``: mergerfs with that one branch, in the foreground (``-f``), options in
  :data:`MERGERFS_OPTIONS`;
* D ``passthrough``: ``tests/bench/passthrough.py``, the bare pyfuse3 passthrough.

All four reach the same backing file. Processes are kept as ``Popen`` children and ended by
PID; mounts are undone by path (lazy detach as the last resort); loop devices autoclear.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fusemux.core.mounter import MNT_DETACH, umount2
from tests.mount.harness import Daemon, mounted_at, run, wait_for

SYSTEMS = ("native", "fusemux", "mergerfs", "passthrough")
LETTERS = {"native": "A", "fusemux": "B", "mergerfs": "C", "passthrough": "D"}
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
    """One system under test: where its copy of the backing directory is, and its PID."""

    name: str
    root: Path
    proc: subprocess.Popen[bytes] | None = None

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

        wait_for(up, 20, f"the {fstype} mount")

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
    daemon: Daemon | None = None
    fuse: list[_FuseProcess] = []
    try:
        if "native" in which:
            out["native"] = System("native", src)
        if "fusemux" in which:
            daemon = Daemon(base / "fusemux")
            daemon.exports[EXPORT] = {"source": str(src), "fstype": "none", "options": "bind"}
            daemon.write_config(linger=600.0)
            daemon.start(verbose=False)
            out["fusemux"] = System("fusemux", daemon.volumes(EXPORT), daemon.proc)
        if "mergerfs" in which:
            mnt = base / "mergerfs"
            argv = ["mergerfs", "-f", "-o", MERGERFS_OPTIONS, str(src), str(mnt)]
            fuse.append(_FuseProcess(argv, mnt, "fuse.mergerfs", base / "mergerfs.log"))
            out["mergerfs"] = System("mergerfs", mnt, fuse[-1].proc)
        if "passthrough" in which:
            mnt = base / "passthrough"
            argv = [sys.executable, str(PASSTHROUGH), str(src), str(mnt)]
            fuse.append(_FuseProcess(argv, mnt, "fuse.benchpt", base / "passthrough.log"))
            out["passthrough"] = System("passthrough", mnt, fuse[-1].proc)
        yield out
    finally:
        for f in reversed(fuse):
            f.stop()
        if daemon is not None:
            try:
                if daemon.proc is not None and daemon.proc.poll() is None:
                    daemon.stop()
            finally:
                daemon.cleanup()
