"""Tier (c): faults around the backing exports, through the real daemon over real mounts.

Each test injects one fault and checks what a caller sees, what the admin sees in the
``user.fusemux.*`` xattrs, that the other exports keep serving, and how the export recovers:

* a mount that fails (bad source, missing helper), its precise errno, the retry after a fix
  and the backoff against mount storms;
* a mount helper that mounts and then hangs: killed at ``mount_timeout`` with its whole
  process group, nothing left half-mounted;
* an unmount that is busy (another process has its cwd in the backing mount): retried with
  backoff, never lazily detached;
* a hung backend (``hangfs.py``, a FUSE filesystem whose reads block on demand): the other
  exports keep their latency and the admin xattrs keep answering; and a backend whose
  server dies (hangfs SIGKILLed: ENOTCONN at once, recovery once it serves again);
* the backing file deleted, or the whole backing mount unmounted from outside, under an open
  volume;
* data integrity: ``fio --verify=crc32c`` with an unmount and a mount between the write pass
  and the verify-only pass, buffered and O_DIRECT.

Extends (does not repeat) the failing/hanging mount tests in ``test_lifecycle.py``. Every
test undoes what it made (mounts, helper scripts, processes by PID) in ``finally``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import pytest

from fusemux.core.mounter import MNT_DETACH, umount2
from tests.mount.hangfs import content
from tests.mount.harness import (
    Daemon,
    loops_backed_by,
    mount_helper,
    mount_ids_at,
    mounted_at,
    pid_alive,
    run,
    stays,
    wait_for,
)

MiB = 1 << 20
VOL = b"fault-test-volume\n" * 4000
REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


# -- small helpers --------------------------------------------------------------------------


def open_error(path: Path) -> tuple[int, float]:
    """Open *path* expecting failure; returns (errno, seconds it took)."""
    t0 = time.monotonic()
    with pytest.raises(OSError) as exc:
        os.close(os.open(path, os.O_RDONLY))
    assert exc.value.errno is not None
    return exc.value.errno, time.monotonic() - t0


def read_latencies(path: Path, count: int, expect: bytes) -> list[float]:
    """*count* times open, pread 4 KiB at a varying offset, close; returns each duration.

    Every open invalidates the kernel's page cache for the file (fusemux replies without
    keep_cache), so each read reaches the daemon.
    """
    out = []
    for i in range(count):
        off = (i * 4096) % max(len(expect) - 4096, 1)
        t0 = time.monotonic()
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, 4096, off)
        finally:
            os.close(fd)
        out.append(time.monotonic() - t0)
        assert data == expect[off : off + 4096]
    return out


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def helper_gone(pid: int) -> bool:
    return not pid_alive(pid)


def attempts(counter: Path) -> int:
    """Mount attempts recorded by a counting helper (one line per run)."""
    return len(counter.read_text().splitlines()) if counter.exists() else 0


class Background(Generic[T]):
    """Run *fn* in a thread; ``result()`` joins it and re-raises what it raised."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self.value: T | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self.value = fn()
        except BaseException as e:  # handed to the test thread
            self.error = e

    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self, timeout: float) -> T:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"background call still running after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


# -- 1. mount fails -------------------------------------------------------------------------


def test_failed_mount_errno_is_fast_others_serve_and_next_open_retries(daemon: Daemon) -> None:
    """Bad source and missing helper: precise errno well within mount_timeout, last_error,
    the other export serves during the failures, and an open after a fix mounts."""
    good = daemon.add_bind_export("good", {"a": VOL})
    assert good.is_dir()
    missing = daemon.base / "not-yet"
    daemon.exports["nosource"] = {"source": str(missing), "fstype": "none", "options": "bind"}
    fstype = f"fmxlate{os.getpid()}"
    late_src = daemon.base / "late-src"
    late_src.mkdir()
    (late_src / "vol").write_bytes(VOL)
    daemon.exports["nohelper"] = {"source": str(late_src), "fstype": fstype}
    mount_timeout = 10.0
    daemon.write_config(mount_timeout=mount_timeout)
    daemon.allowed_warnings.append(r"export (nosource|nohelper): mount of .* failed")
    daemon.start()

    expected = {"nosource": errno.ENXIO, "nohelper": errno.ENODEV}
    for export, err in expected.items():
        got, took = open_error(daemon.volume(export, "vol"))
        assert got == err, (export, os.strerror(got))
        assert took < mount_timeout, (export, took)
        assert daemon.state_of(export) == "failed"
        assert daemon.xattr(daemon.volumes(export), "holders") == "0"
        assert daemon.xattr(daemon.volumes(export), "mount_count") == "0"
    nosource_error = daemon.xattr(daemon.volumes("nosource"), "last_error")
    assert nosource_error.startswith("mount failed: ") and "does not exist" in nosource_error
    nohelper_error = daemon.xattr(daemon.volumes("nohelper"), "last_error")
    assert nohelper_error.startswith("mount failed: ") and fstype in nohelper_error
    assert not daemon.backing_mounted("nosource") and not daemon.backing_mounted("nohelper")

    # The good export serves while the two bad ones are hammered with opens.
    stop = threading.Event()

    def hammer() -> int:
        n = 0
        while not stop.is_set():
            for export, err in expected.items():
                assert open_error(daemon.volume(export, "vol"))[0] == err
                n += 1
        return n

    bg = Background(hammer)
    try:
        lat = read_latencies(daemon.volume("good", "a"), 100, VOL)
    finally:
        stop.set()
    failed_opens = bg.result(30)
    assert isinstance(failed_opens, int) and failed_opens > 0
    assert p99(lat) < 0.5 and max(lat) < 2.0, (p99(lat), max(lat))

    # Fix both sources; the next open (after any backoff window) mounts.
    missing.mkdir()
    (missing / "vol").write_bytes(VOL)
    helper_script = '#!/bin/sh\nexec mount --bind "$1" "$2"\n'
    with mount_helper(fstype, helper_script):
        for export in expected:

            def opens(export: str = export) -> bytes | None:
                try:
                    with open(daemon.volume(export, "vol"), "rb") as f:
                        return f.read()
                except OSError as e:
                    assert e.errno == expected[export], e
                    time.sleep(0.1)
                    return None

            assert wait_for(opens, 30, f"an open of {export} to succeed") == VOL
            assert daemon.xattr(daemon.volumes(export), "mount_count") == "1"
            daemon.wait_unmounted(export)
            assert daemon.xattr(daemon.volumes(export), "last_error") == ""
    daemon.wait_unmounted("good")


