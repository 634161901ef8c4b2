"""Live migration between two libvirt hosts whose disks are on fusemux, without copying storage.

Two fusemux daemons serve one export (two hypervisor hosts sharing a Cinder NFS share).
Each libvirt host runs in its own mount, PID and UTS namespaces with its own host UUID and
host name, sees its fusemux mount at the same path ``/run/fusemux``, and both share one
network namespace (only ``lo``), so qemu's migration stream runs over loopback.

What libvirt 9.0 does with a disk on ``fuse.fusemux``: ``virFileIsSharedFS`` finds the FUSE
magic and then knows only ``fuse.glusterfs`` and ``fuse.quobyte`` as shared, so
``qemuMigrationSrcIsSafe`` refuses a live migration without storage copy as unsafe, before
it even looks at ``cache='none'``. ``--unsafe`` (``VIR_MIGRATE_UNSAFE``) skips that check;
libvirt 9.0 has no qemu.conf setting to declare a filesystem shared. And since the
filesystem is not "shared", the source restores the disk's owner (DAC) after the guest
left, under the destination's running qemu; a snapshot and its commit on the destination
still work, since libvirt labels an image again before it has qemu reopen it.

Concurrency: one test at a time; virsh calls block.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.libvirt.conftest import public_mountpoint
from tests.libvirt.harness import QEMU_UID, Disk, Libvirt
from tests.mount.harness import Daemon, run, wait_for

COMMON = "/run/fusemux"
VOLUME = Path(COMMON) / "volumes/e1/disk.raw"


@pytest.mark.parametrize("engine", ["passthrough"])
def test_live_migration_between_two_fusemux_hosts(
    daemon: Daemon, daemon2: Daemon, libvirt_host: Callable[..., Libvirt]
) -> None:
    src = daemon.add_bind_export("e1")
    run("qemu-img", "create", "-f", "raw", src / "disk.raw", "16M")
    daemon2.exports["e1"] = dict(daemon.exports["e1"])
    for d in (daemon, daemon2):
        d.write_config(linger=1.0)
        public_mountpoint(d)
        d.start()
    a = libvirt_host(
        conf={"libvirtd.conf": 'host_uuid = "8d6f4b4e-0000-4000-8000-00000000000a"'},
        binds=[(daemon.mnt, COMMON)],
        hostname="fusemux-host-a",
    )
    b = libvirt_host(
        conf={"libvirtd.conf": 'host_uuid = "8d6f4b4e-0000-4000-8000-00000000000b"'},
        binds=[(daemon2.mnt, COMMON)],
        netns_of=a,
        hostname="fusemux-host-b",
    )
    vol_a, vol_b = daemon.volume("e1", "disk.raw"), daemon2.volume("e1", "disk.raw")
    a.create("mig1", [Disk(VOLUME, "raw")])
    a.wait_running("mig1")
    qemu_a = a.qemu_pid("mig1")
    assert daemon.xattr(vol_a, "openers") == f"{qemu_a}:qemu-system-x86"
    migrate = ["migrate", "--live", "mig1", b.uri, "--migrateuri", "tcp://127.0.0.1"]

    # fuse.fusemux is not a shared filesystem to libvirt: refused, even with cache='none'.
    r = a.virsh(*migrate, check=False)
    assert r.returncode != 0
    assert "Migration without shared storage is unsafe" in r.stderr, r.stderr
    assert a.domstate("mig1") == "running"

    a.virsh(*migrate, "--unsafe", timeout=180)
    b.wait_running("mig1")
    assert a.domains() == []
    qemu_b = b.qemu_pid("mig1")
    assert daemon2.xattr(vol_b, "openers") == f"{qemu_b}:qemu-system-x86"
    wait_for(lambda: daemon.xattr(daemon.volumes("e1"), "open_volumes") == "", 10, "A closed")
    daemon.wait_unmounted("e1", timeout=10)
    # The source restored the owner it knows (root) under B's running qemu.
    owner = os.stat(src / "disk.raw").st_uid
    assert owner == 0, f"owner after migration: {owner} (libvirt-qemu is {QEMU_UID})"
    assert b.domstate("mig1") == "running"
    # On the destination, a snapshot and its commit still work: libvirt labels the images
    # it makes qemu open again (the base, read-write, for the commit) before it does.
    run("qemu-img", "create", "-f", "qcow2", "-b", "disk.raw", "-F", "raw", src / "disk.snap")
    b.virsh(
        "snapshot-create-as", "mig1", "--disk-only", "--reuse-external", "--no-metadata",
        "--diskspec", f"vda,file={Path(COMMON) / 'volumes/e1/disk.snap'},driver=qcow2",
    )  # fmt: skip
    b.virsh("blockcommit", "mig1", "vda", "--active", "--pivot", "--wait", timeout=180)
    assert "disk.snap" not in b.virsh("domblklist", "mig1").stdout
    assert b.domstate("mig1") == "running"
    log_b = b.domain_log("mig1")
    assert "error" not in log_b.lower(), log_b
    b.virsh("destroy", "mig1")
    daemon2.wait_unmounted("e1", timeout=10)
