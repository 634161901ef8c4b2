"""Tier (c): locks on volumes are locks on the backing file (issue 13).

Two fusemux daemons over one export stand for two hosts: both serve the same backing
directory (a bind mount of it each). A lock taken through mount A must be seen through
mount B and on the backing file itself, by fcntl (OFD and POSIX locks), flock and qemu.
Lock holders are subprocesses, so that closing or killing them is real.

The pyfuse3 engine has no lock handlers: there the kernel keeps locks inside the mount
(docs/reliability.md), which the first test checks as the documented behaviour.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mount.harness import Daemon, checked_daemon, run, stays, wait_for

F_OFD_GETLK = 36
F_OFD_SETLK = 37
F_OFD_SETLKW = 38
FLOCK = struct.Struct("hhqqi4x")  # l_type l_whence l_start l_len l_pid
LOCK_ERROR = 'Failed to get "write" lock'

# A lock holder: opens PATH, takes one lock, says "locked", holds it until stdin closes.
HOLDER = r"""
import fcntl, os, struct, sys
path, kind, typ, start, length = sys.argv[1:6]
fd = os.open(path, os.O_RDWR)
t = {"read": fcntl.F_RDLCK, "write": fcntl.F_WRLCK}[typ]
if kind == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX if typ == "write" else fcntl.LOCK_SH)
else:
    cmd = {"ofd": 37, "posix": fcntl.F_SETLK}[kind]
    fcntl.fcntl(fd, cmd, struct.pack("hhqqi4x", t, 0, int(start), int(length), 0))
if len(sys.argv) > 6:  # "close-other": close another fd of the same file on request
    other = os.open(path, os.O_RDONLY)
print("locked", flush=True)
for line in sys.stdin:
    if line.strip() == "close-other":
        os.close(other)
        print("closed", flush=True)
