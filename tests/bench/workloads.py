"""What the benchmarks measure: fio data-path workloads and the lifecycle measurements.

This module owns the workload definitions and the measuring itself; it starts nothing that
outlives a call except through :mod:`tests.bench.systems`, whose context managers undo it.

* :data:`FIO_WORKLOADS` and :func:`fio_run`: one fio job on one file, with the daemon's CPU
  time (utime + stime from ``/proc/PID/stat``) read around it and, for a fusemux daemon, the
  requests it saw (its ``user.fusemux.engine_stats`` read before and after).
* :func:`open_close_latency`: warm ``open``+``close`` latency per system, interleaved.
* :func:`first_open`: first open of an unmounted ext4 export through fusemux (one daemon per
  engine) against a plain ``mount -o loop`` + open of the same image.
* :func:`storm_ls_rss`: the mount storm (many concurrent first opens over many exports), the
  daemon's RSS while they are all open, and ``ls -l`` of an export with many volumes, on one
  engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench.systems import (
    ENGINES,
    System,
    check_engine,
    cpu_seconds,
    detach,
    engine_requests,
    requests_delta,
    rss_bytes,
    stop_daemon,
)
from tests.mount.harness import Daemon, run

KiB, MiB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    direct: bool
    engine: str
    iodepth: int
    unit: str  # "MB/s" or "IOPS"


FIO_WORKLOADS = (
    Workload("seq read 1M buffered", "read", "1M", False, "psync", 1, "MB/s"),
    Workload("seq read 1M O_DIRECT", "read", "1M", True, "psync", 1, "MB/s"),
    Workload("seq write 1M buffered", "write", "1M", False, "psync", 1, "MB/s"),
    Workload("seq write 1M O_DIRECT", "write", "1M", True, "psync", 1, "MB/s"),
    Workload("randread 4K O_DIRECT QD1", "randread", "4k", True, "psync", 1, "IOPS"),
    Workload("randread 4K O_DIRECT QD16", "randread", "4k", True, "libaio", 16, "IOPS"),
    Workload("randwrite 4K O_DIRECT QD1", "randwrite", "4k", True, "psync", 1, "IOPS"),
    Workload("randwrite 4K O_DIRECT QD16", "randwrite", "4k", True, "libaio", 16, "IOPS"),
)


def fill(path: Path, size: int) -> None:
    """Write *size* bytes of incompressible data and flush them to the backing."""
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


# The requests of a fusemux daemon every fio run records; the others go to requests_other.
COUNTED = ("GETXATTR", "READ", "WRITE")


def fio_run(system: System, file: str, w: Workload, size: int, runtime: float) -> dict[str, Any]:
    """One fio job; returns the figure (MB/s or IOPS), the daemon's CPU seconds and wall,
    and for a fusemux daemon the requests it saw during the job (:data:`COUNTED`, and any
    other counter that moved)."""
    argv = [
        "fio", "--output-format=json", f"--name={w.rw}", f"--filename={system.path(file)}",
        f"--rw={w.rw}", f"--bs={w.bs}", f"--size={size}", f"--direct={int(w.direct)}",
        f"--ioengine={w.engine}", f"--iodepth={w.iodepth}", "--time_based",
        f"--runtime={int(runtime * 1000)}ms", "--invalidate=0", "--randrepeat=0", "--norandommap",
        "--end_fsync=0", "--numjobs=1",
    ]  # fmt: skip
    load1 = float(Path("/proc/loadavg").read_text().split()[0])
    stats = system.stats_root
    before = engine_requests(stats) if stats else {}
    cpu0 = cpu_seconds(system.pid) if system.pid else 0.0
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 120)
    wall = time.monotonic() - t0
    cpu = (cpu_seconds(system.pid) - cpu0) if system.pid else None
    out: dict[str, Any] = {
        "value": None, "cpu_s": cpu, "wall_s": wall, "error": None, "load1": load1,
    }  # fmt: skip
    if stats:
        delta = requests_delta(system, before, engine_requests(stats))
        out["requests"] = {k: delta.pop(k, 0) for k in COUNTED}
        out["requests_other"] = delta
    if proc.returncode != 0:
        out["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]
        out["error"] = out["error"][0][:200]
        return out
    job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0]
    side = job["read" if "read" in w.rw else "write"]
    if side.get("io_bytes", 0) == 0 or job.get("error"):
        out["error"] = f"fio error {job.get('error')}"
        return out
    out["value"] = side["bw_bytes"] / 1e6 if w.unit == "MB/s" else side["iops"]
    return out


def _percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def open_close_latency(
    systems: dict[str, System], file: str, iterations: int, rounds: int = 5
) -> dict[str, dict[str, float]]:
    """Warm open(O_RDONLY)+close latency in µs per system, *iterations* in all, interleaved."""
    samples: dict[str, list[float]] = {name: [] for name in systems}
    per_round = max(1, iterations // rounds)
    for system in systems.values():  # warm up: mount, dentry and attribute caches
        for _ in range(100):
            os.close(os.open(system.path(file), os.O_RDONLY))
    for _ in range(rounds):
        for name, system in systems.items():
            path = str(system.path(file))
            out = samples[name]
            clock = time.perf_counter_ns
            for _ in range(per_round):
                t0 = clock()
                os.close(os.open(path, os.O_RDONLY))
                out.append((clock() - t0) / 1000)
    return {
        name: {
            "n": len(v),
            "median_us": statistics.median(v),
            "p99_us": _percentile(v, 99),
        }
        for name, v in samples.items()
    }


def first_open(base: Path, repetitions: int, names: Sequence[str] = ("fusemux",)) -> dict[str, Any]:
    """First open of an unmounted ext4 (-o loop) export vs plain mount + open, in ms.

    One daemon per fusemux system in *names* (B ``fusemux``, E ``fusemux-pt``: the engine from
    :data:`tests.bench.systems.ENGINES`), each with its own copy of the image; per repetition
    each daemon in turn, then the plain mount. Each fusemux sample waits until the export is
    unmounted and the kernel's entry cache for the volume has expired (1 s), so it pays
    LOOKUP + mount + OPEN like a real first open. Keys per system: ``<name>_ms``,
    ``<name>_median_ms``, ``<name>_mounts``.
    """
    content = base / "content"
    content.mkdir(parents=True)
    (content / "vol").write_bytes(b"\0" * MiB)
    image = base / "first.img"
    run("mkfs.ext4", "-q", "-F", "-d", content, image, "32M")
    plain_dir = base / "plain"
    plain_dir.mkdir()
    samples: dict[str, list[float]] = {name: [] for name in names}
    plain_ms: list[float] = []
    result: dict[str, Any] = {"repetitions": repetitions}
    with contextlib.ExitStack() as undo:
        undo.callback(detach, plain_dir)
        daemons: dict[str, Daemon] = {}
        for name in names:
            copy = base / f"first-{name}.img"
            shutil.copyfile(image, copy)
            daemon = daemons[name] = Daemon(base / name)
            undo.callback(stop_daemon, daemon)
            daemon.exports["first"] = {"source": str(copy), "fstype": "ext4", "options": "loop"}
            daemon.write_config(linger=0.0, engine=ENGINES[name])
            daemon.start(verbose=False)
            check_engine(daemon, name)
        for _ in range(repetitions):
            for name, daemon in daemons.items():
                volume = daemon.volume("first", "vol")
                daemon.wait_unmounted("first")
                time.sleep(1.1)
                t0 = time.perf_counter()
                fd = os.open(volume, os.O_RDONLY)
                samples[name].append((time.perf_counter() - t0) * 1000)
                os.close(fd)
                daemon.wait_unmounted("first")
            t0 = time.perf_counter()
            subprocess.run(
                ["mount", "-t", "ext4", "-o", "loop", str(image), str(plain_dir)], check=True
            )
            fd = os.open(plain_dir / "vol", os.O_RDONLY)
            plain_ms.append((time.perf_counter() - t0) * 1000)
            os.close(fd)
            detach(plain_dir)
        for name, daemon in daemons.items():
            result[f"{name}_ms"] = samples[name]
            result[f"{name}_median_ms"] = statistics.median(samples[name])
            result[f"{name}_mounts"] = int(daemon.xattr(daemon.volumes("first"), "mount_count"))
    result["plain_ms"] = plain_ms
    result["plain_median_ms"] = statistics.median(plain_ms)
    return result


def offload_cost(path: Path, calls: int, rounds: int = 3) -> dict[str, float]:
    """µs per 4 KiB ``pread`` of *path*, one call at a time, from a trio task: inline, through
    ``trio.to_thread.run_sync`` with a limiter (the old data path) and through fusemux's
    per-export pool (:class:`fusemux.core.workers.ExportWorkers`). Medians over *rounds*,
    alternating.
    """
    import trio

    from fusemux.core.workers import ExportWorkers

    fd = os.open(path, os.O_RDONLY)
    samples: dict[str, list[float]] = {"inline": [], "trio.to_thread": [], "export pool": []}

    async def measure() -> None:
        limiter = trio.CapacityLimiter(8)
        pool = ExportWorkers("bench", limiter, 8)
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(calls):
                os.pread(fd, 4096, 0)
                await trio.lowlevel.checkpoint()
            samples["inline"].append((time.perf_counter() - t0) / calls * 1e6)
            t0 = time.perf_counter()
            for _ in range(calls):
                await trio.to_thread.run_sync(os.pread, fd, 4096, 0, limiter=limiter)
            samples["trio.to_thread"].append((time.perf_counter() - t0) / calls * 1e6)
            t0 = time.perf_counter()
            for _ in range(calls):
                await pool.run(os.pread, fd, 4096, 0)
            samples["export pool"].append((time.perf_counter() - t0) / calls * 1e6)

    try:
        trio.run(measure)
    finally:
        os.close(fd)
    return {name: statistics.median(v) for name, v in samples.items()}


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def storm_ls_rss(
    base: Path, exports: int, per_export: int, listing: int, name: str = "fusemux"
) -> dict[str, Any]:
    """Mount storm, RSS with every storm volume open, and ``ls -l`` of *listing* volumes,
    on the engine of fusemux system *name* (:data:`tests.bench.systems.ENGINES`).

    *exports* bind exports with *per_export* volumes each are opened all at once, one thread
    per volume released together by a barrier; every volume stays open until all are, so
    each export must be mounted exactly once. Mounts are counted by the exports'
    ``user.fusemux.mount_count``.
    """
    daemon = Daemon(base / "daemon")
    for i in range(exports):
        daemon.add_bind_export(f"e{i:03d}", {f"v{j:02d}": b"" for j in range(per_export)})
    many = daemon.add_bind_export("many")
    for j in range(listing):
        (many / f"vol{j:05d}").write_bytes(b"")
    daemon.write_config(linger=10.0, mount_timeout=60.0, engine=ENGINES[name])
    names = [f"e{i:03d}" for i in range(exports)]
    result: dict[str, Any] = {"exports": exports, "opens": exports * per_export}
    try:
        daemon.start(verbose=False)
        check_engine(daemon, name)
        assert daemon.proc is not None
        pid = daemon.proc.pid
        result["rss_idle_mib"] = rss_bytes(pid) / MiB
        before = sum(int(daemon.xattr(daemon.volumes(n), "mount_count")) for n in names)
        paths = [daemon.volume(n, f"v{j:02d}") for n in names for j in range(per_export)]
        fds: list[int] = []
        errors: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(len(paths) + 1)
        done = threading.Barrier(len(paths) + 1)

        def opener(path: Path) -> None:
            start.wait()
            try:
                fd = os.open(path, os.O_RDONLY)
                with lock:
                    fds.append(fd)
            except OSError as e:
                with lock:
                    errors.append(f"{path}: {e}")
            done.wait()

        threads = [threading.Thread(target=opener, args=(p,)) for p in paths]
        for t in threads:
            t.start()
        try:
            start.wait()
            t0 = time.perf_counter()
            done.wait()
            result["storm_s"] = time.perf_counter() - t0
            for t in threads:
                t.join()
            result["open_errors"] = errors[:5]
            result["open_ok"] = len(fds)
            result["mounts"] = (
                sum(int(daemon.xattr(daemon.volumes(n), "mount_count")) for n in names) - before
            )
            result["rss_open_mib"] = rss_bytes(pid) / MiB
            result["open_during_rss"] = len(fds)
        finally:
            for fd in fds:
                os.close(fd)

        # ls -l of one export with *listing* volumes: cold (export not mounted, nothing in
        # the kernel's caches), then warm; native for comparison.
        daemon.wait_unmounted("many", timeout=30)
        target = daemon.volumes("many")

        def ls(path: Path) -> Callable[[], object]:
            def go() -> None:
                out = subprocess.run(["ls", "-l", str(path)], capture_output=True, check=True)
                assert out.stdout.count(b"\n") == listing + 1

            return go

        result["listing"] = listing
        result["ls_cold_s"] = _timed(ls(target))
        result["ls_warm_s"] = min(_timed(ls(target)) for _ in range(3))
        result["ls_native_s"] = min(_timed(ls(many)) for _ in range(3))
    finally:
        try:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop(timeout=120)
        finally:
            daemon.cleanup()
    return result
