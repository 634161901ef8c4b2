"""The concurrency storm engine, shared by ``tests/bench/storm.py`` and the CI test.

This module owns everything the storm does against a running fusemux daemon (a
:class:`tests.mount.harness.Daemon`): building the exports (ext4 images and bind mounts
alternately, linger 0), the worker, canary and sampler processes, the end-of-storm checks
and the figures. The CLI and the CI test only choose the parameters and report.

Processes (all real OS processes, forked through :mod:`multiprocessing`; each writes its
result as JSON to a file, so no pipes or queue threads are involved):

* **workers** open random volumes (buffered or ``O_DIRECT``, read-write or read-only),
  read, write, fsync and close them, with stats, listings and xattr peeks in between. Time
  runs in synchronised phases (busy, sparse, waves where every worker hits the same export at
  the same instant) so exports keep going idle and being mounted again. Block *b* of every
  volume belongs to worker ``b % workers``: only its owner writes it, so the owner knows the
  exact content each of its blocks must have.
* the **canary** holds one volume open with ``O_DIRECT`` (every read reaches the daemon and
  the backing file) and reads and verifies it continuously.
* the **sampler** polls ``/proc/self/mountinfo`` (one ``read()`` per snapshot) every few
  milliseconds and the export xattrs every few dozen.

Invariants and how they are checked without false positives (xattrs and mountinfo are read
at different instants, so only implications that hold whatever happens in between are used):

* *no error*: every worker and canary syscall must succeed (``ENODATA`` of
  ``capacity``/``free`` on an unmounted export is the documented answer, not an error);
  every read is checked: own blocks exactly, other workers' blocks by their header (magic,
  export, volume, block index are the same in every version, so even a read racing a write
  must show them), the canary's blocks exactly;
* *never mounted twice*: in each mountinfo snapshot every ``<state_dir>/mnt/<export>`` has
  at most one entry, nothing is mounted below those targets, and the FUSE mount is there once;
* *never unmounted under an open handle*: a worker holding an fd (``open()`` returned,
  ``close()`` not yet called) must find its export's target in mountinfo right after the open
  and right before the close, and (on a sample of sessions) the export's ``mount_count`` must
  not change between those two instants, ``state`` must be ``mounted``, ``holders`` >= 1,
  the volume must be in ``open_volumes`` and its ``open_count`` >= 1. The canary's export
  must appear in every sampler snapshot and its ``mount_count`` must be the same when the
  canary closes as when it opened. The sampler reads ``mount_count`` (c1), ``open_volumes``
  (o1), ``state`` (s1), mountinfo, ``state`` (s2), ``open_volumes`` (o2), ``mount_count``
  (c2): if c1 == c2, no mount happened in between, so s1 == s2 == mounted means the export
  stayed mounted and must be in that mountinfo; a volume in both o1 and o2 means the export
  was mounted throughout, so s1 and s2 must be ``mounted`` too;
* *blocks verify*: after the storm every block of every volume is read back through fusemux
  (buffered and ``O_DIRECT``, from a fresh open) and, after the daemon stopped, straight from
  the backing store (the bind source directory; ``debugfs`` for ext4 images, no mount) and
  must be exactly the last content its owner wrote (checksummed block format below);
* *clean end*: every export is unmounted and ``state`` = unmounted, ``holders`` = 0, the
  daemon exits 0, no mount is left, and its log has no unexpected WARNING/ERROR lines.

A process that hangs past its deadline is killed (by PID) and reported.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import multiprocessing as mp
import os
import random
import struct
import subprocess
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fusemux.core.mounter import MountEntry, read_mountinfo
from tests.mount.harness import Daemon

BLOCK = 4096
MAGIC = b"FMXSTORM"
# magic, export index, volume index, block index, writer (-1: initial content), generation
HEADER = struct.Struct("<8sHHIiQ")
SUM = 16
CANARY_VOLUME = "canary"
XATTR = "user.fusemux."
MAX_SAMPLES = 20  # error/violation messages kept per process (all are counted)
_mp = mp.get_context("fork")


# -- block format ----------------------------------------------------------------------------


def block_bytes(e: int, v: int, b: int, writer: int, gen: int) -> bytes:
    """The exact content of block *b* of volume *v* of export *e*, written by *writer*.

    4 KiB: the header (magic, export, volume, block, writer, generation), a SHAKE-128 stream
    of the header, and a BLAKE2b-128 checksum of everything before it. A writer's
    generations are unique, so the content says who wrote which write.
    """
    head = HEADER.pack(MAGIC, e, v, b, writer, gen)
    body = hashlib.shake_128(head).digest(BLOCK - HEADER.size - SUM)
    data = head + body
    return data + hashlib.blake2b(data, digest_size=SUM).digest()


def describe_block(data: bytes) -> str:
    """What a block that failed verification holds, for messages."""
    if len(data) < HEADER.size:
        return f"{len(data)} bytes"
    magic, e, v, b, w, g = HEADER.unpack_from(data)
    ok = len(data) == BLOCK and (
        hashlib.blake2b(data[: BLOCK - SUM], digest_size=SUM).digest() == data[BLOCK - SUM :]
    )
    return f"magic={magic!r} export={e} volume={v} block={b} writer={w} gen={g} sum_ok={ok}"


def header_problem(data: bytes, e: int, v: int, b: int) -> str | None:
    """Check what every version of a block shares (a read racing a write still shows it)."""
    if len(data) != BLOCK:
        return f"short read: {len(data)} bytes"
    magic, de, dv, db, _w, _g = HEADER.unpack_from(data)
    if (magic, de, dv, db) != (MAGIC, e, v, b):
        return "wrong header: " + describe_block(data)
    return None


def initial_volume(e: int, v: int, blocks: int) -> bytes:
    return b"".join(block_bytes(e, v, b, -1, 0) for b in range(blocks))


# -- configuration and layout ----------------------------------------------------------------


@dataclass
class StormConfig:
    duration: float = 60.0
    workers: int = 16
    exports: int = 4
    volumes_per_export: int = 4
    blocks: int = 64  # per volume; raised to 2 x workers so every worker owns blocks
    seed: int = 0
    mountinfo_interval: float = 0.002  # sampler sleep between mountinfo snapshots
    xattr_every: int = 25  # sampler reads the export xattrs every N snapshots
    session_check_prob: float = 0.5  # share of worker sessions that check xattrs

    def __post_init__(self) -> None:
        self.blocks = max(self.blocks, 2 * self.workers)


@dataclass
class Layout:
    mountpoint: str
    state_dir: str
    exports: list[str]
    kinds: list[str]  # "ext4" or "bind"
    backing: list[str]  # the image (ext4) or the source directory (bind)
    volumes: list[str]  # the same names in every export
    blocks: int
    workers: int
    canary_export: int = 0

    def export_dir(self, e: int) -> str:
        return os.path.join(self.mountpoint, "volumes", self.exports[e])

    def volume_path(self, e: int, v: int) -> str:
        return os.path.join(self.export_dir(e), self.volumes[v])

    def canary_path(self) -> str:
        return os.path.join(self.export_dir(self.canary_export), CANARY_VOLUME)

    def target(self, e: int) -> str:
        return os.path.join(self.state_dir, "mnt", self.exports[e])

    def owner(self, b: int) -> int:
        return b % self.workers


def build_exports(daemon: Daemon, cfg: StormConfig) -> Layout:
    """Add the storm's exports to *daemon* (ext4 and bind alternately) and write its config."""
    volumes = [f"vol{v:02d}" for v in range(cfg.volumes_per_export)]
    names, kinds, backing = [], [], []
    for e in range(cfg.exports):
        kind = "ext4" if e % 2 == 0 else "bind"
        name = f"s{e}{kind}"
        files = {vol: initial_volume(e, v, cfg.blocks) for v, vol in enumerate(volumes)}
        if e == 0:
            files[CANARY_VOLUME] = canary_content(cfg.blocks)
        if kind == "ext4":
            path = daemon.add_ext4_export(name, files)
        else:
            path = daemon.add_bind_export(name, files)
        names.append(name)
        kinds.append(kind)
        backing.append(str(path))
    daemon.write_config(linger=0)
    return Layout(
        mountpoint=os.path.abspath(daemon.mnt),
        state_dir=os.path.abspath(daemon.state),
        exports=names,
        kinds=kinds,
        backing=backing,
        volumes=volumes,
        blocks=cfg.blocks,
        workers=cfg.workers,
    )


