"""Tier (c): what differs between the engines, checked on a real mount of the real daemon.

* engine selection (``auto`` picks passthrough on this kernel) and the INIT negotiation as
  the kernel accepted it (``/sys/fs/fuse/connections``);
* passthrough really used: the daemon sees no READ/WRITE for a passthrough file, and no
  ``GETXATTR security.capability`` probe per write (FUSE_HANDLE_KILLPRIV_V2); pyfuse3 for
  comparison sees both;
* the fallback: an export with ``io_timeout`` is served by the engine itself, still without
  the probe;
* a request interrupted mid-flight (a reader stuck on a hung export gets a signal);
* FORGET accounting after the kernel drops its inode cache;
* set-user-ID cleared when an unprivileged caller writes (killpriv), on both engines.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PUBLIC_DIR
from tests.mount.harness import Daemon, as_nobody, run, wait_for
from tests.mount.test_faults import HangFs, hangfs  # noqa: F401  (fixture)

MiB = 1 << 20


def stats(daemon: Daemon) -> dict[str, Any]:
    return dict(json.loads(daemon.xattr(daemon.mnt, "engine_stats")))


def requests(daemon: Daemon) -> dict[str, int]:
    return dict(stats(daemon)["requests"])


def delta(before: dict[str, int], after: dict[str, int], key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


def only(daemon: Daemon, mode: str) -> None:
    """Skip unless the daemon runs in *mode* (pyfuse3, passthrough or fallback)."""
    if daemon.mode != mode:
        pytest.skip(f"{mode} engine only")


def only_own(daemon: Daemon) -> None:
    """Skip unless the daemon runs the own engine (with or without kernel passthrough)."""
    if not daemon.own_engine:
        pytest.skip("own engine only")


def test_auto_picks_passthrough_on_this_kernel(daemon: Daemon) -> None:
    only(daemon, "passthrough")
    daemon.add_bind_export("gold", {"a": b"x" * 4096})
    daemon.write_config(engine="auto")
    daemon.start()
    assert daemon.xattr(daemon.mnt, "engine") == "passthrough"
    assert "engine: passthrough (auto: kernel FUSE protocol 7." in daemon.log()
    # The probe mount is gone again.
    probes = [
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if "engine-probe" in line
    ]
    assert probes == []


def test_init_negotiation_as_the_kernel_took_it(daemon: Daemon) -> None:
    only(daemon, "passthrough")
    daemon.add_bind_export("gold", {"a": b"x" * 4096})
    daemon.start()
    st = stats(daemon)
    major, minor = (int(x) for x in st["protocol"].split("."))
    assert (major, minor) >= (7, 40)
    for flag in (
        "PASSTHROUGH",
        "HANDLE_KILLPRIV_V2",
        "INIT_EXT",
        "MAX_PAGES",
        "DO_READDIRPLUS",
        "POSIX_LOCKS",
        "FLOCK_LOCKS",
    ):
        assert flag in st["flags"], st
    assert st["passthrough"] is True
    assert st["max_write"] == MiB and st["max_stack_depth"] == 2
    # The kernel's own view of the connection (fusectl, mounted privately for this test):
    # the max_background and congestion threshold our INIT reply set.
    ctl = daemon.base / "fusectl"
    ctl.mkdir()
    run("mount", "-t", "fusectl", "fusectl", str(ctl))
    try:
        conn = ctl / str(os.minor(os.stat(daemon.mnt).st_dev))
        assert (conn / "max_background").read_text().strip() == "64"
        assert (conn / "congestion_threshold").read_text().strip() == "48"
    finally:
        run("umount", str(ctl))
    # 1 MiB requests: one O_DIRECT read of 1 MiB through the fallback path is one READ.
    assert "max_write 1048576" in daemon.log()


def _write_and_read(path: Path, direct: bool) -> None:
    flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    try:
        import mmap

        buf = mmap.mmap(-1, 4096)
        for i in range(256):
            buf[:8] = i.to_bytes(8, "little")
            assert os.pwritev(fd, [buf], i * 4096) == 4096
        for i in range(256):
            assert os.preadv(fd, [buf], i * 4096) == 4096
            assert int.from_bytes(buf[:8], "little") == i
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "o_direct"])
def test_data_path_requests_seen_by_the_daemon(daemon: Daemon, direct: bool) -> None:
    """256 writes and 256 reads of 4 KiB: what reaches the daemon depends on the engine."""
    daemon.add_bind_export("gold", {"disk": b"\0" * MiB})
    daemon.start()
    vol = daemon.volume("gold", "disk")
    os.stat(vol)
    before = requests(daemon)
    _write_and_read(vol, direct)
    after = requests(daemon)
    seen = {k: delta(before, after, k) for k in ("READ", "WRITE", "GETXATTR_security", "OPEN")}
    print(f"{daemon.engine} {'O_DIRECT' if direct else 'buffered'}: {seen}")
    assert seen["OPEN"] == 1
    if daemon.passthrough:
        assert after.get("open_passthrough", 0) - before.get("open_passthrough", 0) == 1
        assert seen["READ"] == 0 and seen["WRITE"] == 0
        # HANDLE_KILLPRIV_V2 (so SB_NOSEC): the kernel probes security.capability at most
        # once per inode and then caches "no privileges to kill" (S_NOSEC).
        assert seen["GETXATTR_security"] <= 1
    else:
        assert seen["WRITE"] >= 256
        if daemon.own_engine:
            # Served by the own engine (kernel_passthrough = off): every write and every
            # read the page cache cannot answer comes here, but HANDLE_KILLPRIV_V2 still
            # spares the per-write probe.
            assert seen["READ"] == 256 if direct else seen["READ"] >= 1
            assert after.get("open_fallback", 0) - before.get("open_fallback", 0) == 1
            assert seen["GETXATTR_security"] <= 1
        elif not direct:
            # pyfuse3 cannot negotiate HANDLE_KILLPRIV_V2: every buffered write is preceded
            # by a GETXATTR security.capability round trip.
            assert seen["GETXATTR_security"] >= 256


def test_io_timeout_export_is_served_by_the_engine(daemon: Daemon) -> None:
    """Fallback: only I/O that reaches fusemux can keep io_timeout's promise, so such an
    export's files are not passed through; the engine serves READ/WRITE, still without the
    capability probe."""
    only_own(daemon)
    daemon.add_bind_export("gold", {"disk": b"\0" * MiB})
    daemon.exports["gold"]["io_timeout"] = 30
    daemon.start()
    vol = daemon.volume("gold", "disk")
    os.stat(vol)
    before = requests(daemon)
    _write_and_read(vol, direct=True)
    after = requests(daemon)
    assert delta(before, after, "open_fallback") == 1
    assert delta(before, after, "open_passthrough") == 0
    assert delta(before, after, "WRITE") == 256 and delta(before, after, "READ") == 256
    assert delta(before, after, "GETXATTR_security") <= 1


READER = """
import os, signal, sys
def stop(signum, frame):
    raise SystemExit(42)