COUNTING_HELPER = """#!/bin/sh
echo "$$" >> {counter}
if [ -e {fixed} ]; then
    exec mount --bind {src} "$2"
fi
echo "mount: $2: special device $1 does not exist." >&2
exit 32
"""


def test_failed_mount_backoff_fails_fast_then_retries(daemon: Daemon) -> None:
    """After a failed mount, opens in the backoff window fail at once with the same errno and
    no new mount attempt; the first open after the window tries again."""
    fstype = f"fmxcount{os.getpid()}"
    counter = daemon.base / "attempts"
    fixed = daemon.base / "fixed"
    src = daemon.base / "count-src"
    src.mkdir()
    (src / "vol").write_bytes(VOL)
    daemon.exports["flaky"] = {"source": "server:/flaky", "fstype": fstype}
    daemon.write_config(mount_timeout=10.0)
    daemon.allowed_warnings.append(r"export flaky: mount of .* failed")
    script = COUNTING_HELPER.format(counter=counter, fixed=fixed, src=src)
    with mount_helper(fstype, script):
        daemon.start()
        vol = daemon.volume("flaky", "vol")
        assert open_error(vol)[0] == errno.ENXIO
        t_failed = time.monotonic()
        assert attempts(counter) == 1
        # Inside the window: the same errno at once, and no new mount attempt.
        err, took = open_error(vol)
        assert err == errno.ENXIO
        assert took < 0.5, took
        assert attempts(counter) == 1
        assert daemon.state_of("flaky") == "failed"
        # Polling opens: all fail with ENXIO until the window is over and one retries.
        while attempts(counter) == 1:
            assert time.monotonic() - t_failed < 30, "no retry within 30 s"
            assert open_error(vol)[0] == errno.ENXIO
            time.sleep(0.05)
        window = time.monotonic() - t_failed
        print(f"backoff window observed: {window:.2f}s")
        # exports.MOUNT_BACKOFF_MIN is 1 s (doubling per consecutive failure, up to 10 s).
        assert 0.8 <= window <= 10.5, f"the retry came {window:.2f}s after the failure"
        assert attempts(counter) == 2
        # Fixed: the first open after the (possibly longer) window mounts, with one attempt.
        fixed.touch()
        before = attempts(counter)

        def opens() -> bytes | None:
            try:
                with open(vol, "rb") as f:
                    return f.read()
            except OSError as e:
                assert e.errno == errno.ENXIO, e
                time.sleep(0.05)
                return None

        assert wait_for(opens, 60, "an open after the fix to succeed") == VOL
        assert attempts(counter) == before + 1
        assert daemon.xattr(daemon.volumes("flaky"), "last_error") == ""
        daemon.wait_unmounted("flaky")


SLOW_HELPER = """#!/bin/sh
echo run >> {counter}
sleep {delay}
exec mount --bind {src} "$2"
"""

# A process that stats a path and reports how that ended; SIGUSR1 interrupts it (a handled
# signal, so the kernel sends FUSE INTERRUPT for the request it waits on).
STAT_AND_REPORT = """
import os, signal, sys
def stop(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGUSR1, stop)
print("ready", flush=True)
try:
    os.stat(sys.argv[1])
    print("ok", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
except OSError as e:
    print(f"errno {e.errno}", flush=True)
"""


