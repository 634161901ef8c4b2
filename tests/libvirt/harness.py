"""libvirt tier harness: a private libvirt "host" (libvirtd, virtlogd, virtlockd) per test.

``Libvirt`` starts ``tests/libvirt/nsinit.py`` as PID 1 of fresh mount, PID and network
namespaces (``unshare``). The daemons there run from Debian's packages in the foreground,
with private copies of ``/etc/libvirt``, ``/var/lib/libvirt`` and ``/var/log/libvirt`` and a
private ``/run/libvirt`` bound over the system paths, so they share nothing with the host or
with other test sessions; qemu's cache of probed capabilities (``/var/cache/libvirt``) is
shared by the session, which saves a qemu probe per test. The network namespace has only
``lo``. The fusemux mounts a test uses must exist before ``start()``: the namespace gets a
copy of the mount table at that moment (the host's ``/`` is private, nothing propagates).

Stopping: ``stop()`` destroys every domain still running (domains are transient, created
with ``virsh create``, so nothing stays defined), then sends SIGTERM to the namespace's
PID 1 by its host PID; it stops libvirtd, virtlockd and virtlogd by PID and exits. In
``cleanup()`` (for ``finally``) a PID 1 still alive is killed with SIGKILL, which takes the
whole PID namespace with it.

Concurrency: used from one test thread; every call blocks until its subprocess is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.mount.harness import pid_alive, wait_for

NSINIT = Path(__file__).with_name("nsinit.py")
QEMU_UID = 64055  # libvirt-qemu in Debian's libvirt-daemon-system


@dataclass
class Disk:
    """One ``<disk type='file'>`` of a test domain."""

    path: Path
    fmt: str = "raw"  # driver type: raw or qcow2
    target: str = "vda"
    cache: str = "none"
    io: str = "native"
    readonly: bool = False


def domain_xml(name: str, disks: list[Disk], memory_mib: int = 64) -> str:
    """A TCG domain with no OS: it sits in SeaBIOS and only holds its disks open."""
    disk_xml = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='{d.fmt}' cache='{d.cache}' io='{d.io}'/>
      <source file='{d.path}'/>
      <target dev='{d.target}' bus='virtio'/>{"<readonly/>" if d.readonly else ""}
    </disk>"""
        for d in disks
    )
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>{disk_xml}
    <serial type='null'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class Libvirt:
    """One private libvirt host.

    *qemu_conf* is appended to Debian's default qemu.conf, and each of *conf* (file name ->
    text) to that file of ``/etc/libvirt`` (e.g. ``qemu-lockd.conf``); *binds* are
    ``(host path, path in the namespace)`` pairs, targets under ``/run`` are created; with
    *netns_of* the host joins that host's network namespace instead of getting its own;
    *hostname* names it in its own UTS namespace.
    """

    def __init__(
        self,
        base: Path,
        cache: Path,
        qemu_conf: str = "",
        *,
        conf: dict[str, str] | None = None,
        binds: list[tuple[Path, str]] | None = None,
        netns_of: Libvirt | None = None,
        hostname: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.conf = {"qemu.conf": qemu_conf, **(conf or {})}
        self.binds = binds or []
        self.netns_of = netns_of
        self.hostname = hostname
        self.env = env or {}
        self.base = base
        self.cache = cache
        self.qemu_conf = qemu_conf
        self.etc = base / "etc"
        self.run_dir = base / "run"
        self.lib = base / "lib"
        self.logs = base / "log"
        self.daemon_logs = base / "daemons"
        self.ready = base / "ready"
        self.proc: subprocess.Popen[bytes] | None = None
        self.init_pid: int | None = None
        self.uri = f"qemu:///system?socket={self.run_dir}/libvirt-sock"

    # -- lifecycle -----------------------------------------------------------------

    def _prepare(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        shutil.copytree("/etc/libvirt", self.etc, symlinks=True)
        # Debian enables the "default" NAT network: no dnsmasq or bridge for this tier.
        for link in (self.etc / "qemu/networks/autostart").glob("*"):
            link.unlink()
        for name, extra in self.conf.items():
            if extra:
                with open(self.etc / name, "a") as f:
                    f.write("\n# tests/libvirt\n" + extra + "\n")
        shutil.copytree("/var/lib/libvirt", self.lib, symlinks=True)
        shutil.copytree("/var/log/libvirt", self.logs, symlinks=True)
        if not self.cache.exists():
            shutil.copytree("/var/cache/libvirt", self.cache, symlinks=True)
        self.run_dir.mkdir(mode=0o755)
        self.daemon_logs.mkdir()

    def start(self, timeout: float = 90.0) -> None:
        self._prepare()
        spec = {
            "binds": [
                [str(self.etc), "/etc/libvirt"],
                [str(self.run_dir), "/run/libvirt"],
                [str(self.lib), "/var/lib/libvirt"],
                [str(self.logs), "/var/log/libvirt"],
                [str(self.cache), "/var/cache/libvirt"],
            ]
            + [[str(src), dst] for src, dst in self.binds],
            "logs": str(self.daemon_logs),
            "ready": str(self.ready),
            "env": self.env,
            "hostname": self.hostname,
        }
        spec_path = self.base / "nsinit.json"
        spec_path.write_text(json.dumps(spec))
        log = open(self.daemon_logs / "nsinit.log", "ab")
        prefix: list[str] = []  # nsenter execs unshare: the PID stays unshare's
        net = ["--net"]
        if self.netns_of is not None:
            assert self.netns_of.init_pid is not None
            prefix = ["nsenter", f"--net=/proc/{self.netns_of.init_pid}/ns/net", "--"]
            net = []
        self.proc = subprocess.Popen(
            prefix
            + [
                "unshare",
                "--mount",
                "--pid",
                "--uts",
                *net,
                "--fork",
                "--kill-child",
                "--mount-proc",
            ]
            + [sys.executable, str(NSINIT), str(spec_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        proc = self.proc

        def init_pid() -> int | None:
            if proc.poll() is not None:
                raise AssertionError(f"nsinit exited {proc.returncode}:\n{self.logs_text()}")
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            return int(children[0]) if children else None

        self.init_pid = wait_for(init_pid, 10, "the namespace's PID 1")

        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"nsinit exited {proc.returncode}:\n{self.logs_text()}")
            if not self.ready.exists():
                return False
            r = self.virsh("version", check=False)
            return r.returncode == 0

        wait_for(answers, timeout, "libvirtd to answer")

    def logs_text(self) -> str:
        out = []
        for f in sorted(self.daemon_logs.glob("*.log")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    def domains(self) -> list[str]:
        r = self.virsh("list", "--all", "--name")
        return [n for n in r.stdout.split() if n]

    def stop(self, timeout: float = 60.0) -> None:
        """Destroy the domains left running, then stop the daemons (SIGTERM by PID)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for name in self.domains():
            self.virsh("destroy", name, check=False)
            self.virsh("undefine", name, check=False)
        assert self.init_pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init_pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"libvirt did not stop in {timeout}s:\n{self.logs_text()}"
            ) from None

    def cleanup(self) -> None:
        """In finally: kill the namespace's PID 1 (and so everything in it) if still alive."""
        if self.init_pid is not None and pid_alive(self.init_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    # -- commands ------------------------------------------------------------------

    def virsh(
        self, *args: str | Path, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["virsh", "-q", "-c", self.uri, *[str(a) for a in args]],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"virsh {' '.join(map(str, args))} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}\n{self.logs_text()}"
            )
        return result

    def create(self, name: str, disks: list[Disk]) -> int:
        """``virsh create`` a transient domain; returns qemu's PID (as the host sees it)."""
        xml = self.base / f"{name}.xml"
        xml.write_text(domain_xml(name, disks))
        self.virsh("create", xml)
        return self.qemu_pid(name)

    def qemu_pid(self, name: str) -> int:
        """qemu's host PID, from its pid file's namespace PID mapped through /proc."""
        ns_pid = int((self.run_dir / "qemu" / f"{name}.pid").read_text().strip())
        assert self.init_pid is not None
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{entry}/status").read_text()
                nspid = [ln for ln in status.splitlines() if ln.startswith("NSpid:")]
                fields = nspid[0].split()[1:] if nspid else []
                if len(fields) == 2 and int(fields[1]) == ns_pid and self._in_our_ns(int(entry)):
                    return int(entry)
        raise AssertionError(f"no qemu process for {name} (ns pid {ns_pid})")

    def _in_our_ns(self, pid: int) -> bool:
        assert self.init_pid is not None
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{self.init_pid}/ns/pid")

    def domain_log(self, name: str) -> str:
        path = self.logs / "qemu" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def domstate(self, name: str) -> str:
        return self.virsh("domstate", name).stdout.strip()

    def wait_running(self, name: str, timeout: float = 30.0) -> None:
        wait_for(lambda: self.domstate(name) == "running", timeout, f"{name} running")