signal.signal(signal.SIGUSR1, stop)
fd = os.open(sys.argv[1], os.O_RDONLY)
print("open", flush=True)
sys.stdin.readline()  # read only once the test has blocked the backend
os.pread(fd, 4096, 0)
sys.exit(3)
"""


def test_interrupt_ends_a_read_stuck_on_a_hung_export(
    hangfs: HangFs,  # noqa: F811
    daemon: Daemon,
) -> None:
    """A reader blocked in a read the daemon cannot finish (hung backend) gets a signal: the
    kernel sends INTERRUPT, the engine cancels the request and answers EINTR, the reader's
    handler runs at once. (io_timeout 600 keeps the read on the engine's own path.)"""
    only_own(daemon)
    daemon.exports["sick"] = {
        "source": str(hangfs.mnt),
        "fstype": "none",
        "options": "bind",
        "io_timeout": 600,
    }
    daemon.allowed_warnings = [r"export sick: .*(timed out|not answering)"]
    daemon.start()
    vol = daemon.volume("sick", "vol1")
    os.stat(vol)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(vol)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline().strip() == "open"
        hangfs.block()
        reader.stdin.write("go\n")
        reader.stdin.flush()
        wait_for(lambda: hangfs.waiting() >= 1, 10, "the read to block inside hangfs")
        if daemon.passthrough:
            # A harmless signal (the kernel sends INTERRUPT for any signal) does not fail
            # the read: natively a read never returns EINTR either.
            reader.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            assert reader.poll() is None, "a non-fatal signal ended the read"
            assert requests(daemon).get("INTERRUPT", 0) >= 1
            assert requests(daemon).get("interrupted", 0) == 0
        # A fatal one does: the daemon sees SIGKILL pending on its caller, cancels the read
        # and answers EINTR (the kernel would otherwise wait for the answer forever). Without
        # kernel passthrough the open is cached (as with pyfuse3): the read waits on a page
        # lock for a readahead request, which the kill itself ends.
        t0 = time.monotonic()
        reader.kill()
        rc = reader.wait(10)
        took = time.monotonic() - t0
        assert rc == -signal.SIGKILL, rc
        assert took < 5, took
        if daemon.passthrough:
            assert requests(daemon).get("interrupted", 0) >= 1
    finally:
        hangfs.unblock()
        if reader.poll() is None:
            reader.kill()
            reader.wait(10)


def test_forget_accounting_after_the_kernel_drops_its_caches(daemon: Daemon) -> None:
    only_own(daemon)
    files = {f"vol{i:03d}": b"v" for i in range(300)}
    daemon.add_bind_export("gold", files)
    daemon.start()
    exp = daemon.volumes("gold")
    names = os.listdir(exp)  # READDIRPLUS: each entry counts as a lookup
    assert len(names) == 300
    for name in names:
        os.stat(exp / name)
    looked_up = stats(daemon)["nodes_looked_up"]
    assert looked_up >= 300
    Path("/proc/sys/vm/drop_caches").write_text("2\n")  # dentries and inodes

    def forgotten() -> bool:
        st = stats(daemon)
        return bool(st["nodes_looked_up"] < 50)

    wait_for(forgotten, 10, "the kernel's FORGETs")
    req = requests(daemon)
    assert req.get("FORGET", 0) + req.get("BATCH_FORGET", 0) >= 1
    assert req.get("forget_errors", 0) == 0  # never below zero
    # And the names still resolve afterwards (fresh lookups).
    assert (exp / "vol123").stat().st_size == 1


def test_unprivileged_write_clears_setuid(daemon: Daemon) -> None:
    """HANDLE_KILLPRIV_V2 makes clearing set-ID bits the server's job (the passthrough engine;
    pyfuse3's libfuse leaves it to the kernel). Either way a write by an unprivileged user
    must clear set-user-ID, and set-group-ID where group-execute is set."""
    src = daemon.add_bind_export("gold", {"disk": b"\0" * 4096})
    (src / "disk").chmod(0o6777)
    PUBLIC_DIR.mkdir(mode=0o755, exist_ok=True)
    daemon.mnt = Path(tempfile.mkdtemp(dir=PUBLIC_DIR))
    daemon.mnt.chmod(0o755)
    daemon.start()
    vol = daemon.volume("gold", "disk")
    out = as_nobody("dd", "if=/dev/zero", f"of={vol}", "bs=4096", "count=1", "conv=notrunc")
    assert out.returncode == 0, out.stderr
    mode = (src / "disk").stat().st_mode
    assert not mode & stat.S_ISUID, oct(mode)
    assert not mode & stat.S_ISGID, oct(mode)
    assert stat.S_IMODE(mode) == 0o777


def test_restart_clears_a_probe_mount_left_by_a_killed_daemon(daemon: Daemon) -> None:
    """auto's probe mount lives for milliseconds, but a daemon killed in them leaves a dead
    FUSE mount under state_dir: the next start detaches it (never stat()ing it)."""
    only(daemon, "passthrough")
    from fusemux.core.mounter import MNT_DETACH, umount2
    from fusemux.engines.kernel import kernel_mount

    daemon.add_bind_export("gold", {"a": b"x"})
    daemon.write_config(engine="auto")
    daemon.state.mkdir(parents=True, exist_ok=True)
    stale = daemon.state / "engine-probe.999999"
    stale.mkdir()
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        kernel_mount(fd, str(stale), fsname="fusemux-probe")
    finally:
        os.close(fd)  # the "daemon" is gone: the mount is dead (ENOTCONN)
    daemon.allowed_warnings = []
    try:
        daemon.start()
        assert "detaching a stale engine probe mount" in daemon.log()
        mounts = Path("/proc/self/mountinfo").read_text()
        assert str(stale) not in mounts
        assert daemon.xattr(daemon.mnt, "engine") == "passthrough"
    finally:
        if str(stale) in Path("/proc/self/mountinfo").read_text():
            umount2(str(stale), MNT_DETACH)  # never umount(8) a dead FUSE mount