def test_interrupted_lookup_does_not_abort_a_mount_others_wait_for(daemon: Daemon) -> None:
    """Issue 11: a slow mount, two processes waiting on the same export (stat of two
    volumes), one of them interrupted. The other still gets its volume, the mount helper is
    not killed (one attempt, no failure, no backoff), and the interrupted one stops waiting.

    First a harmless signal (SIGUSR1, handled), which the own engine leaves alone, then a
    kill, for which it cancels the waiting LOOKUP (the killed process waits for an answer
    otherwise)."""
    fstype = f"fmxslow{os.getpid()}"
    counter = daemon.base / "attempts"
    src = daemon.base / "slow-src"
    src.mkdir()
    (src / "a").write_bytes(VOL)
    (src / "b").write_bytes(VOL)
    daemon.exports["slow"] = {"source": "server:/slow", "fstype": fstype}
    daemon.write_config(linger=30.0, mount_timeout=30.0)
    script = SLOW_HELPER.format(counter=counter, src=src, delay=4)
    procs: list[subprocess.Popen[str]] = []
    with mount_helper(fstype, script):
        daemon.start()
        try:
            for name in ("a", "b"):
                proc = subprocess.Popen(
                    [sys.executable, "-c", STAT_AND_REPORT, str(daemon.volume("slow", name))],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                procs.append(proc)
                assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            wait_for(lambda: attempts(counter) == 1, 10, "the slow mount to start")
            time.sleep(0.5)  # both LOOKUPs are in the daemon, waiting for the mount
            assert daemon.state_of("slow") == "mounting"
            interrupted, waiting = procs
            interrupted.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
            assert interrupted.poll() is None or daemon.state_of("slow") == "mounted"
            interrupted.kill()
            assert interrupted.wait(30) == -signal.SIGKILL
            out_b, _ = waiting.communicate(timeout=30)
            assert out_b.strip() == "ok", out_b
            assert attempts(counter) == 1, "the mount was killed and made again"
            assert daemon.state_of("slow") == "mounted"
            assert daemon.xattr(daemon.volumes("slow"), "mount_count") == "1"
            assert daemon.xattr(daemon.volumes("slow"), "last_error") == ""
            assert "mount of" not in daemon.log()
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


# -- 2. mount hangs ---------------------------------------------------------------------------


HALF_MOUNT_HELPER = """#!/bin/sh
echo "$$" > {pidfile}
sleep 600 &
echo "$!" > {childfile}
mount --bind {src} "$2"
exec sleep 600
"""


def test_hanging_half_mount_is_killed_and_cleared(daemon: Daemon) -> None:
    """A helper that completes mount(2) and then hangs (with a forked child): at
    mount_timeout the whole process group is killed, the half-made mount is cleared, the
    other export serves throughout, and state/last_error say what happened."""
    fstype = f"fmxhalf{os.getpid()}"
    pidfile, childfile = daemon.base / "helper.pid", daemon.base / "child.pid"
    src = daemon.base / "half-src"
    src.mkdir()
    (src / "vol").write_bytes(VOL)
    daemon.add_bind_export("good", {"a": VOL})
    daemon.exports["hang"] = {"source": "server:/hang", "fstype": fstype}
    mount_timeout = 3.0
    daemon.write_config(mount_timeout=mount_timeout)
    daemon.allowed_warnings.append(r"export hang: mount of .* failed: .*timed out")
    script = HALF_MOUNT_HELPER.format(pidfile=pidfile, childfile=childfile, src=src)
    pids: list[int] = []
    try:
        with mount_helper(fstype, script):
            daemon.start()
            t0 = time.monotonic()
            bg = Background(lambda: open_error(daemon.volume("hang", "vol")))
            wait_for(lambda: childfile.exists() and childfile.read_text().strip(), 5, "helper")
            pids = [int(pidfile.read_text()), int(childfile.read_text())]
            # The helper has mounted and hangs: the export is still "mounting".
            wait_for(lambda: daemon.backing_mounted("hang"), 5, "the half mount")
            assert daemon.state_of("hang") == "mounting"
            lat = []
            while not bg.done():
                lat += read_latencies(daemon.volume("good", "a"), 5, VOL)
            err, took = bg.result(5)
            elapsed = time.monotonic() - t0
        assert err == errno.ETIMEDOUT, os.strerror(err)
        assert mount_timeout - 0.5 < took < mount_timeout + 5, took
        assert elapsed < mount_timeout + 5
        assert len(lat) >= 10 and p99(lat) < 0.5 and max(lat) < 2.0, (len(lat), max(lat))
        # Nothing half-mounted, no helper left.
        assert mounted_at(daemon.target("hang")) == []
        for pid in pids:
            wait_for(functools.partial(helper_gone, pid), 5, f"helper process {pid} to go")
        assert daemon.state_of("hang") == "failed"
        last_error = daemon.xattr(daemon.volumes("hang"), "last_error")
        assert last_error.startswith("mount failed: ") and "timed out" in last_error
        assert daemon.xattr(daemon.volumes("hang"), "holders") == "0"
        assert daemon.xattr(daemon.volumes("hang"), "mount_count") == "0"
        daemon.wait_unmounted("good")
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            if mounted_at(daemon.target("hang")):
                umount2(daemon.target("hang"), MNT_DETACH)


# -- 3. unmount busy --------------------------------------------------------------------------


def test_busy_unmount_is_retried_and_never_detached(daemon: Daemon) -> None:
    """Another process has its cwd in the backing mount: while fusemux holds a volume nothing
    changes; after the last close the unmount fails (EBUSY), is reported and retried with a
    doubling delay, the mount is never lazily detached, and it goes once the process exits."""
    daemon.add_bind_export("gold", {"a": VOL})
    daemon.write_config(linger=0)
    daemon.allowed_warnings.append(r"export gold: unmount failed .*busy.*; retrying in \d+s")
    daemon.start()
    target = daemon.target("gold")
    child: subprocess.Popen[bytes] | None = None
    f = open(daemon.volume("gold", "a"), "rb")
    try:
        ids = mount_ids_at(target)
        assert len(ids) == 1
        child = subprocess.Popen(["sleep", "600"], cwd=target)
        assert os.readlink(f"/proc/{child.pid}/cwd") == str(target)

        # With a fusemux handle open and the cwd held: nothing changes.
        def unchanged() -> bool:
            return (
                mount_ids_at(target) == ids
                and daemon.state_of("gold") == "mounted"
                and daemon.xattr(daemon.volumes("gold"), "last_error") == ""
            )

        assert stays(unchanged, 1.5)
        assert f.read() == VOL
        f.close()

        # After the last close: the unmount is busy, reported, and the mount stays put.
        wait_for(
            lambda: daemon.xattr(daemon.volumes("gold"), "last_error").startswith("unmount failed"),
            10,
            "the busy unmount to be reported",
        )
        last_error = daemon.xattr(daemon.volumes("gold"), "last_error")
        assert "busy" in last_error, last_error
        # Through at least two retries (1 s, then 2 s), the same mount stays, never detached.
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4.0:
            assert mount_ids_at(target) == ids
            assert daemon.state_of("gold") in ("mounted", "unmounting")
            assert daemon.xattr(daemon.volumes("gold"), "holders") == "0"
            time.sleep(0.05)
        wait_for(lambda: daemon.state_of("gold") == "mounted", 5, "state mounted")
        retries = [
            line.rsplit("retrying in ", 1)[1].split()[0]  # then the key=value fields
            for line in daemon.log().splitlines()
            if "export gold: unmount failed" in line
        ]
        print(f"unmount retries logged: {retries}")
        assert retries[:3] == ["1s", "2s", "4s"][: len(retries[:3])] and len(retries) >= 2, retries
        assert os.readlink(f"/proc/{child.pid}/cwd") == str(target)  # not detached under it

        # The process leaves: the next retry unmounts (retries are at most 60 s apart; the
        # next one here is due within 8 s).
        child.kill()
        child.wait(10)
        child = None
        daemon.wait_unmounted("gold", timeout=20)
        assert daemon.xattr(daemon.volumes("gold"), "last_error") == ""
        assert daemon.xattr(daemon.volumes("gold"), "mount_count") == "1"
    finally:
        if not f.closed:
            f.close()
        if child is not None:
            child.kill()
            child.wait(10)


# -- 4. hung backend ------------------------------------------------------------------------


@dataclass
class HangFs:
    """hangfs processes serving one mountpoint (one at a time), and its control directory."""

    mnt: Path
    control: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> None:
        """Start a hangfs process on ``mnt`` and wait until it serves."""
        with contextlib.suppress(FileNotFoundError):
            (self.control / "ready").unlink()
        with open(self.control.parent / "hangfs.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.mount.hangfs", str(self.mnt), str(self.control)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.procs.append(proc)

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"hangfs exited {proc.returncode}")
            return (self.control / "ready").exists() and "fuse.hangfs" in mounted_at(self.mnt)

        wait_for(up, 20, "hangfs to serve")

    def kill(self) -> None:
        """SIGKILL the serving process: its mount stays, answering ENOTCONN."""
        proc = self.procs[-1]
        proc.kill()
        proc.wait(10)

    def detach(self) -> None:
        if mounted_at(self.mnt):
            umount2(self.mnt, MNT_DETACH)

    def stop_all(self) -> None:
        self.unblock()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        with contextlib.suppress(OSError):
            self.detach()

    def block(self, what: str = "block") -> None:
        """Block reads (or, with ``block_statfs``, statfs) until :meth:`unblock`."""
        (self.control / what).touch()

    def unblock(self) -> None:
        for what in ("block", "block_statfs"):
            with contextlib.suppress(FileNotFoundError):
                (self.control / what).unlink()

    def waiting(self) -> int:
        try:
            return int((self.control / "waiting").read_text() or 0)
        except FileNotFoundError:
            return 0


@pytest.fixture
def hangfs(tmp_path: Path) -> Iterator[HangFs]:
    """hangfs.py serving at tmp_path/hangfs/mnt; unblocked, unmounted and killed afterwards.

    Request it *before* ``daemon`` so that the daemon (and its bind mount of hangfs) is
    stopped first.
    """
    base = tmp_path / "hangfs"
    fs = HangFs(base / "mnt", base / "control")
    fs.mnt.mkdir(parents=True)
    fs.control.mkdir()
    try:
        fs.start()
        yield fs
    finally:
        fs.stop_all()


def test_hung_backend_does_not_stall_other_exports(hangfs: HangFs, daemon: Daemon) -> None:
    """A read blocked inside the backend of one export: reads of another export keep their
    latency, the sick export's xattrs and a stat of the blocked volume still answer, and the
    blocked read completes with the right data once the backend recovers."""
    daemon.exports["sick"] = {"source": str(hangfs.mnt), "fstype": "none", "options": "bind"}
    daemon.add_bind_export("good", {"a": VOL})
    daemon.write_config(linger=0)
    daemon.start()
    expected = content("vol1", MiB)
    baseline = read_latencies(daemon.volume("good", "a"), 50, VOL)
    fd = os.open(daemon.volume("sick", "vol1"), os.O_RDONLY)
    bg: Background[bytes] | None = None
    try:
        assert os.pread(fd, 4096, 0) == expected[:4096]
        assert daemon.backing_mounted("sick")
        hangfs.block()
        off = 512 * 1024
        bg = Background(lambda: os.pread(fd, 65536, off))
        wait_for(lambda: hangfs.waiting() >= 1, 10, "a read to block inside hangfs")

        # Read the other export for at least 2 s (and 200 reads) while the read is stuck.
        t0 = time.monotonic()
        during: list[float] = []
        while len(during) < 200 or time.monotonic() - t0 < 2.0:
            during += read_latencies(daemon.volume("good", "a"), 20, VOL)
        assert not bg.done(), "the blocked read returned while the backend was blocked"
        getfattr = ["getfattr", "--only-values", "-n", "user.fusemux.state"]
        state = subprocess.run(
            [*getfattr, str(daemon.volumes("sick"))], capture_output=True, text=True, timeout=5
        ).stdout
        assert state == "mounted"
        assert daemon.xattr(daemon.volumes("sick"), "open_volumes") == "vol1"
        assert daemon.xattr(daemon.volume("sick", "vol1"), "open_count") == "1"
        # Metadata of the sick backend still answers (only its reads block).
        st = Background(lambda: os.stat(daemon.volume("sick", "vol2")).st_size)
        assert st.result(5) == MiB
        blocked_for = time.monotonic() - t0
        print(
            f"other export while blocked: {len(during)} reads, p99 {p99(during) * 1e3:.1f} ms, "
            f"max {max(during) * 1e3:.1f} ms (baseline p99 {p99(baseline) * 1e3:.1f} ms)"
        )
        assert not bg.done()
        assert p99(during) < 0.5 and max(during) < 2.0, (p99(during), max(during))
        assert p99(during) < max(0.2, 20 * p99(baseline)), (p99(during), p99(baseline))

        hangfs.unblock()
        assert bg.result(10) == expected[off : off + 65536]
        bg = None
        assert blocked_for >= 2.0
    finally:
        hangfs.unblock()
        if bg is not None:
            bg.thread.join(10)
        os.close(fd)
    daemon.wait_unmounted("sick")
    daemon.wait_unmounted("good")


def test_io_timeout_turns_a_hung_read_into_etimedout(hangfs: HangFs, daemon: Daemon) -> None:
    """With ``io_timeout`` (for backends that never time out by themselves, like an NFSv4
    soft mount while its server is stopped), a read stuck in the backend fails with
    ETIMEDOUT after that time instead of blocking; the export keeps working afterwards."""
    daemon.exports["sick"] = {
        "source": str(hangfs.mnt),
        "fstype": "none",
        "options": "bind",
        "io_timeout": 1.0,
    }
    daemon.write_config(linger=0)
    daemon.start()
    expected = content("vol1", MiB)
    fd = os.open(daemon.volume("sick", "vol1"), os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == expected[:4096]
        hangfs.block()
        t0 = time.monotonic()
        with pytest.raises(OSError) as info:
            os.pread(fd, 65536, 512 * 1024)
        took = time.monotonic() - t0
        assert info.value.errno == errno.ETIMEDOUT
        assert 0.9 <= took < 5, took
        assert daemon.state_of("sick") == "mounted"
        # The abandoned read (and any readahead the kernel sent with it) still uses the
        # backing mount: each holds the export, beside fd's handle, until it returns, so no
        # unmount is attempted under it.
        assert int(daemon.xattr(daemon.volumes("sick"), "holders")) >= 2
        hangfs.unblock()
        # The abandoned read finishes in the background; new reads are served normally.
        assert os.pread(fd, 65536, 256 * 1024) == expected[256 * 1024 : 320 * 1024]
    finally:
        hangfs.unblock()
        os.close(fd)
    daemon.wait_unmounted("sick")


def test_backend_dies_under_open_volume(hangfs: HangFs, daemon: Daemon) -> None:
    """The backend's server dies (hangfs SIGKILLed, its mount left answering ENOTCONN, like a
    dead storage connection): reads and new opens of the volume fail at once with ENOTCONN
    (a close() with nothing to flush succeeds), the admin xattrs answer, the export
    unmounts after the last close, and once the backend serves again the next open works."""
    daemon.exports["sick"] = {"source": str(hangfs.mnt), "fstype": "none", "options": "bind"}
    daemon.add_bind_export("good", {"a": VOL})
    daemon.write_config(linger=0)
    daemon.allowed_warnings.append(r"close of sick/vol1 failed: .*Transport endpoint")
    daemon.allowed_warnings.append(r"export sick: health ok -> unresponsive .*Transport endpoint")
    daemon.start()
    fd = os.open(daemon.volume("sick", "vol1"), os.O_RDONLY)
    close_errno = 0
    try:
        assert os.pread(fd, 4096, 0) == content("vol1", MiB)[:4096]
        hangfs.kill()
        t0 = time.monotonic()
        with pytest.raises(OSError) as exc:
            os.pread(fd, 4096, 65536)
        assert exc.value.errno == errno.ENOTCONN
        assert open_error(daemon.volume("sick", "vol2"))[0] == errno.ENOTCONN
        assert time.monotonic() - t0 < 5
        assert daemon.state_of("sick") == "mounted"
        assert daemon.xattr(daemon.volumes("sick"), "open_volumes") == "vol1"
        assert read_latencies(daemon.volume("good", "a"), 20, VOL)
    finally:
        try:
            os.close(fd)
        except OSError as e:
            close_errno = e.errno or 0
    # close() of this read-only fd succeeds: a handle that wrote nothing since its last
    # flush has nothing to flush, so FLUSH does not touch the dead backend.
    assert close_errno == 0
    daemon.wait_unmounted("sick")
    assert daemon.xattr(daemon.volumes("sick"), "last_error") == ""
    # The backend comes back (its stale mount cleared, a new server on the same path).
    hangfs.detach()
    hangfs.start()
    with open(daemon.volume("sick", "vol2"), "rb") as f:
        assert f.read() == content("vol2", MiB)
    daemon.wait_unmounted("sick")
    daemon.wait_unmounted("good")


def test_health_over_a_hung_backend(hangfs: HangFs, daemon: Daemon) -> None:
    """A mounted export whose backend stops answering statfs (a server that hangs) shows
    ``health`` = ``unresponsive`` with ``last_error`` filled in, in the xattr and in
    ``fusemux status``, while another export stays ``ok``; once the backend answers again
    it returns to ``ok`` by itself and ``last_error`` is empty again."""
    daemon.exports["sick"] = {"source": str(hangfs.mnt), "fstype": "none", "options": "bind"}
    daemon.add_bind_export("good", {"a": VOL})
    daemon.write_config(linger=0)
    daemon.allowed_warnings += [
        r"export sick: health ok -> unresponsive \(statvfs of .* has not answered",
        r"export sick: statvfs timed out",
    ]
    daemon.start()
    sick, good = daemon.volumes("sick"), daemon.volumes("good")
    with open(daemon.volume("sick", "vol1"), "rb") as f, open(daemon.volume("good", "a"), "rb"):
        assert f.read(4096) == content("vol1", MiB)[:4096]
        assert daemon.xattr(sick, "health") == "ok"
        hangfs.block("block_statfs")
        t0 = time.monotonic()
        wait_for(lambda: daemon.xattr(sick, "health") == "unresponsive", 20, "unresponsive")
        print(f"unresponsive after {time.monotonic() - t0:.1f} s")
        assert "has not answered" in daemon.xattr(sick, "last_error")
        assert daemon.state_of("sick") == "mounted"
        assert daemon.xattr(good, "health") == "ok"
        # Everything else still answers: a read of the sick export, the admin's status.
        assert f.read(4096) == content("vol1", MiB)[4096:8192]
        status = run(sys.executable, "-m", "fusemux", "status", daemon.mnt, "--json", cwd=REPO)
        by_name = {e["name"]: e for e in json.loads(status.stdout)["exports"]}
        assert by_name["sick"]["health"] == "unresponsive"
        assert by_name["good"]["health"] == "ok"
        text = run(sys.executable, "-m", "fusemux", "status", daemon.mnt, cwd=REPO).stdout
        assert any(
            line.split()[:3] == ["sick", "mounted", "unresponsive"] for line in text.splitlines()
        ), text
        hangfs.unblock()
        wait_for(lambda: daemon.xattr(sick, "health") == "ok", 20, "ok again")
        assert daemon.xattr(sick, "last_error") == ""
    daemon.wait_unmounted("sick")
    daemon.wait_unmounted("good")
    assert daemon.xattr(sick, "health") == "ok"
    assert "export sick: health unresponsive -> ok" in daemon.log()


# -- 5. the backing file or mount disappears --------------------------------------------------
#
# Observed on Linux 6.18 when the backing *file* is deleted under an open volume:
# * an O_DIRECT fd (fusemux replies direct_io) keeps reading and writing the old inode;
# * a buffered fd keeps reading and writing too: when the kernel revalidates the inode's
#   attributes, fusemux's lstat() of the backing path fails, and it answers getattr from an
#   fstat() of one of the open handles' own fds instead;
# * nothing hangs, the daemon logs nothing, and the export recovers after the last close.
# When the whole backing *mount* is detached from outside, fusemux mounts it again on the
# first path lookup that fails, so nothing fails at all.


def direct_buffer(fill: bytes = b"") -> mmap.mmap:
    """A page-aligned 4 KiB buffer, as O_DIRECT needs."""
    buf = mmap.mmap(-1, 4096)
    if fill:
        buf[:] = (fill * 4096)[:4096]
    return buf


def test_backing_file_deleted_under_open_volume(daemon: Daemon) -> None:
    """The storage side deletes an open volume's file: O_DIRECT I/O keeps working on the
    deleted inode, so does buffered I/O (getattr falls back to an open handle's fd), new opens
    of the name get ENOENT, the rest of the export serves, nothing hangs."""
    src = daemon.add_bind_export("gold", {"vol": VOL, "other": VOL})
    daemon.write_config(linger=0)
    daemon.start()
    vol = daemon.volume("gold", "vol")
    buffered = os.open(vol, os.O_RDWR)
    direct = os.open(vol, os.O_RDWR | os.O_DIRECT)
    buf = direct_buffer()
    try:
        assert os.pread(buffered, 100, 0) == VOL[:100]
        (src / "vol").unlink()
        t0 = time.monotonic()
        # O_DIRECT: reads and writes keep working on the deleted inode.
        assert os.preadv(direct, [buf], 4096) == 4096 and buf[:] == VOL[4096:8192]
        assert os.pwritev(direct, [direct_buffer(b"D")], 8192) == 4096
        os.fsync(direct)
        assert os.preadv(direct, [buf], 8192) == 4096 and buf[:] == b"D" * 4096
        # Buffered: the write is accepted and the read after it (which revalidates the
        # attributes) sees it.
        assert os.pwrite(buffered, b"after-delete", 0) == 12
        assert os.pread(buffered, 12, 0) == b"after-delete"
        # New opens of the name: ENOENT; the listing no longer shows it.
        assert open_error(vol)[0] == errno.ENOENT
        assert "vol" not in os.listdir(daemon.volumes("gold"))
        time.sleep(1.2)  # past the kernel's attribute and entry timeouts
        assert open_error(vol)[0] == errno.ENOENT
        assert os.pread(buffered, 12, 0) == b"after-delete"
        assert os.fstat(direct).st_size == len(VOL)
        assert os.preadv(direct, [buf], 0) == 4096 and buf[:12] == b"after-delete"
        assert time.monotonic() - t0 < 10
        # The rest of the export is fine.
        with open(daemon.volume("gold", "other"), "rb") as f:
            assert f.read() == VOL
        assert daemon.state_of("gold") == "mounted"
        # RELEASE of "other" reaches the daemon after close() returned: allow it a moment.
        wait_for(
            lambda: daemon.xattr(daemon.volumes("gold"), "open_volumes") == "vol",
            5,
            "only the deleted volume left open",
        )
    finally:
        os.close(buffered)
        os.close(direct)
    daemon.wait_unmounted("gold")
    assert daemon.xattr(daemon.volumes("gold"), "last_error") == ""


def image_loops(image: Path) -> list[str]:
    """Loop devices whose backing file is *image*."""
    return loops_backed_by(lambda backing: backing == str(image))


@pytest.mark.parametrize("kind", ["bind", "ext4"])
def test_backing_mount_detached_from_outside(daemon: Daemon, kind: str) -> None:
    """The backing mount is lazily unmounted from outside under open volumes: the open fds
    keep working on the detached mount (buffered and O_DIRECT), the first lookup/getattr/open
    that finds the path gone mounts the export again (a warning says so), a new open then
    works, nothing hangs, and after the last close the export unmounts and mounts normally
    with every write in place. For ext4 the image never gets a second loop device."""
    image = None
    if kind == "bind":
        daemon.add_bind_export("gold", {"vol": VOL, "other": VOL})
    else:
        image = daemon.add_ext4_export("gold", {"vol": VOL, "other": VOL})
    daemon.write_config(linger=0)
    daemon.allowed_warnings.append(
        r"export gold: the backing mount at .* vanished \(unmounted from outside\); "
        r"mounting it again"
    )
    daemon.start()
    target = daemon.target("gold")
    vol = daemon.volume("gold", "vol")
    buffered = os.open(vol, os.O_RDWR)
    direct = os.open(vol, os.O_RDWR | os.O_DIRECT)
    buf = direct_buffer()
    try:
        assert os.pread(buffered, 100, 0) == VOL[:100]
        loops_before = image_loops(image) if image else []
        run("umount", "-l", target)
        assert not daemon.backing_mounted("gold")
        t0 = time.monotonic()
        # The open fds keep working on the detached mount.
        assert os.preadv(direct, [buf], 8192) == 4096 and buf[:] == VOL[8192:12288]
        assert os.pwritev(direct, [direct_buffer(b"D")], 12288) == 4096
        assert os.pwrite(buffered, b"written-after-detach", 4096) == 20
        os.fsync(buffered)
        os.fsync(direct)
        assert os.fstat(buffered).st_size == len(VOL)
        # A new open of another volume of the export works: the export is mounted again.
        with open(daemon.volume("gold", "other"), "rb") as f:
            assert f.read() == VOL
        assert daemon.backing_mounted("gold")
        assert daemon.state_of("gold") == "mounted"
        assert daemon.xattr(daemon.volumes("gold"), "mount_count") == "2"
        time.sleep(1.2)  # past the attribute timeout: buffered reads revalidate (getattr)
        assert os.pread(buffered, 20, 4096) == b"written-after-detach"
        assert os.preadv(direct, [buf], 12288) == 4096 and buf[:] == b"D" * 4096
        assert time.monotonic() - t0 < 10
        if image is not None:
            # The remount reused the loop device: one superblock for old fds and new mount.
            assert image_loops(image) == loops_before and len(loops_before) == 1
    finally:
        os.close(buffered)
        os.close(direct)
    daemon.wait_unmounted("gold")
    assert daemon.xattr(daemon.volumes("gold"), "last_error") == ""
    if image is not None:
        wait_for(lambda: not image_loops(image), 10, "the loop device to be released")
    assert "vanished (unmounted from outside)" in daemon.log()
    # The next open mounts again; the data written through the detached mount is there.
    with open(vol, "rb") as f:
        assert daemon.backing_mounted("gold")
        data = f.read()
    assert data[4096:4116] == b"written-after-detach"
    assert data[12288:16384] == b"D" * 4096
    assert data[:4096] == VOL[:4096] and data[16384:] == VOL[16384:]
    assert daemon.xattr(daemon.volumes("gold"), "mount_count") == "3"
    daemon.wait_unmounted("gold")


def test_buffered_read_of_deleted_backing_file_is_data_or_eio(daemon: Daemon) -> None:
    src = daemon.add_bind_export("gold", {"vol": VOL})
    daemon.write_config(linger=0)
    daemon.start()
    fd = os.open(daemon.volume("gold", "vol"), os.O_RDONLY)
    try:
        (src / "vol").unlink()
        time.sleep(1.2)  # past the attribute timeout
        # getattr answers from the open handle's own fd: the data stays readable.
        assert os.pread(fd, 100, 0) == VOL[:100]
        assert os.fstat(fd).st_size == len(VOL)
    finally:
        os.close(fd)
    daemon.wait_unmounted("gold")


# -- 6. data integrity ------------------------------------------------------------------------


def fio(*args: str | Path) -> dict[str, object]:
    result = run("fio", "--output-format=json", *args)
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert isinstance(report, dict)
    return report


@pytest.mark.parametrize("direct", [0, 1], ids=["buffered", "o_direct"])
def test_fio_verify_across_unmount_and_remount(daemon: Daemon, direct: int) -> None:
    """fio writes with crc32c verification headers through fusemux; the export is unmounted
    (backing mount gone) and mounted again; a verify-only pass of the same job passes."""
    size = 16 * MiB
    daemon.add_ext4_export("img", {"disk.raw": b"\0" * size})
    daemon.write_config(linger=0)
    daemon.start()
    vol = daemon.volume("img", "disk.raw")
    job = [
        "--name=integrity",
        f"--filename={vol}",
        f"--size={size}",
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--ioengine=psync",
        f"--direct={direct}",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",  # no state file in the cwd
        "--fallocate=none",
        "--randrepeat=1",
        "--randseed=4242",
    ]
    written = fio(*job, "--do_verify=0")
    jobs = written["jobs"]
    assert isinstance(jobs, list)
    assert jobs[0]["error"] == 0 and jobs[0]["write"]["io_bytes"] == size

    daemon.wait_unmounted("img")
    assert mounted_at(daemon.target("img")) == []
    # fio may open the file more than once per pass; with linger 0 each can be a mount.
    mounts_after_write = int(daemon.xattr(daemon.volumes("img"), "mount_count"))
    assert mounts_after_write >= 1

    verified = fio(*job, "--verify_only")
    jobs = verified["jobs"]
    assert isinstance(jobs, list)
    assert jobs[0]["error"] == 0
    assert jobs[0]["read"]["io_bytes"] == size
    assert int(daemon.xattr(daemon.volumes("img"), "mount_count")) > mounts_after_write
    daemon.wait_unmounted("img")

    # Negative control: the verify pass really checks. Corrupt one block, it must fail.
    with open(vol, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\xff" * 4096)
    daemon.wait_unmounted("img")
    bad = run("fio", *job, "--verify_only", check=False)
    assert bad.returncode != 0 and "verify: bad magic header" in bad.stdout + bad.stderr
    daemon.wait_unmounted("img")