def canary_content(blocks: int) -> bytes:
    return b"".join(block_bytes(0xFFFF, 0xFFFF, b, -1, 0) for b in range(blocks))


# -- small helpers used by the processes -----------------------------------------------------


def count_targets(entries: list[MountEntry], targets: list[str]) -> list[int]:
    return [sum(1 for m in entries if m.mountpoint == t) for t in targets]


def is_target_mounted(target: str) -> bool:
    return any(m.mountpoint == target for m in read_mountinfo())


def xattr(path: str, key: str) -> str:
    return os.getxattr(path, XATTR + key).decode()


class Recorder:
    """Counts and keeps the first few samples of errors and violations of one process."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.ops: Counter[str] = Counter()
        self.errors = 0
        self.error_samples: list[str] = []
        self.violations = 0
        self.violation_samples: list[str] = []

    def error(self, what: str, exc: BaseException | str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_SAMPLES:
            text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
            self.error_samples.append(f"{self.who} {time.strftime('%H:%M:%S')} {what}: {text}")

    def violation(self, text: str) -> None:
        self.violations += 1
        if len(self.violation_samples) < MAX_SAMPLES:
            self.violation_samples.append(f"{self.who} {time.strftime('%H:%M:%S')} {text}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "ops": dict(self.ops),
            "errors": self.errors,
            "error_samples": self.error_samples,
            "violations": self.violations,
            "violation_samples": self.violation_samples,
        }


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _run_child(fn: Callable[..., dict[str, Any]], result: Path, args: tuple[Any, ...]) -> None:
    """Body of every child process: run *fn*, store its result (or its crash) as JSON."""
    try:
        data = fn(*args)
    except BaseException as e:  # the parent must learn of any crash
        data = {"crashed": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    try:
        write_json(result, data)
    finally:
        os._exit(0)


class Children:
    """Child processes, each with a result file; ended by PID in :meth:`kill_all`."""

    def __init__(self, results: Path) -> None:
        self.results = results
        self.procs: dict[str, mp.process.BaseProcess] = {}

    def start(self, name: str, fn: Callable[..., dict[str, Any]], *args: Any) -> None:
        proc = _mp.Process(
            target=_run_child, args=(fn, self.results / f"{name}.json", args), name=name
        )
        proc.start()
        self.procs[name] = proc

    def join(self, name: str, timeout: float) -> dict[str, Any]:
        """Wait for *name*; its result, or ``{"hung": ...}`` after killing it at *timeout*."""
        proc = self.procs[name]
        proc.join(max(timeout, 0.0))
        if proc.is_alive():
            pid = proc.pid
            proc.kill()  # SIGKILL to this PID only
            proc.join(10)
            return {"hung": f"{name} (pid {pid}) still running after its deadline; killed"}
        path = self.results / f"{name}.json"
        if not path.exists():
            return {"crashed": f"{name} exited {proc.exitcode} without a result"}
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def dead_early(self) -> list[str]:
        return [n for n, p in self.procs.items() if not p.is_alive() and p.exitcode != 0]

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
        for proc in self.procs.values():
            proc.join(10)


def call_in_child(results: Path, name: str, timeout: float, fn: Callable[..., Any], *a: Any) -> Any:
    """Run *fn* in a child process (so a hung FUSE request cannot hang the caller)."""
    kids = Children(results)
    try:
        kids.start(name, lambda *x: {"value": fn(*x)}, *a)
        data = kids.join(name, timeout)
    finally:
        kids.kill_all()
    if "value" not in data:
        raise RuntimeError(data.get("hung") or data.get("crashed") or repr(data))
    return data["value"]


class Aligned:
    """A page-aligned buffer for O_DIRECT reads and writes."""

    def __init__(self) -> None:
        self.buf = mmap.mmap(-1, BLOCK)

    def read(self, fd: int, off: int) -> bytes:
        n = os.preadv(fd, [self.buf], off)
        return bytes(self.buf[:n])

    def write(self, fd: int, off: int, data: bytes) -> int:
        self.buf[:] = data
        return os.pwritev(fd, [self.buf], off)


# -- the worker ------------------------------------------------------------------------------

PHASE_SECONDS = 2.0
WAVE_TICK = 0.25


def _phase(now: float) -> str:
    return ("busy", "sparse", "waves")[int(now / PHASE_SECONDS) % 3]


def worker_main(
    idx: int, layout: Layout, cfg: StormConfig, deadline: float, abort: Any
) -> dict[str, Any]:
    """One storm worker: sessions on random volumes until *deadline*."""
    rng = random.Random(cfg.seed * 1000 + idx)
    rec = Recorder(f"worker{idx}")
    own_blocks = [b for b in range(layout.blocks) if layout.owner(b) == idx]
    # (e, v, b) -> generations the block may hold (0: the initial content). One element
    # normally; two if a write failed and its outcome is unknown.
    expect: dict[tuple[int, int, int], list[int]] = {}
    gen = 0
    aligned = Aligned()
    nexp = len(layout.exports)
    weights = [2.0 ** -(e % 4) for e in range(nexp)]  # some exports used far less: they idle
    sessions: Counter[str] = Counter()

    def expected_bytes(e: int, v: int, b: int) -> list[bytes]:
        gens = expect.get((e, v, b), [0])
        return [block_bytes(e, v, b, idx if g else -1, g) for g in gens]

    def side_op() -> None:
        e = rng.choices(range(nexp), weights)[0]
        kind = rng.randrange(4)
        try:
            if kind == 0:
                st = os.stat(layout.volume_path(e, rng.randrange(len(layout.volumes))))
                rec.ops["stat"] += 1
                if st.st_size != layout.blocks * BLOCK:
                    rec.violation(f"stat of a volume of {layout.exports[e]}: size {st.st_size}")
            elif kind == 1:
                names = set(os.listdir(layout.export_dir(e)))
                rec.ops["listdir"] += 1
                if not set(layout.volumes) <= names:
                    rec.violation(f"listdir {layout.exports[e]} lacks volumes: {sorted(names)}")
            elif kind == 2:
                rec.ops["xattr"] += 1
                try:
                    int(xattr(layout.export_dir(e), rng.choice(("capacity", "free"))))
                except OSError as err:
                    if err.errno != errno.ENODATA:  # ENODATA: not mounted right now
                        raise
            else:
                os.statvfs(layout.mountpoint)
                rec.ops["statvfs"] += 1
        except OSError as err:
            rec.error(f"side op {kind} on {layout.exports[e]}", err)

    def session(e: int, hold: float) -> None:
        v = rng.randrange(len(layout.volumes))
        path = layout.volume_path(e, v)
        direct = rng.random() < 0.3
        writable = rng.random() < 0.8
        flags = (os.O_RDWR if writable else os.O_RDONLY) | (os.O_DIRECT if direct else 0)
        ename = layout.exports[e]
        target = layout.target(e)
        try:
            fd = os.open(path, flags)
        except OSError as err:
            rec.error(f"open {ename}/{layout.volumes[v]}", err)
            return
        rec.ops["open"] += 1
        sessions[ename] += 1
        try:
            # While this fd is open the export must be mounted, whatever else happens.
            if not is_target_mounted(target):
                rec.violation(f"{ename} not in mountinfo right after an open of {path}")
            checks = rng.random() < cfg.session_check_prob
            count0 = ""
            if checks:
                count0 = xattr(layout.export_dir(e), "mount_count")
                state = xattr(layout.export_dir(e), "state")
                holders = int(xattr(layout.export_dir(e), "holders"))
                open_vols = xattr(layout.export_dir(e), "open_volumes").split(",")
                open_count = int(xattr(path, "open_count"))
                rec.ops["xattr"] += 5
                if state != "mounted" or holders < 1 or open_count < 1:
                    rec.violation(
                        f"{ename}/{layout.volumes[v]} held open but state={state} "
                        f"holders={holders} open_count={open_count}"
                    )
                if layout.volumes[v] not in open_vols:
                    rec.violation(f"{ename}: {layout.volumes[v]} held open, not in {open_vols}")
            for _ in range(rng.randint(1, 6)):
                op = rng.random()
                if op < 0.35 and writable:
                    write_own(fd, e, v, direct)
                elif op < 0.65:
                    read_own(fd, e, v, direct)
                elif op < 0.85:
                    read_foreign(fd, e, v, direct)
                elif writable:
                    try:
                        (os.fsync if rng.random() < 0.5 else os.fdatasync)(fd)
                        rec.ops["fsync"] += 1
                    except OSError as err:
                        rec.error(f"fsync {ename}/{layout.volumes[v]}", err)
                else:
                    read_foreign(fd, e, v, direct)
                if hold:
                    time.sleep(rng.uniform(0, hold))
            if not is_target_mounted(target):
                rec.violation(f"{ename} not in mountinfo before the close of {path}")
            if checks:
                count1 = xattr(layout.export_dir(e), "mount_count")
                rec.ops["xattr"] += 1
                if count1 != count0:
                    rec.violation(
                        f"{ename} mounted again ({count0} -> {count1}) while {path} was open"
                    )
        except OSError as err:
            rec.error(f"xattr check on open {ename}/{layout.volumes[v]}", err)
        finally:
            try:
                os.close(fd)
                rec.ops["close"] += 1
            except OSError as err:
                rec.error(f"close {ename}/{layout.volumes[v]}", err)

    def write_own(fd: int, e: int, v: int, direct: bool) -> None:
        nonlocal gen
        b = rng.choice(own_blocks)
        gen += 1
        data = block_bytes(e, v, b, idx, gen)
        key = (e, v, b)
        try:
            n = aligned.write(fd, b * BLOCK, data) if direct else os.pwrite(fd, data, b * BLOCK)
        except OSError as err:
            expect[key] = expect.get(key, [0])[:1] + [gen]
            rec.error(f"write {layout.exports[e]}/{layout.volumes[v]} block {b}", err)
            return
        rec.ops["write"] += 1
        if n != BLOCK:
            expect[key] = expect.get(key, [0])[:1] + [gen]
            rec.error(f"write {layout.exports[e]}/{layout.volumes[v]} block {b}", f"short: {n}")
            return
        expect[key] = [gen]

    def read_block(fd: int, e: int, v: int, b: int, direct: bool) -> bytes | None:
        try:
            data = aligned.read(fd, b * BLOCK) if direct else os.pread(fd, BLOCK, b * BLOCK)
        except OSError as err:
            rec.error(f"read {layout.exports[e]}/{layout.volumes[v]} block {b}", err)
            return None
        rec.ops["read"] += 1
        return data

    def read_own(fd: int, e: int, v: int, direct: bool) -> None:
        b = rng.choice(own_blocks)
        data = read_block(fd, e, v, b, direct)
        if data is not None and data not in expected_bytes(e, v, b):
            rec.violation(
                f"{layout.exports[e]}/{layout.volumes[v]} block {b}: expected gens "
                f"{expect.get((e, v, b), [0])} of worker {idx}, read {describe_block(data)}"
            )

    def read_foreign(fd: int, e: int, v: int, direct: bool) -> None:
        b = rng.randrange(layout.blocks)
        data = read_block(fd, e, v, b, direct)
        if data is not None:
            problem = header_problem(data, e, v, b)
            if problem:
                rec.violation(f"{layout.exports[e]}/{layout.volumes[v]} block {b}: {problem}")

    while not abort.is_set():
        now = time.monotonic()
        if now >= deadline:
            break
        phase = _phase(now)
        if rng.random() < 0.06:
            side_op()
            continue
        if phase == "busy":
            session(rng.choices(range(nexp), weights)[0], 0.0)
        elif phase == "sparse":
            time.sleep(rng.expovariate(1 / 0.03))
            session(rng.choices(range(nexp), weights)[0], 0.005)
        else:
            # Waves: every worker opens a volume of the same export at the same instant,
            # after that export has had time to go idle (linger 0).
            tick = int(now / WAVE_TICK) + 1
            time.sleep(max(0.0, tick * WAVE_TICK - time.monotonic()))
            session(tick % nexp, 0.0)

    out = rec.as_dict()
    out["expect"] = {f"{e}/{v}/{b}": g for (e, v, b), g in expect.items()}
    out["sessions"] = dict(sessions)
    return out


# -- the canary ------------------------------------------------------------------------------


def canary_main(layout: Layout, ready: Any, stop: Any) -> dict[str, Any]:
    """Hold the canary volume open (O_DIRECT) and verify it until *stop*."""
    rec = Recorder("canary")
    expected = [block_bytes(0xFFFF, 0xFFFF, b, -1, 0) for b in range(layout.blocks)]
    aligned = Aligned()
    edir = layout.export_dir(layout.canary_export)
    fd = os.open(layout.canary_path(), os.O_RDONLY | os.O_DIRECT)
    count_open = xattr(edir, "mount_count")
    ready.set()
    reads = 0
    try:
        while not stop.is_set():
            b = reads % layout.blocks
            reads += 1
            try:
                data = aligned.read(fd, b * BLOCK)
            except OSError as err:
                rec.error(f"read block {b}", err)
                time.sleep(0.01)
                continue
            rec.ops["read"] += 1
            if data != expected[b]:
                rec.error(f"block {b}", "wrong content: " + describe_block(data))
            # Continuous, but at a few hundred reads/s: the daemon is mostly the workers'.
            time.sleep(0.002)
        count_close = xattr(edir, "mount_count")
        if count_close != count_open:
            rec.violation(
                f"canary export mounted again while the canary held it: mount_count "
                f"{count_open} at open, {count_close} before close"
            )
    finally:
        os.close(fd)
    out = rec.as_dict()
    out["mount_count_at_open"] = count_open
    return out


# -- the sampler -----------------------------------------------------------------------------


def sampler_main(
    layout: Layout, cfg: StormConfig, ready: Any, stop: Any, status: Path
) -> dict[str, Any]:
    """Poll mountinfo (one read each) and the export xattrs until *stop*."""
    rec = Recorder("sampler")
    targets = [layout.target(e) for e in range(len(layout.exports))]
    prefix = os.path.join(layout.state_dir, "mnt") + "/"
    nexp = len(targets)
    peak = [0] * nexp
    appeared = [0] * nexp  # unmounted -> mounted transitions seen
    was = [False] * nexp
    states: list[Counter[str]] = [Counter() for _ in range(nexp)]
    snapshots = 0
    xsamples = 0
    last_status = 0.0
    canary = layout.canary_export
    valid_states = {"unmounted", "mounting", "mounted", "unmounting", "failed"}

    def snapshot() -> list[MountEntry]:
        nonlocal snapshots
        entries = read_mountinfo()
        snapshots += 1
        counts = count_targets(entries, targets)
        for e, n in enumerate(counts):
            peak[e] = max(peak[e], n)
            if n > 1:
                rec.violation(f"{layout.exports[e]} mounted {n} times at once")
            if n and not was[e]:
                appeared[e] += 1
            was[e] = bool(n)
        if counts[canary] != 1:
            rec.violation(f"canary export {layout.exports[canary]} has {counts[canary]} mounts")
        extra = [m.mountpoint for m in entries if m.mountpoint.startswith(prefix)]
        extra = [p for p in extra if p not in targets]
        if extra:
            rec.violation(f"unexpected mounts under the state dir: {extra}")
        fuse = [m for m in entries if m.mountpoint == layout.mountpoint]
        if len(fuse) != 1:
            rec.violation(f"FUSE mountpoint has {len(fuse)} mounts")
        return entries

    def xattr_sample() -> None:
        nonlocal xsamples
        xsamples += 1
        for e in range(nexp):
            d = layout.export_dir(e)
            c1 = xattr(d, "mount_count")
            o1 = set(filter(None, xattr(d, "open_volumes").split(",")))
            s1 = xattr(d, "state")
            mounted = count_targets(snapshot(), [targets[e]])[0]
            s2 = xattr(d, "state")
            o2 = set(filter(None, xattr(d, "open_volumes").split(",")))
            c2 = xattr(d, "mount_count")
            holders = int(xattr(d, "holders"))
            last_error = xattr(d, "last_error")
            rec.ops["xattr"] += 8
            states[e][s1] += 1
            name = layout.exports[e]
            if s1 not in valid_states or s2 not in valid_states:
                rec.violation(f"{name}: unknown state {s1!r}/{s2!r}")
            if holders < 0:
                rec.violation(f"{name}: holders {holders}")
            if last_error:
                rec.violation(f"{name}: last_error {last_error!r}")
            canary_ok = s1 == s2 == "mounted" and holders >= 1 and CANARY_VOLUME in o1
            if e == canary and not canary_ok:
                rec.violation(
                    f"canary export while held: state {s1}/{s2}, holders {holders}, "
                    f"open_volumes {sorted(o1)}"
                )
            if c1 == c2:  # no mount in between: the implications below hold
                if s1 == s2 == "mounted" and mounted != 1:
                    rec.violation(f"{name}: state mounted throughout, but {mounted} mounts")
                both = o1 & o2
                if both and not s1 == s2 == "mounted":
                    rec.violation(
                        f"{name}: {sorted(both)} open throughout (mount_count {c1}), "
                        f"but state {s1}/{s2}"
                    )

    ready_sent = False
    while not stop.is_set():
        try:
            snapshot()
            if snapshots % cfg.xattr_every == 0:
                xattr_sample()
        except OSError as err:
            rec.error("sampling", err)
            time.sleep(0.05)
        if not ready_sent:
            ready.set()
            ready_sent = True
        now = time.monotonic()
        if now - last_status >= 1.0:
            last_status = now
            write_json(
                status,
                {"peak": peak, "appeared": appeared, "violations": rec.violations},
            )
        time.sleep(cfg.mountinfo_interval)
    out = rec.as_dict()
    out.update(
        snapshots=snapshots,
        xattr_samples=xsamples,
        peak=peak,
        appeared=appeared,
        states=[dict(c) for c in states],
    )
    return out


# -- end-of-storm checks ---------------------------------------------------------------------


def expected_blocks(layout: Layout, workers: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Merge the workers' logs: "e/v/b" -> generations that block may hold."""
    merged: dict[str, list[int]] = {}
    for w in workers:
        merged.update(w.get("expect", {}))
    return merged


