"""The NFS tier's guest agent: PID 1 of the qemu guest, driving scenarios for the host.

It is copied onto the guest's payload disk as ``/payload/agent.py`` and started by the
initramfs with ``switch_root``. It talks to the host's pytest over the second serial port
(``/dev/ttyS1``, raw mode) in JSON lines:

- host -> guest ``{"cmd": "run", "scenario": NAME, "args": {...}}``; the guest answers
  ``{"event": "result", "ok": true, "data": {...}}`` or ``{"ok": false, "error": TRACEBACK}``;
- while a scenario runs it may ask the host to act on the NFS servers:
  guest -> host ``{"event": "host", "op": OP, ...}``, host -> guest ``{"reply": ...}``;
- host -> guest ``{"cmd": "quit"}``: stop fusemux, unmount, power off.

The agent starts the real fusemux daemon (``python3 -m fusemux serve``) from the checkout's
source copied to ``/payload/src``, with ``/payload/fusemux.toml``. Scenarios measure what the
guest sees (errnos, latencies) and return it; the host-side tests assert on it. This file
runs on the guest's Python 3.11 with the standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import faulthandler
import fcntl
import hashlib
import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import traceback
import tty
from collections.abc import Callable
from typing import Any

MNT = "/mnt/fm"
STATE = "/run/fusemux"
LOG = "/tmp/fusemux.log"
CHUNK = 64 * 1024
ENV = dict(
    os.environ, PYTHONPATH="/payload/src:/opt/fusemux-deps", PATH="/usr/sbin:/usr/bin:/sbin:/bin"
)


class Channel:
    """JSON lines over the raw serial port."""

    def __init__(self, path: str = "/dev/ttyS1") -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)
        attrs = termios.tcgetattr(self.fd)
        attrs[4] = attrs[5] = termios.B115200
        termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
        self.buf = b""
        self.lock = threading.Lock()

    def send(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj) + "\n").encode()
        with self.lock:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]

    def recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = os.read(self.fd, 4096)
            if not chunk:
                time.sleep(0.01)
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        text = line.decode(errors="replace").strip()
        if not text.startswith("{"):
            return self.recv()  # line noise from before the host connected
        result: dict[str, Any] = json.loads(text)
        return result


chan: Channel
daemon: subprocess.Popen[bytes] | None = None


def host(op: str, **kw: Any) -> Any:
    """Ask the host to do *op* (stop/cont/kill/start a server, read or write its files)."""
    chan.send({"event": "host", "op": op, **kw})
    return chan.recv()["reply"]


def log(msg: str) -> None:
    print(f"agent: {msg}", flush=True)


# -- fusemux helpers ----------------------------------------------------------------------


def vol(export: str, name: str = "vol") -> str:
    return f"{MNT}/volumes/{export}/{name}"


def xattr(export: str, key: str) -> str:
    return os.getxattr(f"{MNT}/volumes/{export}", "user.fusemux." + key).decode()


def timed(fn: Callable[[], Any]) -> tuple[float, Any, int | None]:
    """(seconds, result, errno or None) of fn()."""
    t0 = time.monotonic()
    try:
        res = fn()
        return time.monotonic() - t0, res, None
    except OSError as e:
        return time.monotonic() - t0, None, e.errno


def ename(err: int | None) -> str | None:
    return None if err is None else errno.errorcode.get(err, str(err))


def wait_state(export: str, want: str, timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if xattr(export, "state") == want:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"{export}: state {xattr(export, 'state')!r}, wanted {want!r}")


def backing_mounted(export: str) -> bool:
    target = f"{STATE}/mnt/{export}"
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def pattern(seed: int, size: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * (CHUNK // 32)
    return (block * (size // len(block) + 1))[:size]


def md5_file(path: str, size: int | None = None) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        left = size if size is not None else 1 << 62
        while left > 0:
            b = f.read(min(1 << 20, left))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def pread_all(fd: int, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        b = os.pread(fd, min(1 << 20, size - len(out)), len(out))
        if not b:
            break
        out += b
    return bytes(out)


def status_json() -> tuple[float, Any, str]:
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "fusemux", "status", MNT, "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    dt = time.monotonic() - t0
    try:
        return dt, json.loads(p.stdout), p.stderr
    except ValueError:
        return dt, None, p.stdout + p.stderr


def log_tail(n: int = 30) -> list[str]:
    with open(LOG, errors="replace") as f:
        return f.read().splitlines()[-n:]


# -- scenarios ----------------------------------------------------------------------------


def sc_boot(args: dict[str, Any]) -> dict[str, Any]:
    """The daemon is up; nothing is mounted yet."""
    exports = sorted(os.listdir(f"{MNT}/volumes"))
    return {
        "exports": exports,
        "states": {e: xattr(e, "state") for e in exports},
        "uptime": float(open("/proc/uptime").read().split()[0]),
        "kernel": os.uname().release,
        "engine": os.getxattr(MNT, "user.fusemux.engine").decode(),
        "engine_stats": json.loads(os.getxattr(MNT, "user.fusemux.engine_stats")),
    }


def sc_roundtrip(args: dict[str, Any]) -> dict[str, Any]:
    """Lazy mount on first open, data both ways, unmount after the last close (linger 0)."""
    export = args["export"]
    size = args["size"]
    out: dict[str, Any] = {
        "before": xattr(export, "state"),
        "mounted_before": backing_mounted(export),
    }
    count0 = int(xattr(export, "mount_count"))
    t0 = time.monotonic()
    fd = os.open(vol(export), os.O_RDWR)
    out["open_s"] = time.monotonic() - t0
    out["state_open"] = xattr(export, "state")
    out["holders_open"] = xattr(export, "holders")
    out["mounted_open"] = backing_mounted(export)
    data = pread_all(fd, size)
    out["guest_md5_initial"] = hashlib.md5(data).hexdigest()
    new = pattern(args["seed"], CHUNK * 4)
    os.pwrite(fd, new, CHUNK)
    os.fsync(fd)
    os.close(fd)
    t1 = time.monotonic()
    out["unmount_s"] = wait_state(export, "unmounted")
    out["unmount_s"] = time.monotonic() - t1
    out["mounted_after_close"] = backing_mounted(export)
    out["mount_count_delta"] = int(xattr(export, "mount_count")) - count0
    out["written_md5"] = hashlib.md5(new).hexdigest()
    out["server_md5_written"] = host("md5", path=args["server_path"], offset=CHUNK, size=len(new))
    # The other way round: the server writes, the guest reads through a fresh mount.
    host("write", path=args["server_path"], offset=0, seed=args["seed"] + 1, size=CHUNK)
    with open(vol(export), "rb") as f:
        out["guest_md5_server_write"] = hashlib.md5(f.read(CHUNK)).hexdigest()
    out["server_write_md5"] = hashlib.md5(pattern(args["seed"] + 1, CHUNK)).hexdigest()
    wait_state(export, "unmounted")
    out["mount_count_total"] = int(xattr(export, "mount_count")) - count0
    return out


def sc_unreachable(args: dict[str, Any]) -> dict[str, Any]:
    """A dead server at mount time: a clean errno within mount_timeout; others unaffected."""
    dead, other = args["export"], args["other"]
    res: dict[str, Any] = {}

    def try_dead() -> None:
        dt, _, err = timed(lambda: os.close(os.open(vol(dead), os.O_RDONLY)))
        res["open_s"], res["open_errno"] = dt, ename(err)

    # The other export stays open (linger 0 would remount it per open): O_DIRECT reads.
    ofd = os.open(vol(other), os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, CHUNK)
    t = threading.Thread(target=try_dead)
    t.start()
    time.sleep(0.5)
    res["state_during"] = xattr(dead, "state")
    lat: list[float] = []
    while t.is_alive():
        dt, _, err = timed(lambda: os.preadv(ofd, [buf], (len(lat) * CHUNK) % (1 << 20)))
        lat.append(round(dt, 3))
        assert err is None, ename(err)
        time.sleep(0.1)
    t.join()
    os.close(ofd)
    res["other_read_s"] = lat
    res["state_after"] = xattr(dead, "state")
    res["last_error"] = xattr(dead, "last_error")
    dt, _, err = timed(lambda: os.close(os.open(vol(dead), os.O_RDONLY)))
    res["second_open_s"], res["second_errno"] = dt, ename(err)
    res["log"] = [line for line in log_tail(40) if dead in line][-5:]
    return res


STATUS_STRETCH = 3.0


def sc_outage(args: dict[str, Any]) -> dict[str, Any]:
    """SIGSTOP the server under a reader; measure other exports, xattrs, status; SIGCONT."""
    export, other = args["export"], args["other"]
    size, outage = args["size"], args["outage"]
    res: dict[str, Any] = {}
    t_stop = 0.0
    # O_DIRECT, as qemu's cache=none opens disks: every read goes to the NFS server.
    fd = os.open(vol(export), os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, CHUNK)
    want = host("md5", path=args["server_path"], offset=0, size=size)
    stop = threading.Event()
    reads: list[tuple[float, float, str | None]] = []  # (start, seconds, errno)

    def reader() -> None:
        off = 0
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                os.preadv(fd, [buf], off)
                e = None
            except OSError as ex:
                e = ename(ex.errno)
            reads.append((t0, time.monotonic() - t0, e))
            off = (off + CHUNK) % size
            time.sleep(0.05)

    res["status_baseline_s"] = status_json()[0]  # with the server up, for comparison
    th = threading.Thread(target=reader)
    th.start()
    # The export's health xattr, sampled from the stop until it is ok again after the resume.
    health: list[tuple[float, str]] = []
    health_done = threading.Event()
    t_cont = 0.0

    def health_sampler() -> None:
        while not health_done.is_set():
            try:
                value = xattr(export, "health")
            except OSError as e:
                value = f"error {ename(e.errno)}"
            if not health or health[-1][1] != value:
                health.append((round(time.monotonic() - t_stop, 2), value))
            if t_cont and value == "ok" and len(health) > 1:
                return
            time.sleep(0.2)

    time.sleep(1.0)
    t_stop = time.monotonic()
    health_th = threading.Thread(target=health_sampler)
    health_th.start()
    host("signal", server="a", sig="STOP")
    log("server a stopped")
    time.sleep(0.3)
    # During the outage: fusemux status (started first: Python starts slowly under TCG),
    # the healthy export, the admin xattrs.
    sj: dict[str, Any] = {}
    t_status = time.monotonic()
    status_th = threading.Thread(target=lambda: sj.update(r=status_json()))
    status_th.start()
    other_lat: list[float] = []
    buf2 = mmap.mmap(-1, CHUNK)
    ofd = os.open(vol(other), os.O_RDONLY | os.O_DIRECT)
    try:
        while time.monotonic() - t_stop < outage - 1.0:
            t0 = time.monotonic()
            os.preadv(ofd, [buf2], (len(other_lat) * CHUNK) % (1 << 20))
            other_lat.append(round(time.monotonic() - t0, 3))
            time.sleep(0.1)
    finally:
        os.close(ofd)
    res["other_read_s"] = other_lat
    log("other export read")
    dt, st, err = timed(lambda: xattr(export, "state"))
    res["xattr_state_s"], res["xattr_state"] = dt, st
    dt, h, err = timed(lambda: xattr(export, "holders"))
    res["xattr_holders_s"], res["xattr_holders"] = dt, h
    log("xattrs read")
    # The outage lasts `outage` seconds, stretched (up to STATUS_STRETCH more) while status
    # is still running: under TCG its start alone takes 2-3 s, and the point is whether it
    # answers while the server is down, not how fast an emulated CPU starts Python.
    status_th.join(timeout=max(0.0, outage + STATUS_STRETCH - (time.monotonic() - t_stop)))
    remaining = outage - (time.monotonic() - t_stop)
    if remaining > 0:
        time.sleep(remaining)
    t_cont = time.monotonic()
    host("signal", server="a", sig="CONT")
    res["stopped_s"] = t_cont - t_stop
    status_th.join(timeout=60)
    res["status_answered_during_outage"] = "r" in sj and t_status + sj["r"][0] < t_cont
    if "r" in sj:
        st, err_text = sj["r"][1], sj["r"][2]
        res["status_s"] = sj["r"][0]
        exports = {e["name"]: e for e in st["exports"]} if isinstance(st, dict) else {}
        res["status_export"] = exports.get(export, err_text)
    # Resume: wait for a read that started after SIGCONT to succeed.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = [r for r in reads if r[0] >= t_cont and r[2] is None]
        if done:
            res["first_ok_after_cont_s"] = done[0][0] + done[0][1] - t_cont
            break
        time.sleep(0.05)
    stop.set()
    th.join(timeout=120)
    res["reader_stuck"] = th.is_alive()
    health_th.join(timeout=30)
    health_done.set()
    res["health"] = health  # [(seconds after the stop, value)], on each change
    res["health_ok_after_cont_s"] = next(
        (round(t - (t_cont - t_stop), 2) for t, v in health if v == "ok" and t > t_cont - t_stop),
        None,
    )
    during = [r for r in reads if t_stop <= r[0] + r[1] and r[0] <= t_cont]
    res["reads_during"] = len(during)
    res["max_read_s"] = round(max((r[1] for r in reads), default=0.0), 3)
    res["read_errnos"] = sorted({r[2] for r in reads if r[2]})
    res["first_err_after_stop_s"] = next(
        (round(r[0] + r[1] - t_stop, 3) for r in reads if r[2] and r[0] + r[1] >= t_stop), None
    )
    # Correct data after the resume, through the same fd and through a fresh open.
    os.close(fd)
    res["md5_reopen"] = md5_file(vol(export), size) == want
    res["state_end"] = xattr(export, "state")
    res["capacity_s"] = timed(lambda: xattr(export, "capacity"))[0]
    return res


def sc_restart(args: dict[str, Any]) -> dict[str, Any]:
    """kill -9 the server under an open volume with fsynced writes, restart it, check data."""
    export = args["export"]
    size = args["size"]
    res: dict[str, Any] = {}
    fd = os.open(vol(export), os.O_RDWR)
    acked = pattern(args["seed"], CHUNK * 8)
    os.pwrite(fd, acked, 0)
    os.fsync(fd)
    host("kill", server="a")
    t_kill = time.monotonic()
    # I/O while the server is dead: one write+fsync and one read, in a thread with a watch.
    out: dict[str, Any] = {}

    def io() -> None:
        t0 = time.monotonic()
        try:
            os.pwrite(fd, pattern(args["seed"] + 1, CHUNK), CHUNK * 16)
            os.fsync(fd)
            os.pread(fd, CHUNK, size - CHUNK)
            out["errno"] = None
        except OSError as e:
            out["errno"] = ename(e.errno)
        out["s"] = time.monotonic() - t0

    th = threading.Thread(target=io)
    th.start()
    time.sleep(args["down"])
    host("start", server="a")
    res["down_s"] = time.monotonic() - t_kill
    th.join(timeout=120)
    res["io_during_errno"] = out.get("errno")
    res["io_during_s"] = out.get("s")
    res["io_stuck"] = th.is_alive()
    # After the restart: the same fd, then a fresh open.
    dt, data, err = timed(lambda: os.pread(fd, len(acked), 0))
    res["same_fd_read_s"], res["same_fd_errno"] = dt, ename(err)
    res["same_fd_ok"] = data == acked
    with contextlib.suppress(OSError):
        os.close(fd)
    with open(vol(export), "rb") as f:
        res["reopen_ok"] = f.read(len(acked)) == acked
    res["server_ok"] = host("md5", path=args["server_path"], offset=0, size=len(acked)) == (
        hashlib.md5(acked).hexdigest()
    )
    res["state_end"] = xattr(export, "state")
    return res


def sc_removed(args: dict[str, Any]) -> dict[str, Any]:
    """The export's directory is removed on the server under an open volume."""
    export = args["export"]
    res: dict[str, Any] = {}
    fd = os.open(vol(export), os.O_RDWR)
    os.pread(fd, CHUNK, 0)
    host("rmtree", path=args["server_dir"])
    out: dict[str, Any] = {}

    def io() -> None:
        t0 = time.monotonic()
        try:
            os.pread(fd, CHUNK, CHUNK * 3)
            os.pwrite(fd, b"x" * 4096, 0)
            os.fsync(fd)
            out["errno"] = None
        except OSError as e:
            out["errno"] = ename(e.errno)
        out["s"] = time.monotonic() - t0

    th = threading.Thread(target=io)
    th.start()
    th.join(timeout=30)
    res["io_stuck"] = th.is_alive()
    res["io_errno"], res["io_s"] = out.get("errno"), out.get("s")
    dt, _, err = timed(lambda: os.close(os.open(vol(export), os.O_RDONLY)))
    res["open_while_gone_s"], res["open_while_gone_errno"] = dt, ename(err)
    dt, names, err = timed(lambda: os.listdir(f"{MNT}/volumes/{export}"))
    res["listdir_s"], res["listdir_errno"] = dt, ename(err)
    with contextlib.suppress(OSError):
        os.close(fd)
    res["state_after_close"] = xattr(export, "state")
    # Recovery: the storage side recreates the export. With nothing open, fusemux unmounts
    # the stale mount after the linger; the next open mounts afresh. If the server still
    # serves the old (deleted) directory, it has to re-export it (a ganesha restart).
    host("restore", path=args["server_dir"], seed=args["seed"], size=args["size"])
    want = hashlib.md5(pattern(args["seed"], args["size"])).hexdigest()
    tries = []
    for step in ("reopen", "server restart"):
        if step == "server restart":
            host("restart", server="a")
        res[f"unmounted_before_{step}_s"] = wait_state(export, "unmounted")
        dt, md5, err = timed(lambda: md5_file(vol(export), args["size"]))
        tries.append({"after": step, "s": round(dt, 3), "errno": ename(err)})
        if err is None:
            res["recovered_by"] = step
            res["recovered_md5_ok"] = md5 == want
            break
    res["recovery_tries"] = tries
    res["state_end"] = xattr(export, "state")
    res["log"] = [line for line in log_tail(60) if export in line][-6:]
    return res


