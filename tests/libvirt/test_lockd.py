"""libvirt's ``lock_manager = "lockd"`` over fusemux volumes, across two "hosts".

Two fusemux daemons serve one export and stand for two hypervisor hosts. Each has its own
private libvirt host (libvirtd, virtlockd) in its own mount namespace, where that daemon's
mount is bound at the same path, ``/run/fusemux``, as every host of a cloud would use the
same mountpoint. Host A starts a domain on ``/run/fusemux/volumes/e1/disk.raw``; host B
must then be refused the same volume.

libvirt 9.0 acquires disk leases when the guest CPUs start (``virDomainLockProcessResume``),
after qemu has opened its images paused. virtlockd then takes an fcntl lock:

- with the default ``qemu-lockd.conf`` (no ``file_lockspace_dir``), on the disk path itself,
  i.e. on the fusemux file. With the own engine, fusemux takes it on the backing file
  (issue 13, ``core/locks.py``), as it does qemu's own image locks (OFD locks): host B is
  refused. (With pyfuse3 the locks stay on each host's FUSE inode: not tested here.)
- with ``file_lockspace_dir`` on storage both hosts share (NFS in production, a plain
  directory here), on a file named by the SHA-256 of the disk path there: both virtlockds
  lock the same inode, and B is refused. This works today because both hosts use the same
  path.

Concurrency: one test at a time; domains are started one after the other.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.libvirt.conftest import public_mountpoint
from tests.libvirt.harness import Disk, Libvirt, domain_xml
from tests.mount.harness import Daemon, run, wait_for

LOCKD = 'lock_manager = "lockd"'
COMMON = "/run/fusemux"  # the mountpoint path both hosts use
F_OFD_GETLK = 36
VOLUME = Path(COMMON) / "volumes/e1/disk.raw"


def serve(d: Daemon, source_of: Daemon | None = None) -> None:
    """Serve export ``e1`` (a new bind export, or the same source as *source_of*'s)."""
    if source_of is None:
        src = d.add_bind_export("e1")
        run("qemu-img", "create", "-f", "raw", src / "disk.raw", "16M")
    else:
        d.exports["e1"] = dict(source_of.exports["e1"])
    d.write_config(linger=1.0)
    public_mountpoint(d)
    d.start()


def try_start(host: Libvirt, name: str) -> str:
    """Start *name* on the volume; returns libvirt's error, or "" if it ran (then destroyed)."""
    xml = host.base / f"{name}.xml"
    xml.write_text(domain_xml(name, [Disk(VOLUME)]))
    r = host.virsh("create", xml, check=False)
    if r.returncode == 0:
        host.virsh("destroy", name)
        return ""
    return r.stderr


def two_hosts(
    daemon: Daemon,
    daemon2: Daemon,
    libvirt_host: Callable[..., Libvirt],
    qemu_conf: str,
    conf: dict[str, str] | None = None,
) -> tuple[Libvirt, Libvirt]:
    serve(daemon)
    serve(daemon2, source_of=daemon)
    a = libvirt_host(qemu_conf, conf=conf, binds=[(daemon.mnt, COMMON)])
    b = libvirt_host(qemu_conf, conf=conf, binds=[(daemon2.mnt, COMMON)])
    return a, b


def opener_comms(d: Daemon) -> list[str]:
    return [o.split(":", 1)[1] for o in d.xattr(d.volume("e1", "disk.raw"), "openers").split(",")]


def lease_refused(err: str) -> bool:
    """libvirt refused the start: by virtlockd's lease, or by qemu's own image lock (qemu
    opens the images before libvirt asks for the lease; with the own engine both locks are
    on the backing file)."""
    lease = "resource busy" in err or "is locked" in err or "Failed to acquire lock" in err
    return lease or 'Failed to get "write" lock' in err


def lease_lock(path: Path) -> tuple[int, int, int] | None:
    """The lock that conflicts with a write lock on byte 0 of *path* (type, start, length),
    asked with F_OFD_GETLK on a fresh open file description; None if there is none.
    virtlockd locks byte 0; qemu's own image locks sit at bytes 100 and up."""
    fd = os.open(path, os.O_RDWR)
    try:
        arg = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        typ, _whence, start, length, _pid = struct.unpack(
            "hhqqi4x", fcntl.fcntl(fd, F_OFD_GETLK, arg)
        )
    finally:
        os.close(fd)
    return None if typ == fcntl.F_UNLCK else (typ, start, length)


@pytest.mark.parametrize("engine", ["passthrough"])
def test_lockd_direct_lease_across_hosts(
    daemon: Daemon, daemon2: Daemon, libvirt_host: Callable[..., Libvirt]
) -> None:
    """Default lockd: the lease is an fcntl lock on the fusemux file of host A's mount, and
    with the own engine it is a lock on the backing file (issue 13): host B is refused, and
    starts once A's guest is gone."""
    a, b = two_hosts(daemon, daemon2, libvirt_host, LOCKD)
    backing = Path(daemon.exports["e1"]["source"]) / "disk.raw"
    assert lease_lock(backing) is None
    a.create("lease-a", [Disk(VOLUME)])
    a.wait_running("lease-a")
    # The lease is there: virtlockd holds the fusemux file open (and locked) beside qemu,
    # and its write lock on byte 0 is on the backing file, where every host sees it.
    assert sorted(opener_comms(daemon)) == ["qemu-system-x86", "virtlockd"]
    lease = lease_lock(backing)
    assert lease is not None and lease[:2] == (fcntl.F_WRLCK, 0), lease
    err = try_start(b, "lease-b")
    # Refused: by qemu's own image lock (it opens the image before libvirt asks for the
    # lease), or by the lease.
    assert lease_refused(err), err or "host B started on a volume host A holds"
    a.virsh("destroy", "lease-a")
    wait_for(lambda: lease_lock(backing) is None, 10, "the lease to go")
    assert try_start(b, "lease-b") == ""


@pytest.mark.parametrize("engine", ["passthrough"])
def test_lockd_shared_lockspace_across_hosts(
    daemon: Daemon, daemon2: Daemon, libvirt_host: Callable[..., Libvirt], tmp_path: Path
) -> None:
    """lockd with ``file_lockspace_dir`` on shared storage (not on fusemux): B is refused,
    and gets the volume once A's guest is gone."""
    lockspace = tmp_path / "lockspace"  # stands for a directory on the NFS share
    lockspace.mkdir()
    lockd_conf = {"qemu-lockd.conf": f'file_lockspace_dir = "{lockspace}"'}
    a, b = two_hosts(daemon, daemon2, libvirt_host, LOCKD, conf=lockd_conf)
    a.create("lease-a", [Disk(VOLUME)])
    a.wait_running("lease-a")
    assert any(lockspace.iterdir()), "no lease file in the lockspace"
    assert opener_comms(daemon) == ["qemu-system-x86"]  # the lease is not on the volume
    err = try_start(b, "lease-b")
    assert lease_refused(err), err or "host B started on a leased volume"
    a.virsh("destroy", "lease-a")
    assert try_start(b, "lease-b") == ""
