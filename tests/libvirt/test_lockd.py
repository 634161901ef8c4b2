"""libvirt's ``lock_manager = "lockd"`` over fusemux volumes, across two "hosts".

Two fusemux daemons serve one export and stand for two hypervisor hosts. Each has its own
private libvirt host (libvirtd, virtlockd) in its own mount namespace, where that daemon's
mount is bound at the same path, ``/run/fusemux``, as every host of a cloud would use the
same mountpoint. Host A starts a domain on ``/run/fusemux/volumes/e1/disk.raw``; host B
must then be refused the same volume.

libvirt 9.0 acquires disk leases when the guest CPUs start (``virDomainLockProcessResume``),
after qemu has opened its images paused. virtlockd then takes an fcntl lock:

- with the default ``qemu-lockd.conf`` (no ``file_lockspace_dir``), on the disk path itself,
  i.e. on the fusemux file. fusemux does not negotiate POSIX locks, so the kernel keeps the
  lock on that host's FUSE inode and it never reaches the backing file (issue 13); qemu's own
  image locks (OFD locks) stay on the FUSE inode the same way. Host B starts: xfail.
- with ``file_lockspace_dir`` on storage both hosts share (NFS in production, a plain
  directory here), on a file named by the SHA-256 of the disk path there: both virtlockds
  lock the same inode, and B is refused. This works today because both hosts use the same
  path.

Concurrency: one test at a time; domains are started one after the other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.libvirt.conftest import public_mountpoint
from tests.libvirt.harness import Disk, Libvirt, domain_xml
from tests.mount.harness import Daemon, run

LOCKD = 'lock_manager = "lockd"'
COMMON = "/run/fusemux"  # the mountpoint path both hosts use
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


class LeaseNotEnforced(AssertionError):
    """The expected failure of the direct-lease test (issue 13); any other assertion in it
    (lockd not active, say) fails the test for real."""


def opener_comms(d: Daemon) -> list[str]:
    return [o.split(":", 1)[1] for o in d.xattr(d.volume("e1", "disk.raw"), "openers").split(",")]


def lease_refused(err: str) -> bool:
    return "resource busy" in err or "is locked" in err or "Failed to acquire lock" in err


@pytest.mark.xfail(
    strict=True,
    raises=LeaseNotEnforced,
    reason="issue 13: image locks do not reach the backing file",
)
@pytest.mark.parametrize("engine", ["passthrough"])
def test_lockd_direct_lease_across_hosts(
    daemon: Daemon, daemon2: Daemon, libvirt_host: Callable[..., Libvirt]
) -> None:
    """Default lockd: the lease is an fcntl lock on the fusemux file of host A's mount."""
    a, b = two_hosts(daemon, daemon2, libvirt_host, LOCKD)
    a.create("lease-a", [Disk(VOLUME)])
    a.wait_running("lease-a")
    # The lease is there: virtlockd holds the fusemux file open (and locked) beside qemu.
    assert sorted(opener_comms(daemon)) == ["qemu-system-x86", "virtlockd"]
    err = try_start(b, "lease-b")
    a.virsh("destroy", "lease-a")
    if not err:
        raise LeaseNotEnforced("host B started a domain on a volume host A holds a lease on")
    assert lease_refused(err), err


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