def sc_qemu_io(args: dict[str, Any]) -> dict[str, Any]:
    """qemu-io -t none (O_DIRECT) pattern writes and reads on an NFS-backed volume."""
    export = args["export"]
    cmds = []
    for i, (off, pat) in enumerate([(0, "0xab"), ("1M", "0xcd"), ("3M", "0x5a")]):
        cmds += ["-c", f"write -P {pat} {off} 512k"]
        cmds += ["-c", f"read -P {pat} {off} 512k"]
        del i
    t0 = time.monotonic()
    p = subprocess.run(
        ["qemu-io", "-f", "raw", "-t", "none", *cmds, vol(export)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    res = {
        "rc": p.returncode,
        "s": time.monotonic() - t0,
        "out": p.stdout[-800:],
        "err": p.stderr[-800:],
    }
    p2 = subprocess.run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-t",
            "none",
            "-c",
            "read -P 0xcd 1M 512k",
            "-c",
            "read -P 0xab 0 4k",
            vol(export),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    res["reread_rc"], res["reread_out"] = p2.returncode, p2.stdout[-400:]
    res["pattern_failures"] = (p.stdout + p2.stdout).count("Pattern verification failed")
    res["server_md5"] = host("md5", path=args["server_path"], offset=1 << 20, size=512 * 1024)
    res["want_md5"] = hashlib.md5(b"\xcd" * 512 * 1024).hexdigest()
    wait_state(export, "unmounted")
    return res


def sc_daemon(args: dict[str, Any]) -> dict[str, Any]:
    """The daemon's log: warnings, errors, tracebacks; and whether it is still alive."""
    text = open(LOG, errors="replace").read()
    lines = text.splitlines()
    return {
        "alive": daemon is not None and daemon.poll() is None,
        "tracebacks": text.count("Traceback"),
        "warnings": [ln for ln in lines if " WARNING " in ln][-40:],
        "errors": [ln for ln in lines if " ERROR " in ln or " CRITICAL " in ln][-20:],
    }


F_OFD_SETLK = 37
FLOCK = struct.Struct("hhqqi4x")  # struct flock: l_type l_whence l_start l_len l_pid


def try_lock(path: str, cmd: int = F_OFD_SETLK, typ: int = fcntl.F_WRLCK) -> str | None:
    """A direct open + lock of the whole file (dropped again before the close): errno name."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, cmd, FLOCK.pack(typ, 0, 0, 0, 0))
        fcntl.fcntl(fd, cmd, FLOCK.pack(fcntl.F_UNLCK, 0, 0, 0, 0))
        return None
    except OSError as e:
        return ename(e.errno)
    finally:
        os.close(fd)


def sc_locks(args: dict[str, Any]) -> dict[str, Any]:
    """A VM-style OFD lock through fusemux on an NFS volume, tried from a plain NFS mount of
    the same export (its own superblock: nosharecache, so the server decides) and on the
    server's file; then released by the close."""
    export = args["export"]
    plain = f"/mnt/plain-{export}"
    os.makedirs(plain, exist_ok=True)
    opts = args["options"] + ",nosharecache"
    subprocess.run(
        ["mount", "-t", args["fstype"], "-o", opts, args["source"], plain],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    res: dict[str, Any] = {"engine": os.getxattr(MNT, "user.fusemux.engine").decode()}
    try:
        res["plain_before"] = try_lock(f"{plain}/vol")
        fd = os.open(vol(export), os.O_RDWR)
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, FLOCK.pack(fcntl.F_WRLCK, 0, 0, 0, 0))
            res["locks_xattr"] = os.getxattr(vol(export), "user.fusemux.locks").decode()
            res["plain_ofd"] = try_lock(f"{plain}/vol")
            res["plain_ofd_read"] = try_lock(f"{plain}/vol", typ=fcntl.F_RDLCK)
            res["plain_posix"] = try_lock(f"{plain}/vol", cmd=fcntl.F_SETLK)
            res["server_ofd"] = host("trylock", path=args["server_path"])
        finally:
            os.close(fd)
        t0 = time.monotonic()
        while True:
            res["plain_after"] = try_lock(f"{plain}/vol")
            if res["plain_after"] is None or time.monotonic() - t0 > 10:
                break
            time.sleep(0.1)
        res["release_s"] = round(time.monotonic() - t0, 2)
        res["server_after"] = host("trylock", path=args["server_path"])
    finally:
        subprocess.run(["umount", plain], capture_output=True, timeout=60)
    wait_state(export, "unmounted")
    return res


SCENARIOS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "boot": sc_boot,
    "roundtrip": sc_roundtrip,
    "unreachable": sc_unreachable,
    "outage": sc_outage,
    "restart": sc_restart,
    "removed": sc_removed,
    "qemu_io": sc_qemu_io,
    "locks": sc_locks,
    "daemon": sc_daemon,
}


# -- lifecycle ----------------------------------------------------------------------------


def start_daemon() -> subprocess.Popen[bytes]:
    os.makedirs(MNT, exist_ok=True)
    logf = open(LOG, "ab")
    p = subprocess.Popen(
        [sys.executable, "-m", "fusemux", "serve", MNT, "--config", "/payload/fusemux.toml", "-v"],
        stdin=subprocess.DEVNULL,
        stdout=logf,
        stderr=logf,
        env=ENV,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError("fusemux exited: " + "\n".join(log_tail()))
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == MNT for line in f) and " serving " in open(LOG).read():
                return p
        time.sleep(0.1)
    raise RuntimeError("fusemux did not come up: " + "\n".join(log_tail()))


def stop_daemon() -> int | None:
    if daemon is None or daemon.poll() is not None:
        return None if daemon is None else daemon.returncode
    daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(30)
    except subprocess.TimeoutExpired:
        daemon.send_signal(signal.SIGTERM)  # the second signal stops it with volumes open
        try:
            return daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            return daemon.wait()


def dump_state(name: str) -> None:
    """For a scenario that hangs: every thread's stack and the daemon's log, on the console."""
    log(f"scenario {name} still running after 60s; threads and daemon log follow")
    faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
    for line in log_tail(40):
        log("fusemux: " + line)
    sys.stdout.flush()


def poweroff() -> None:
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
    os._exit(0)


def main() -> None:
    global chan, daemon
    for fs, where in (("tmpfs", "/tmp"), ("tmpfs", "/run")):
        subprocess.run(["mount", "-t", fs, fs, where], check=True)
    chan = Channel()
    try:
        daemon = start_daemon()
        chan.send({"event": "ready"})
    except Exception:
        chan.send({"event": "fatal", "error": traceback.format_exc()})
        poweroff()
    while True:
        msg = chan.recv()
        if msg.get("cmd") == "quit":
            rc = stop_daemon()
            with open("/proc/self/mountinfo") as f:
                left = [ln.split()[4] for ln in f if ln.split()[4].startswith((MNT, STATE))]
            chan.send({"event": "bye", "daemon_rc": rc, "left_mounts": left, "log": log_tail(15)})
            poweroff()
        if msg.get("cmd") != "run":
            continue
        name = msg["scenario"]
        log(f"scenario {name} {msg.get('args')}")
        watchdog = threading.Timer(60.0, dump_state, args=(name,))
        watchdog.daemon = True
        watchdog.start()
        try:
            data = SCENARIOS[name](msg.get("args", {}))
            chan.send({"event": "result", "ok": True, "data": data})
        except Exception:
            chan.send(
                {"event": "result", "ok": False, "error": traceback.format_exc(), "log": log_tail()}
            )
        finally:
            watchdog.cancel()


if __name__ == "__main__":
    try:
        main()
    finally:
        poweroff()
