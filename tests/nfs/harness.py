"""Host side of the NFS tier: nfs-ganesha servers, rpcbind and the qemu guest.

Runs inside ``scripts/nfs-sandbox.sh`` (a private network, mount and PID namespace), so the
servers use the standard ports on a private loopback. Two servers:

- ``a`` (NFSv3 + v4, with rpcbind): the one the scenarios stop, kill and restart; guest
  address ``10.0.2.100`` (2049 NFS, 20048 MOUNT);
- ``b`` (NFSv4 only): the healthy "other export"; guest address ``10.0.2.102`` (2049).

The guest reaches them through qemu user networking with ``restrict=on`` and ``guestfwd``
rules that run ``busybox nc`` to the server's port. ``10.0.2.101`` has no rule: a server
that does not answer.

Every process is started with ``Popen`` and kept: ``close()`` stops them by PID (SIGCONT
first, in case a scenario left a server stopped), in ``finally`` of the session fixture.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.nfs.image import RELEASE, Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHUNK = 64 * 1024
VOLUME_SIZE = 8 << 20

GUEST_A = "10.0.2.100"
GUEST_DEAD = "10.0.2.101"
GUEST_B = "10.0.2.102"
CINDER_SHARE = f"{GUEST_A}:/cinder"
CINDER_EXPORT = hashlib.md5(CINDER_SHARE.encode()).hexdigest()

# NFSv4.2 on the bookworm guest. The trixie guest's kernel (6.12) reads with READ_PLUS
# (CONFIG_NFS_V4_2_READ_PLUS=y), and every 4.2 read from the host's nfs-ganesha 4.3 (Debian
# 12) then fails with EIO, so that guest mounts v4.1 (measured; see docs/nfs.md).
V4_VERS = "4.1" if RELEASE == "trixie" else "4.2"
V4 = f"vers={V4_VERS},proto=tcp,port=2049,clientaddr=10.0.2.15"
V3 = "vers=3,proto=tcp,port=2049,mountproto=tcp,mountport=20048,nolock"
SOFT = "soft,timeo=10,retrans=1"
# fusemux export name -> (server, server directory, fstype, options)
EXPORTS: dict[str, tuple[str, str, str, str]] = {
    "v4hard": ("a", "v4hard", "nfs4", f"{V4},addr={GUEST_A},hard"),
    "v4soft": ("a", "v4soft", "nfs4", f"{V4},addr={GUEST_A},{SOFT}"),
    "v3hard": ("a", "v3hard", "nfs", f"{V3},addr={GUEST_A},mountaddr={GUEST_A},hard"),
    "v3soft": ("a", "v3soft", "nfs", f"{V3},addr={GUEST_A},mountaddr={GUEST_A},{SOFT}"),
    # v4 soft never times out while the server is merely stopped: fusemux's io_timeout does.
    "v4timeo": ("a", "v4timeo", "nfs4", f"{V4},addr={GUEST_A},{SOFT}"),
    "gone": ("a", "gone", "nfs4", f"{V4},addr={GUEST_A},hard"),
    "other": ("b", "other", "nfs4", f"{V4},addr={GUEST_B},hard"),
    "dead": ("-", "dead", "nfs4", f"{V4},addr={GUEST_DEAD},hard"),
}
MOUNT_TIMEOUT = 6.0
# The FUSE engine the guest's fusemux runs (make test-nfs runs the tier once per engine). The
# Debian 12 guest's kernel (6.1, FUSE 7.38) has no passthrough, so there the passthrough
# engine serves every read and write itself: the same protocol code, on its fallback path.
# The Debian 13 guest's (6.12) has it (FUSEMUX_NFS_RELEASE=trixie, see tests/nfs/image.py).
ENGINE = os.environ.get("FUSEMUX_NFS_ENGINE", "pyfuse3")
IO_TIMEOUTS = {"v4timeo": 2.0}  # exports with fusemux's own io_timeout


def pattern(seed: int, size: int) -> bytes:
    """The same byte pattern as the guest agent's ``pattern()``."""
    block = hashlib.sha256(str(seed).encode()).digest() * (CHUNK // 32)
    return (block * (size // len(block) + 1))[:size]


def stop_process(p: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGCONT + SIGTERM, then SIGKILL; always waited for."""
    if p is None or p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        p.send_signal(signal.SIGCONT)
        p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


class Ganesha:
    """One nfs-ganesha server with one export per directory under ``root``."""

    def __init__(self, name: str, base: Path, nfs_port: int, mnt_port: int, v3: bool) -> None:
        self.name = name
        self.base = base / f"ganesha-{name}"
        self.root = self.base / "srv"
        self.nfs_port, self.mnt_port, self.v3 = nfs_port, mnt_port, v3
        self.proc: subprocess.Popen[bytes] | None = None
        self.exports: list[str] = []
        self.root.mkdir(parents=True)
        (self.base / "recovery").mkdir()

    def add_export(self, pseudo: str) -> Path:
        self.exports.append(pseudo)
        d = self.root / pseudo
        d.mkdir()
        return d

    def conf(self) -> str:
        protos = "3, 4" if self.v3 else "4"
        out = [
            "NFS_CORE_PARAM {",
            f"  NFS_Port = {self.nfs_port}; MNT_Port = {self.mnt_port};",
            f"  Protocols = {protos}; Enable_NLM = false; Enable_RQUOTA = false;",
            "  Enable_UDP = false; mount_path_pseudo = true;",
            "}",
            "NFSv4 { Graceless = true; RecoveryRoot = " + f'"{self.base}/recovery"; ' + "}",
            "LOG { Default_Log_Level = WARN; }",
        ]
        for i, pseudo in enumerate(self.exports, 1):
            out += [
                "EXPORT {",
                f'  Export_Id = {i}; Path = "{self.root / pseudo}"; Pseudo = "/{pseudo}";',
                "  Access_Type = RW; Squash = No_Root_Squash; SecType = sys;",
                f"  Protocols = {protos}; Transports = TCP;",
                "  FSAL { Name = VFS; }",
                "}",
            ]
        return "\n".join(out) + "\n"

    def start(self) -> None:
        conf = self.base / "ganesha.conf"
        conf.write_text(self.conf())
        log = self.base / "ganesha.log"
        self.proc = subprocess.Popen(
            ["ganesha.nfsd", "-F", "-f", str(conf), "-L", str(log), "-p", str(self.base / "pid")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.base / "stderr", "ab"),  # noqa: SIM115 - handed to the child
        )
        deadline = time.monotonic() + 20
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ganesha {self.name} did not start: {self.log_tail()}")
            time.sleep(0.05)

    def _listening(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.nfs_port)) == 0

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc)

    def log_tail(self) -> str:
        parts = []
        for f in ("ganesha.log", "stderr"):
            with contextlib.suppress(OSError):
                parts.append((self.base / f).read_text(errors="replace")[-2000:])
        return "\n".join(parts)


class Guest:
    """The qemu TCG guest and its JSON-lines control channel (second serial port)."""

    def __init__(self, base: Path, image: Image) -> None:
        self.base = base
        self.image = image
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.buf = b""
        self.console = base / "console.log"
        self.ctl_path = base / "ctl.sock"

    def payload(self, config: str, shares: str) -> Path:
        """The per-run payload disk: fusemux's source, the agent and the configuration."""
        stage = self.base / "payload"
        shutil.copytree(
            REPO / "fusemux",
            stage / "src" / "fusemux",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        shutil.copy2(HERE / "agent.py", stage / "agent.py")
        (stage / "fusemux.toml").write_text(config)
        (stage / "nfs_shares").write_text(shares)
        img = self.base / "payload.ext4"
        subprocess.run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(stage), str(img), "16M"], check=True
        )
        return img

    def boot(self, payload: Path, forwards: list[tuple[str, int, int]]) -> None:
        fwd = ",".join(
            f"guestfwd=tcp:{addr}:{gport}-cmd:{self.image.busybox} nc 127.0.0.1 {hport}"
            for addr, gport, hport in forwards
        )
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "qemu64", "-m", "1024", "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initramfs),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=4",
            "-drive", f"file={self.image.rootfs},if=virtio,format=raw,snapshot=on",
            "-drive", f"file={payload},if=virtio,format=raw",
            "-netdev", f"user,id=n0,restrict=on,net=10.0.2.0/24,{fwd}",
            "-device", "virtio-net-pci,netdev=n0,romfile=",
            "-serial", f"file:{self.console}",
            "-chardev", f"socket,id=ctl,path={self.ctl_path},server=on,wait=off",
            "-serial", "chardev:ctl",
            "-monitor", "none",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.base / "qemu.stderr", "wb"),  # noqa: SIM115 - handed to the child
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not self.ctl_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qemu did not start: " + self.diag())
            time.sleep(0.05)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(self.ctl_path))

    def send(self, obj: dict[str, Any]) -> None:
        assert self.sock is not None
        self.sock.sendall((json.dumps(obj) + "\n").encode())

    def recv(self, timeout: float) -> dict[str, Any]:
        assert self.sock is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, _, self.buf = self.buf.partition(b"\n")
                text = line.decode(errors="replace").strip()
                if text.startswith("{"):
                    msg: dict[str, Any] = json.loads(text)
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message from the guest in {timeout}s: " + self.diag())
            # Read before checking qemu: its last words may still be in the socket.
            ready, _, _ = select.select([self.sock], [], [], min(left, 1.0))
            if ready:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise RuntimeError("guest channel closed: " + self.diag())
                self.buf += chunk
            elif self.proc.poll() is not None:
                raise RuntimeError(f"qemu exited {self.proc.returncode}: " + self.diag())

    def diag(self) -> str:
        parts = []
        for f in ("qemu.stderr", "console.log"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {f}\n" + (self.base / f).read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        stop_process(self.proc)


class NfsTier:
    """The session: servers, the guest, and the host-side handler of the guest's requests."""

    def __init__(self, base: Path, image: Image) -> None:
        self.base = base
        self.image = image
        self.rpcbind: subprocess.Popen[bytes] | None = None
        self.servers = {
            "a": Ganesha("a", base, 2049, 20048, v3=True),
            "b": Ganesha("b", base, 3049, 30048, v3=False),
        }
        self.guest = Guest(base, image)
        self.actions: list[tuple[float, str]] = []

    # -- setup ------------------------------------------------------------------------

    def server_path(self, export: str, name: str = "vol") -> Path:
        server, sdir, _, _ = EXPORTS[export]
        return self.servers[server].root / sdir / name

    def start(self) -> None:
        for export, (server, sdir, _, _) in EXPORTS.items():
            if server in self.servers:
                d = self.servers[server].add_export(sdir)
                (d / "vol").write_bytes(pattern(hash(export) & 0xFFFF, VOLUME_SIZE))
        d = self.servers["a"].add_export("cinder")
        (d / "vol").write_bytes(pattern(7, VOLUME_SIZE))
        self.rpcbind = subprocess.Popen(
            ["rpcbind", "-f", "-w"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.2)
        for s in self.servers.values():
            s.start()
        config = [
            'state_dir = "/run/fusemux"',
            f'engine = "{ENGINE}"',
            "linger = 0",
            f"mount_timeout = {MOUNT_TIMEOUT}",
            'shares_file = "/payload/nfs_shares"',
            'shares_fstype = "nfs"',
        ]
        for export, (_, sdir, fstype, options) in EXPORTS.items():
            addr = dict(o.partition("=")[::2] for o in options.split(","))["addr"]
            config += [
                f"[exports.{export}]",
                f'source = "{addr}:/{sdir}"',
                f'fstype = "{fstype}"',
                f'options = "{options}"',
            ]
            if export in IO_TIMEOUTS:
                config.append(f"io_timeout = {IO_TIMEOUTS[export]}")
        shares = f"{CINDER_SHARE} -o {V4},addr={GUEST_A},hard\n"
        payload = self.guest.payload("\n".join(config) + "\n", shares)
        self.guest.boot(
            payload,
            [(GUEST_A, 2049, 2049), (GUEST_A, 20048, 20048), (GUEST_B, 2049, 3049)],
        )
        msg = self.guest.recv(180)
        if msg.get("event") != "ready":
            raise RuntimeError(f"guest not ready: {msg}\n" + self.guest.diag())

    def close(self) -> dict[str, Any] | None:
        bye = None
        try:
            if self.guest.proc is not None and self.guest.proc.poll() is None:
                for s in self.servers.values():  # a stopped server would hang the unmounts
                    with contextlib.suppress(Exception):
                        s.signal(signal.SIGCONT)
                try:
                    self.guest.send({"cmd": "quit"})
                    deadline = time.monotonic() + 90
                    while bye is None or bye.get("event") != "bye":  # skip late results
                        bye = self.guest.recv(max(1.0, deadline - time.monotonic()))
                    self.guest.proc.wait(30)
                except Exception as e:  # reported by the caller; the servers still get stopped
                    bye = {"event": "error", "error": repr(e)[:3000], "last": bye}
        finally:
            self.guest.close()
            for s in self.servers.values():
                s.stop()
            stop_process(self.rpcbind)
        return bye

    # -- scenarios ----------------------------------------------------------------------

    def run(self, scenario: str, timeout: float = 90.0, **args: Any) -> dict[str, Any]:
        """Run one guest scenario, serving its requests to the host; return its data."""
        self.guest.send({"cmd": "run", "scenario": scenario, "args": args})
        deadline = time.monotonic() + timeout
        while True:
            msg = self.guest.recv(max(1.0, deadline - time.monotonic()))
            if msg.get("event") == "host":
                self.guest.send({"reply": self.host_op(msg)})
                continue
            if msg.get("event") == "result":
                if not msg.get("ok"):
                    raise AssertionError(
                        f"scenario {scenario} failed in the guest:\n{msg.get('error')}\n"
                        + "\n".join(msg.get("log") or [])
                    )
                data: dict[str, Any] = msg["data"]
                return data
            raise AssertionError(f"unexpected message from the guest: {msg}")

    def host_op(self, msg: dict[str, Any]) -> Any:
        op = msg["op"]
        self.actions.append((time.monotonic(), op))
        if op == "md5":
            with open(msg["path"], "rb") as f:
                f.seek(msg["offset"])
                return hashlib.md5(f.read(msg["size"])).hexdigest()
        if op == "write":
            with open(msg["path"], "r+b") as f:
                f.seek(msg["offset"])
                f.write(pattern(msg["seed"], msg["size"]))
                f.flush()
                os.fsync(f.fileno())
            return True
        if op == "signal":
            self.servers[msg["server"]].signal(getattr(signal, "SIG" + msg["sig"]))
            return True
        if op == "kill":
            self.servers[msg["server"]].kill()
            return True
        if op == "start":
            self.servers[msg["server"]].start()
            return True
        if op == "restart":
            self.servers[msg["server"]].stop()
            self.servers[msg["server"]].start()
            return True
        if op == "trylock":  # an OFD write lock on the server's own file: errno name or None
            fd = os.open(msg["path"], os.O_RDWR)
            try:
                fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
                return None
            except OSError as e:
                return errno.errorcode.get(e.errno or 0, str(e.errno))
            finally:
                os.close(fd)  # drops the lock, if taken
        if op == "rmtree":
            shutil.rmtree(msg["path"])
            return True
        if op == "restore":
            d = Path(msg["path"])
            d.mkdir()
            (d / "vol").write_bytes(pattern(msg["seed"], msg["size"]))
            return True
        raise ValueError(f"unknown host op {op}")