"""

# A blocking F_OFD_SETLKW through ctypes (Python's fcntl retries on EINTR): prints the errno.
WAITER = r"""
import ctypes, os, signal, struct, sys
signal.signal(signal.SIGUSR1, lambda *a: None)
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(sys.argv[1], os.O_RDWR)
buf = ctypes.create_string_buffer(struct.pack("hhqqi4x", 1, 0, 0, 0, 0), 32)
print("waiting", flush=True)
rc = libc.fcntl(fd, 38, buf)
print("rc", rc, ctypes.get_errno(), flush=True)
sys.stdin.read()
"""


class Holder:
    def __init__(self, path: Path, kind: str, typ: str, start: int, length: int, *extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), kind, typ, str(start), str(length), *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "locked":
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"holder did not lock {path}: {line!r}")

    def say(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def ofd(fd: int, cmd: int, typ: int, start: int, length: int) -> tuple[int, int, int, int]:
    """One OFD (or POSIX) fcntl lock call; returns (type, start, len, pid) as the kernel left."""
    res = fcntl.fcntl(fd, cmd, FLOCK.pack(typ, os.SEEK_SET, start, length, 0))
    typ, _whence, start, length, pid = FLOCK.unpack(res)
    return typ, start, length, pid


def try_ofd(path: Path, typ: int = fcntl.F_WRLCK, start: int = 0, length: int = 0) -> int:
    """Open *path* and try an OFD lock: 0 or the errno. A lock taken is dropped again before
    the close (through FUSE, an OFD lock goes at RELEASE, a moment after close returns)."""
    fd = os.open(path, os.O_RDWR)
    try:
        ofd(fd, F_OFD_SETLK, typ, start, length)
        ofd(fd, F_OFD_SETLK, fcntl.F_UNLCK, start, length)
        return 0
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)


def try_flock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return 0
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)


@pytest.fixture
def two_hosts(daemon: Daemon, tmp_path: Path) -> Iterator[tuple[Daemon, Daemon, Path]]:
    """Daemon A (the fixture's) and daemon B over the same backing directory."""
    src = daemon.add_bind_export("gold", {"disk": b"\0" * (1 << 20)})
    with checked_daemon(tmp_path / "hostb", daemon.mode, "daemon B") as b:
        b.exports["gold"] = dict(daemon.exports["gold"])
        daemon.start()
        b.start()
        yield daemon, b, src


def needs_lock_engine(d: Daemon) -> None:
    if not d.own_engine:
        pytest.skip("pyfuse3 has no lock handlers: locks stay in the mount (reliability.md)")


def test_ofd_lock_through_one_mount_holds_on_the_other_and_the_backing_file(
    two_hosts: tuple[Daemon, Daemon, Path],
) -> None:
    a, b, src = two_hosts
    vol_a, vol_b = a.volume("gold", "disk"), b.volume("gold", "disk")
    holder = Holder(vol_a, "ofd", "write", 0, 100)
    try:
        if not a.own_engine:
            # Documented: the pyfuse3 engine keeps locks inside its mount.
            assert try_ofd(vol_b) == 0
            assert try_ofd(src / "disk") == 0
            return
        assert try_ofd(vol_b, start=50, length=10) == errno.EAGAIN
        assert try_ofd(src / "disk") == errno.EAGAIN
        assert try_ofd(vol_b, start=100, length=10) == 0  # outside the locked range
        assert try_ofd(vol_b, fcntl.F_RDLCK, 0, 1) == errno.EAGAIN
        # F_OFD_GETLK through B names the holder's range and type.
        fd = os.open(vol_b, os.O_RDWR)
        try:
            typ, start, length, _pid = ofd(fd, F_OFD_GETLK, fcntl.F_RDLCK, 10, 5)
            assert (typ, start, length) == (fcntl.F_WRLCK, 0, 100)
            typ, *_ = ofd(fd, F_OFD_GETLK, fcntl.F_WRLCK, 100, 0)
            assert typ == fcntl.F_UNLCK
            # Classic F_GETLK too (a remote, OFD holder: no pid to give).
            typ, start, length, pid = ofd(fd, fcntl.F_GETLK, fcntl.F_WRLCK, 0, 0)
            assert (typ, start, length) == (fcntl.F_WRLCK, 0, 100) and pid in (0, -1)
        finally:
            os.close(fd)
        # Introspection on A.
        lines = a.xattr(vol_a, "locks").splitlines()
        assert lines == [f"{holder.proc.pid}:{comm(holder.proc.pid)} write 0-99"], lines
        assert b.xattr(vol_b, "locks") == ""
        status = json.loads(run(sys.executable, "-m", "fusemux", "status", a.mnt, "--json").stdout)
        assert [e["locks"] for e in status["exports"] if e["name"] == "gold"] == [1]
        text = run(sys.executable, "-m", "fusemux", "status", a.mnt).stdout
        assert "locks: gold 1 held through fusemux" in text
    finally:
        holder.close()
    # The holder's RELEASE comes after its exit: the lock goes with it.
    wait_for(lambda: try_ofd(vol_b) == 0, 10, "the lock to go with its holder")
    assert try_ofd(src / "disk") == 0
    assert a.xattr(vol_a, "locks") == ""


def test_posix_lock_semantics_across_mounts(two_hosts: tuple[Daemon, Daemon, Path]) -> None:
    a, b, src = two_hosts
    needs_lock_engine(a)
    vol_a, vol_b = a.volume("gold", "disk"), b.volume("gold", "disk")
    holder = Holder(vol_a, "posix", "write", 10, 11, "close-other")
    try:
        fd = os.open(vol_b, os.O_RDWR)
        try:
            with pytest.raises(OSError) as info:
                ofd(fd, fcntl.F_SETLK, fcntl.F_WRLCK, 15, 1)
            assert info.value.errno in (errno.EAGAIN, errno.EACCES)
            typ, start, length, _ = ofd(fd, fcntl.F_GETLK, fcntl.F_RDLCK, 0, 0)
            assert (typ, start, length) == (fcntl.F_WRLCK, 10, 11)
        finally:
            os.close(fd)
        assert try_ofd(src / "disk", start=20, length=1) == errno.EAGAIN
        assert try_ofd(src / "disk", start=21, length=1) == 0
        assert a.xattr(vol_a, "locks") == f"{holder.proc.pid}:{comm(holder.proc.pid)} write 10-20\n"
        # Another process opening and closing the volume through the same mount (its FLUSH
        # names another owner) leaves the holder's lock alone.
        for _ in range(3):
            os.close(os.open(vol_a, os.O_RDONLY))
        assert try_ofd(vol_b, start=15, length=1) == errno.EAGAIN
        # POSIX: closing any fd of the file drops the process's locks on it, at once.
        assert holder.say("close-other") == "closed"
        assert try_ofd(vol_b, start=15, length=1) == 0
        assert try_ofd(src / "disk", start=10, length=11) == 0
        assert a.xattr(vol_a, "locks") == ""
    finally:
        holder.close()


def test_flock_across_mounts(two_hosts: tuple[Daemon, Daemon, Path]) -> None:
    a, b, src = two_hosts
    needs_lock_engine(a)
    vol_a, vol_b = a.volume("gold", "disk"), b.volume("gold", "disk")
    holder = Holder(vol_a, "flock", "write", 0, 0)
    try:
        assert try_flock(vol_b) == errno.EWOULDBLOCK
        assert try_flock(src / "disk") == errno.EWOULDBLOCK
        assert a.xattr(vol_a, "locks") == f"{holder.proc.pid}:{comm(holder.proc.pid)} write 0-max\n"
    finally:
        holder.close()
    wait_for(lambda: try_flock(vol_b) == 0, 10, "the flock to go with its holder")
    assert try_flock(src / "disk") == 0


def test_setlkw_waits_then_gets_the_lock_or_ends_with_eintr(
    two_hosts: tuple[Daemon, Daemon, Path],
) -> None:
    a, b, _src = two_hosts
    needs_lock_engine(a)
    vol_a, vol_b = a.volume("gold", "disk"), b.volume("gold", "disk")
    holder = Holder(vol_a, "ofd", "write", 0, 0)
    waiters: list[subprocess.Popen[str]] = []
    try:

        def waiter(path: Path) -> subprocess.Popen[str]:
            p = subprocess.Popen(
                [sys.executable, "-c", WAITER, str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            waiters.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "waiting"
            return p

        # Through B: blocked while A's holder holds it; a signal ends the wait with EINTR.
        w = waiter(vol_b)
        assert stays(lambda: w.poll() is None, 1.0)
        w.send_signal(signal.SIGUSR1)
        assert w.stdout is not None
        assert w.stdout.readline().split() == ["rc", "-1", str(errno.EINTR)]
        # A waiter killed while it waits: the kernel interrupts the request, the daemon ends
        # the wait, and the process can exit.
        w3 = waiter(vol_b)
        assert stays(lambda: w3.poll() is None, 0.5)
        w3.kill()
        w3.wait(10)
        # Another waiter, through A itself this time: granted once the holder is gone.
        w2 = waiter(vol_a)
        assert stays(lambda: w2.poll() is None, 1.0)
        holder.close()
        assert w2.stdout is not None
        assert w2.stdout.readline().split() == ["rc", "0", "0"]
        assert try_ofd(vol_b) == errno.EAGAIN  # now w2 holds it
        assert a.xattr(vol_a, "locks") == f"{w2.pid}:{comm(w2.pid)} write 0-max\n"
    finally:
        holder.close()
        for p in waiters:
            if p.poll() is None:
                p.kill()
            p.wait()
            for f in (p.stdin, p.stdout):
                if f is not None:
                    f.close()


def test_bad_lock_requests_get_the_kernels_errnos(two_hosts: tuple[Daemon, Daemon, Path]) -> None:
    a, b, src = two_hosts
    needs_lock_engine(a)
    vol_a = a.volume("gold", "disk")
    fd = os.open(vol_a, os.O_RDWR)
    try:
        for start, length, err in (
            ((1 << 63) - 1, 10, errno.EOVERFLOW),  # past 2^63
            (-1, 10, errno.EINVAL),
            (5, -10, errno.EINVAL),  # a negative length reaching below 0
        ):
            with pytest.raises(OSError) as info:
                ofd(fd, F_OFD_SETLK, fcntl.F_WRLCK, start, length)
            assert info.value.errno == err, (start, length)
        # A negative length within the file: the range before start.
        ofd(fd, F_OFD_SETLK, fcntl.F_WRLCK, 100, -50)
        assert a.xattr(vol_a, "locks").split()[1:] == ["write", "50-99"]
        assert try_ofd(src / "disk", start=60, length=1) == errno.EAGAIN
        # Unlocking what was never locked is no error, and changes nothing.
        ofd(fd, F_OFD_SETLK, fcntl.F_UNLCK, 1000, 10)
        assert a.xattr(vol_a, "locks").split()[1:] == ["write", "50-99"]
        # Split by an unlock in the middle.
        ofd(fd, F_OFD_SETLK, fcntl.F_UNLCK, 70, 10)
        assert [ln.split()[2] for ln in a.xattr(vol_a, "locks").splitlines()] == [
            "50-69",
            "80-99",
        ]
    finally:
        os.close(fd)
    ro = os.open(vol_a, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            ofd(ro, F_OFD_SETLK, fcntl.F_WRLCK, 0, 1)
        assert info.value.errno == errno.EBADF
        ofd(ro, F_OFD_SETLK, fcntl.F_RDLCK, 0, 1)  # a read lock is fine
    finally:
        os.close(ro)
    # The daemon goes on serving.
    assert (b.volume("gold", "disk")).read_bytes()[:4] == b"\0" * 4
    wait_for(lambda: a.xattr(vol_a, "locks") == "", 10, "locks to go at close")


# Non-blocking lock calls through ctypes (no EINTR retry) while signals keep arriving.
SIGNALLED = r"""
import ctypes, os, signal, struct, sys
signal.signal(signal.SIGUSR1, lambda *a: None)
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(sys.argv[1], os.O_RDWR)
print("ready", flush=True)
errs = {}
for i in range(int(sys.argv[2])):
    for cmd, typ in ((36, 1), (37, 1), (37, 2)):
        buf = ctypes.create_string_buffer(struct.pack("hhqqi4x", typ, 0, i, 1, 0), 32)
        if libc.fcntl(fd, cmd, buf) != 0:
            e = ctypes.get_errno()
            errs[e] = errs.get(e, 0) + 1
print("errors", sorted(errs.items()), flush=True)
"""


def test_signals_never_turn_getlk_or_setlk_into_eintr(
    two_hosts: tuple[Daemon, Daemon, Path],
) -> None:
    """The kernel sends an INTERRUPT for any signal a caller gets during a request; a lock
    call that does not wait must still answer as natively (qemu failed on EINTR here)."""
    a, _b, _src = two_hosts
    needs_lock_engine(a)
    p = subprocess.Popen(
        [sys.executable, "-c", SIGNALLED, str(a.volume("gold", "disk")), "1500"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        sent = 0
        while p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGUSR1)
                sent += 1
            time.sleep(0.0005)
        assert p.stdout.readline().strip() == "errors []"
        assert sent > 100
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        if p.stdout is not None:
            p.stdout.close()


def qemu_vm(disk: Path, log: Path) -> subprocess.Popen[bytes]:
    """A paused VM (TCG) whose virtio-blk disk is *disk*, as libvirt would start it."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["qemu-system-x86_64", "-S", "-machine", "q35,accel=tcg", "-nodefaults",
             "-display", "none", "-m", "64", "-monitor", "none", "-serial", "none",
             "-blockdev", f"driver=file,filename={disk},node-name=f0,cache.direct=on",
             "-blockdev", "driver=raw,file=f0,node-name=d0",
             "-device", "virtio-blk-pci,drive=d0"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip


def qemu_io_rw(path: Path) -> subprocess.CompletedProcess[str]:
    return run("qemu-io", "-f", "raw", "-c", "read 0 4k", path, check=False)


def test_qemu_vm_locks_its_disk_against_other_hosts(
    two_hosts: tuple[Daemon, Daemon, Path], tmp_path: Path
) -> None:
    a, b, src = two_hosts
    needs_lock_engine(a)
    vol_a, vol_b = a.volume("gold", "disk"), b.volume("gold", "disk")
    vm = qemu_vm(vol_a, tmp_path / "qemu.log")
    try:
        # qemu takes its locks while it opens the disk, before it pauses.
        wait_for(lambda: a.xattr(vol_a, "locks") != "" or vm.poll() is not None, 60, "qemu")
        assert vm.poll() is None, (tmp_path / "qemu.log").read_text()
        assert f"{vm.pid}:qemu-system-x86" in a.xattr(vol_a, "locks")
        for path in (vol_b, src / "disk"):
            res = qemu_io_rw(path)
            assert res.returncode != 0 and LOCK_ERROR in res.stderr, (path, res)
    finally:
        if vm.poll() is None:
            vm.terminate()
        try:
            vm.wait(30)
        except subprocess.TimeoutExpired:
            vm.kill()
            vm.wait()
    # After the VM exits (its RELEASE follows a moment later), both may open the disk.
    wait_for(lambda: qemu_io_rw(vol_b).returncode == 0, 10, "qemu-io through mount B")
    wait_for(lambda: qemu_io_rw(src / "disk").returncode == 0, 10, "qemu-io on the backing file")
    assert a.xattr(vol_a, "locks") == ""


def test_pyfuse3_warns_once_that_locks_stay_local_on_nfs(daemon: Daemon) -> None:
    """The NFS export is never opened here (nothing mounts it): only the start-up check."""
    daemon.add_bind_export("gold")
    daemon.exports["far"] = {"source": "192.0.2.1:/far", "fstype": "nfs4", "options": "hard"}
    warning = r"pyfuse3 engine keeps fcntl/flock locks inside this mount.*far"
    daemon.allowed_warnings = [warning]
    daemon.start()
    lines = [ln for ln in daemon.log().splitlines() if re.search(warning, ln)]
    assert len(lines) == (0 if daemon.own_engine else 1), lines
    assert all(" WARNING " in ln for ln in lines)