def verify_volume(
    layout: Layout, expect: dict[str, list[int]], e: int, v: int, data: bytes, how: str
) -> list[str]:
    """Every block of one volume's *data* against the owners' logs; the problems found."""
    problems = []
    if len(data) != layout.blocks * BLOCK:
        problems.append(f"{how} {layout.exports[e]}/{layout.volumes[v]}: size {len(data)}")
    for b in range(min(layout.blocks, len(data) // BLOCK)):
        got = data[b * BLOCK : (b + 1) * BLOCK]
        w = layout.owner(b)
        gens = expect.get(f"{e}/{v}/{b}", [0])
        if got not in [block_bytes(e, v, b, w if g else -1, g) for g in gens]:
            problems.append(
                f"{how} {layout.exports[e]}/{layout.volumes[v]} block {b}: expected gens "
                f"{gens} of worker {w}, found {describe_block(got)}"
            )
    return problems


def export_figures(layout: Layout) -> list[dict[str, Any]]:
    out = []
    for e, name in enumerate(layout.exports):
        d = layout.export_dir(e)
        out.append(
            {
                "name": name,
                "state": xattr(d, "state"),
                "holders": int(xattr(d, "holders")),
                "mount_count": int(xattr(d, "mount_count")),
                "last_error": xattr(d, "last_error"),
                "mounted": is_target_mounted(layout.target(e)),
            }
        )
    return out


def wait_idle(layout: Layout, timeout: float) -> tuple[bool, list[dict[str, Any]], float]:
    """Wait until every export is unmounted with no holder; (ok, figures, seconds waited)."""
    start = time.monotonic()
    while True:
        figs = export_figures(layout)
        if all(f["state"] == "unmounted" and f["holders"] == 0 and not f["mounted"] for f in figs):
            return True, figs, time.monotonic() - start
        if time.monotonic() - start > timeout:
            return False, figs, time.monotonic() - start
        time.sleep(0.05)


def end_checks(layout: Layout, expect: dict[str, list[int]]) -> dict[str, Any]:
    """After the storm (run in a child): idle state, then a fresh read-back through fusemux."""
    out: dict[str, Any] = {"problems": []}
    ok, figs, waited = wait_idle(layout, 30.0)
    out["after_storm"] = figs
    out["idle_after_s"] = round(waited, 3)
    if not ok:
        out["problems"].append(f"exports not idle 30 s after the storm: {figs}")
    checked = 0
    for e in range(len(layout.exports)):
        for v in range(len(layout.volumes)):
            path = layout.volume_path(e, v)
            with open(path, "rb", buffering=0) as f:
                data = f.read()
            out["problems"] += verify_volume(layout, expect, e, v, data, "fusemux buffered")
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                aligned = Aligned()
                data = b"".join(aligned.read(fd, b * BLOCK) for b in range(layout.blocks))
            finally:
                os.close(fd)
            out["problems"] += verify_volume(layout, expect, e, v, data, "fusemux O_DIRECT")
            checked += 2 * layout.blocks
    with open(layout.canary_path(), "rb") as f:
        if f.read() != canary_content(layout.blocks):
            out["problems"].append("canary volume content changed")
    out["blocks_verified"] = checked
    ok, figs, waited = wait_idle(layout, 30.0)
    out["final"] = figs
    if not ok:
        out["problems"].append(f"exports not idle 30 s after the read-back: {figs}")
    return out


def read_backing(layout: Layout, e: int, name: str) -> bytes:
    """A volume's bytes straight from the backing store (the daemon must be stopped)."""
    if layout.kinds[e] == "bind":
        return Path(layout.backing[e], name).read_bytes()
    result = subprocess.run(
        ["debugfs", "-R", f"cat /{name}", layout.backing[e]],
        capture_output=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def verify_backing(layout: Layout, expect: dict[str, list[int]]) -> tuple[int, list[str]]:
    problems: list[str] = []
    checked = 0
    for e in range(len(layout.exports)):
        for v, vol in enumerate(layout.volumes):
            problems += verify_volume(layout, expect, e, v, read_backing(layout, e, vol), "backing")
            checked += layout.blocks
    if read_backing(layout, layout.canary_export, CANARY_VOLUME) != canary_content(layout.blocks):
        problems.append("backing canary volume content changed")
    return checked, problems


# -- the storm -------------------------------------------------------------------------------


@dataclass
class StormResult:
    config: dict[str, Any]
    exports: list[dict[str, Any]] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    operations: int = 0
    errors: int = 0
    canary_reads: int = 0
    canary_errors: int = 0
    blocks_verified_fusemux: int = 0
    blocks_verified_backing: int = 0
    sampler_snapshots: int = 0
    sampler_xattr_samples: int = 0
    leaked_mounts: list[str] = field(default_factory=list)
    daemon_rc: int | None = None
    storm_seconds: float = 0.0
    violations: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)  # first error/violation messages

    @property
    def ok(self) -> bool:
        return not self.violations

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def run_storm(
    daemon: Daemon, cfg: StormConfig, say: Callable[[str], None] = lambda s: None
) -> StormResult:
    """Build the exports, start *daemon*, run the storm, stop the daemon, check everything.

    The caller owns *daemon*'s cleanup (``Daemon.cleanup()`` in its ``finally``); every
    process started here is killed by PID and joined before this returns or raises.
    """
    result = StormResult(config=asdict(cfg))
    v = result.violations
    layout = build_exports(daemon, cfg)
    daemon.start()
    work = daemon.base / "storm"
    work.mkdir(exist_ok=True)
    status = work / "sampler-status.json"
    kids = Children(work)
    stop = _mp.Event()  # ends the sampler; the canary holds on until canary_stop
    canary_stop = _mp.Event()
    abort = _mp.Event()
    try:
        canary_ready = _mp.Event()
        sampler_ready = _mp.Event()
        kids.start("canary", canary_main, layout, canary_ready, canary_stop)
        if not canary_ready.wait(30):
            raise RuntimeError(f"canary not ready: {kids.join('canary', 0)}")
        kids.start("sampler", sampler_main, layout, cfg, sampler_ready, stop, status)
        if not sampler_ready.wait(30):
            raise RuntimeError(f"sampler not ready: {kids.join('sampler', 0)}")
        start = time.monotonic()
        deadline = start + cfg.duration
        workers = [f"worker{i:02d}" for i in range(cfg.workers)]
        for i, name in enumerate(workers):
            kids.start(name, worker_main, i, layout, cfg, deadline, abort)
        say(
            f"storm: {cfg.workers} workers, {cfg.exports} exports x {cfg.volumes_per_export} "
            f"volumes ({', '.join(layout.exports)}), {cfg.duration:g} s"
        )
        next_report = start + 10
        while time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            dead = kids.dead_early()
            if dead:
                v.append(f"processes died during the storm: {dead}")
                abort.set()
                break
            if time.monotonic() >= next_report:
                next_report += 10
                with contextlib.suppress(OSError, ValueError):
                    st = json.loads(status.read_text())
                    say(
                        f"  t={time.monotonic() - start:5.0f}s mounts seen per export "
                        f"{st['appeared']} peak {st['peak']} violations {st['violations']}"
                    )
        worker_results = []
        for name in workers:
            worker_results.append(kids.join(name, deadline + 60 - time.monotonic()))
        result.storm_seconds = round(time.monotonic() - start, 1)
        # The sampler checks that the canary's export is mounted in every snapshot, so it
        # must stop before the canary closes (with linger 0 that close unmounts the export).
        stop.set()
        sampler = kids.join("sampler", 30)
        canary_stop.set()
        canary = kids.join("canary", 30)
    finally:
        abort.set()
        stop.set()
        canary_stop.set()
        kids.kill_all()

    # Figures and continuous-check results.
    ops: Counter[str] = Counter()
    for name, r in [*zip(workers, worker_results, strict=True), ("canary", canary)]:
        for problem in ("hung", "crashed"):
            if problem in r:
                v.append(f"{name}: {r[problem]}")
        ops.update(r.get("ops", {}))
    sessions: Counter[str] = Counter()
    worker_samples: list[str] = []
    for r in worker_results:
        sessions.update(r.get("sessions", {}))
        result.errors += r.get("errors", 0)
        worker_samples += r.get("error_samples", [])[:3] + r.get("violation_samples", [])[:3]
        if r.get("violations"):
            v.append(f"worker violations: {r['violations']} ({r['violation_samples'][:1]})")
    if result.errors:
        v.append(f"workers saw {result.errors} errors")
    result.ops = dict(ops)
    result.operations = sum(ops.values())
    result.canary_reads = canary.get("ops", {}).get("read", 0)
    result.canary_errors = canary.get("errors", 0)
    result.samples += canary.get("error_samples", [])[:5] + canary.get("violation_samples", [])
    if result.canary_errors or canary.get("violations"):
        v.append(f"canary: {result.canary_errors} errors, {canary.get('violations')} violations")
    if result.canary_reads == 0:
        v.append("the canary read nothing")
    for problem in ("hung", "crashed"):
        if problem in sampler:
            v.append(f"sampler: {sampler[problem]}")
    result.sampler_snapshots = sampler.get("snapshots", 0)
    result.sampler_xattr_samples = sampler.get("xattr_samples", 0)
    result.samples += sampler.get("error_samples", [])[:5] + sampler.get("violation_samples", [])
    result.samples += worker_samples  # after the canary's and the sampler's: most telling first
    if sampler.get("violations") or sampler.get("errors"):
        v.append(f"sampler: {sampler.get('violations')} violations, {sampler.get('errors')} errors")

    # End of storm: idle, read back through fusemux (in a child: a hung daemon cannot hang us).
    expect = expected_blocks(layout, worker_results)
    say("storm over; waiting for idle exports, reading every block back through fusemux")
    end: dict[str, Any] = {}
    try:
        end = call_in_child(work, "end-checks", 300, end_checks, layout, expect)
    except RuntimeError as err:
        v.append(f"end checks failed: {err}")
    v += end.get("problems", [])
    result.blocks_verified_fusemux = end.get("blocks_verified", 0)
    after = {f["name"]: f for f in end.get("after_storm", [])}
    final = {f["name"]: f for f in end.get("final", [])}
    for e, name in enumerate(layout.exports):
        result.exports.append(
            {
                "name": name,
                "kind": layout.kinds[e],
                "sessions": sessions.get(name, 0),
                "mount_count_storm": after.get(name, {}).get("mount_count"),
                "mount_count_final": final.get(name, {}).get("mount_count"),
                "peak_mounts": sampler.get("peak", [None] * len(layout.exports))[e],
                "mounts_seen_by_sampler": sampler.get("appeared", [None] * len(layout.exports))[e],
                "states_sampled": sampler.get("states", [{}] * len(layout.exports))[e],
                "holders_final": final.get(name, {}).get("holders"),
            }
        )

    # Stop the daemon, then check the backing store directly.
    result.daemon_rc = daemon.stop()
    if result.daemon_rc != 0:
        v.append(f"daemon exited {result.daemon_rc}")
    result.leaked_mounts = daemon.leftover_mounts()
    if result.leaked_mounts:
        v.append(f"leaked mounts: {result.leaked_mounts}")
    bad_log = daemon.unexpected_log_lines()
    if bad_log:
        v.append(f"unexpected daemon log lines ({len(bad_log)}): {bad_log[:5]}")
    if not result.leaked_mounts:
        checked, problems = verify_backing(layout, expect)
        result.blocks_verified_backing = checked
        v += problems[:20]
        if len(problems) > 20:
            v.append(f"... {len(problems) - 20} more backing problems")
    return result


def format_result(r: StormResult) -> str:
    """The figures, as the tool prints them."""
    c = r.config
    lines = [
        f"fusemux storm: {r.storm_seconds} s, {c['workers']} workers, {c['exports']} exports x "
        f"{c['volumes_per_export']} volumes x {c['blocks']} blocks (+1 canary volume)",
        f"operations: {r.operations} ({r.operations / max(r.storm_seconds, 0.1):.0f}/s) "
        + ", ".join(f"{k} {n}" for k, n in sorted(r.ops.items())),
        f"errors: {r.errors} (workers), canary: {r.canary_reads} reads verified, "
        f"{r.canary_errors} errors",
        f"sampler: {r.sampler_snapshots} mountinfo snapshots, {r.sampler_xattr_samples} "
        "xattr rounds",
        "export       kind  sessions  mount_count  peak_mounts  mounts_seen  holders_end",
    ]
    for x in r.exports:
        lines.append(
            f"{x['name']:<12} {x['kind']:<5} {x['sessions']:>8}  {x['mount_count_storm']!s:>11}"
            f"  {x['peak_mounts']!s:>11}  {x['mounts_seen_by_sampler']!s:>11}"
            f"  {x['holders_final']!s:>11}"
        )
    lines += [
        f"blocks verified: {r.blocks_verified_fusemux} through fusemux (buffered + O_DIRECT), "
        f"{r.blocks_verified_backing} from the backing store",
        f"leaked mounts: {len(r.leaked_mounts)}  daemon exit status: {r.daemon_rc}",
    ]
    if r.samples:
        lines.append("first errors/violations seen:")
        lines += [f"  {s}" for s in r.samples[:20]]
    lines.append(f"violations: {len(r.violations)}")
    lines += [f"  {x}" for x in r.violations[:30]]
    lines.append("RESULT: " + ("PASS" if r.ok else "FAIL"))
    return "\n".join(lines)
