"""libvirt as a client of fusemux: real libvirtd/virtlogd/virtlockd, qemu (TCG), fusemux.

Each test serves bind-mounted exports through the real fusemux daemon (tier (c)'s fixture),
then starts a private libvirt host (``harness.Libvirt``) with Debian's default qemu.conf
(DAC, ``dynamic_ownership``, ``remember_owner``) and runs transient TCG domains without an
OS (they sit in SeaBIOS) on fusemux volumes with ``cache='none' io='native'``.

Concurrency: one test at a time; the daemons are subprocesses, polled with ``wait_for``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from tests.libvirt.conftest import public_mountpoint
from tests.libvirt.harness import QEMU_UID, Disk, Libvirt
from tests.mount.harness import Daemon, run, wait_for

MiB = 1024 * 1024
LINGER = 2.0


def qemu_img(*args: str | Path) -> str:
    return run("qemu-img", *args).stdout


def serve(daemon: Daemon, files: dict[str, bytes] | None = None) -> Path:
    """One bind export ``e1`` served at a public mountpoint; returns its backing dir."""
    src = daemon.add_bind_export("e1", files)
    daemon.write_config(linger=LINGER)
    public_mountpoint(daemon)
    daemon.start()
    return src


def openers(daemon: Daemon, vol: Path) -> str:
    return daemon.xattr(vol, "openers")


def assert_clean_domain_log(host: Libvirt, name: str) -> None:
    log = host.domain_log(name)
    assert "qemu-system-x86_64" in log, f"no domain log for {name}"
    bad = [ln for ln in log.splitlines() if re.search(r"error|warning", ln, re.I)]
    assert not bad, f"{name}'s domain log has errors:\n" + "\n".join(bad)


def check_running_then_destroy(
    daemon: Daemon, host: Libvirt, name: str, vols: list[Path], backing: list[Path]
) -> None:
    """While *name* runs, its volumes are open by its qemu and their backing files are owned
    by libvirt-qemu (``dynamic_ownership``); after destroy they are closed, the export
    unmounts after its linger and the domain log shows no error.

    libvirt restores the owner (root) of each disk's top image only: libvirt 9.0 never
    restores images lower in a chain, on any filesystem (measured by hand on local ext4), so
    those stay libvirt-qemu's and are not checked.
    """
    qemu = host.qemu_pid(name)
    for vol in vols:
        assert openers(daemon, vol) == f"{qemu}:qemu-system-x86", vol
    for b in backing:
        assert os.stat(b).st_uid == QEMU_UID, f"dynamic_ownership did not reach {b}"
    assert daemon.state_of("e1") == "mounted"
    tops = [Path(d.split(None, 1)[1]) for d in host.virsh("domblklist", name).stdout.splitlines()]
    host.virsh("destroy", name)
    for vol in vols:
        wait_for(lambda v=vol: openers(daemon, v) == "", 10, f"{vol} closed")  # type: ignore[misc]
    for vol, b in zip(vols, backing, strict=True):
        if vol in tops:
            st = os.stat(b)
            assert (st.st_uid, st.st_gid) == (0, 0), f"owner of {b} not restored: {st.st_uid}"
    daemon.wait_unmounted("e1", timeout=LINGER + 10)
    assert_clean_domain_log(host, name)


def test_start_destroy_raw(daemon: Daemon, libvirt_host: Callable[..., Libvirt]) -> None:
    """Two raw volumes; the second is owned by uid 1234 before the start. fusemux stores no
    xattrs (EOPNOTSUPP for ``trusted.libvirt.security.*``), so ``remember_owner`` cannot
    work and libvirt gives every volume back to root:root, the 1234-owned one as well."""
    src = serve(daemon)
    raw, other = src / "disk.raw", src / "other.raw"
    qemu_img("create", "-f", "raw", raw, "16M")
    qemu_img("create", "-f", "raw", other, "16M")
    os.chown(other, 1234, 1234)
    host = libvirt_host()
    vol, vol2 = daemon.volume("e1", "disk.raw"), daemon.volume("e1", "other.raw")
    host.create("raw1", [Disk(vol, "raw"), Disk(vol2, "raw", "vdb")])
    host.wait_running("raw1")
    check_running_then_destroy(daemon, host, "raw1", [vol, vol2], [raw, other])


def test_start_destroy_qcow2_chain(daemon: Daemon, libvirt_host: Callable[..., Libvirt]) -> None:
    src = serve(daemon)
    base, top = src / "base.raw", src / "top.qcow2"
    qemu_img("create", "-f", "raw", base, "16M")
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    host = libvirt_host()
    vbase, vtop = daemon.volume("e1", "base.raw"), daemon.volume("e1", "top.qcow2")
    assert daemon.xattr(vtop, "chain") == "top.qcow2,base.raw"
    host.create("chain1", [Disk(vtop, "qcow2")])
    host.wait_running("chain1")
    check_running_then_destroy(daemon, host, "chain1", [vtop, vbase], [top, base])


def cinder_chain(backing_dir: Path, active: str) -> list[str]:
    """The chain as Cinder's remotefs driver computes it (``_get_backing_chain_for_path``):
    ``qemu-img info`` of each file, following ``backing-filename`` inside the share."""
    chain, name = [], active
    while name:
        chain.append(name)
        info = json.loads(qemu_img("info", "-U", "--output=json", backing_dir / name))
        name = os.path.basename(info.get("backing-filename", ""))
    return chain


def test_cinder_snapshot_flow(daemon: Daemon, libvirt_host: Callable[..., Libvirt]) -> None:
    """Nova's in-use snapshot of a Cinder NFS volume, then the commit that deletes it."""
    src = serve(daemon)
    vol_name, snap_name = "volume-X", "volume-X.snap-1"
    qemu_img("create", "-f", "raw", src / vol_name, "16M")
    host = libvirt_host()
    vol, snap = daemon.volume("e1", vol_name), daemon.volume("e1", snap_name)
    host.create("snap1", [Disk(vol, "raw")])
    host.wait_running("snap1")
    qemu = host.qemu_pid("snap1")

    # Cinder (on its own mount of the share) creates the overlay and records it.
    qemu_img("create", "-f", "qcow2", "-b", vol_name, "-F", "raw", src / snap_name)
    info = {"active": snap_name, "snap-1": snap_name}
    (src / f"{vol_name}.info").write_text(json.dumps(info, indent=1, sort_keys=True))
    assert snap_name in os.listdir(daemon.volumes("e1")), "the overlay is not visible at once"
    assert daemon.xattr(vol, "active_image") == info["active"]
    assert daemon.xattr(snap, "chain").split(",") == cinder_chain(src, info["active"])
    assert daemon.xattr(snap, "format") == "qcow2"

    # Nova: libvirt switches the guest onto the overlay.
    host.virsh(
        "snapshot-create-as", "snap1", "--disk-only", "--reuse-external", "--no-metadata",
        "--diskspec", f"vda,file={snap},driver=qcow2",
    )  # fmt: skip
    assert str(snap) in host.virsh("domblklist", "snap1").stdout
    assert openers(daemon, snap) == f"{qemu}:qemu-system-x86"
    assert openers(daemon, vol) == f"{qemu}:qemu-system-x86"  # now the read-only backing
    assert os.stat(src / snap_name).st_uid == QEMU_UID
    assert host.domstate("snap1") == "running"

    # Snapshot delete of the active image: commit it into the base and pivot back.
    host.virsh("blockcommit", "snap1", "vda", "--active", "--pivot", "--wait", timeout=180)
    blk = host.virsh("domblklist", "snap1").stdout
    assert str(vol) in blk and snap_name not in blk, blk
    wait_for(lambda: openers(daemon, snap) == "", 10, "qemu to close the overlay")
    assert openers(daemon, vol) == f"{qemu}:qemu-system-x86"
    # Cinder records the commit and deletes the overlay on the share.
    (src / f"{vol_name}.info").write_text(json.dumps({"active": vol_name}, indent=1))
    (src / snap_name).unlink()
    wait_for(lambda: snap_name not in os.listdir(daemon.volumes("e1")), 5, "overlay gone")
    assert daemon.xattr(vol, "active_image") == vol_name
    assert daemon.xattr(vol, "chain") == vol_name
    assert host.domstate("snap1") == "running"
    check_running_then_destroy(daemon, host, "snap1", [vol], [src / vol_name])


def blkinfo(host: Libvirt, dom: str, dev: str) -> dict[str, int]:
    out = host.virsh("domblkinfo", dom, dev).stdout
    return {k.strip(): int(v) for k, v in (ln.split(":") for ln in out.splitlines() if ":" in ln)}


def test_blockresize_and_domblkinfo(daemon: Daemon, libvirt_host: Callable[..., Libvirt]) -> None:
    src = serve(daemon)
    qemu_img("create", "-f", "raw", src / "r.raw", "16M")
    qemu_img("create", "-f", "qcow2", src / "q.qcow2", "16M")
    host = libvirt_host()
    vr, vq = daemon.volume("e1", "r.raw"), daemon.volume("e1", "q.qcow2")
    host.create("resize1", [Disk(vr, "raw", "vda"), Disk(vq, "qcow2", "vdb")])
    host.wait_running("resize1")
    assert blkinfo(host, "resize1", "vda")["Capacity"] == 16 * MiB
    assert blkinfo(host, "resize1", "vdb")["Capacity"] == 16 * MiB

    host.virsh("blockresize", "resize1", "vda", "32M")
    host.virsh("blockresize", "resize1", "vdb", "48M")
    raw_info = blkinfo(host, "resize1", "vda")
    assert raw_info["Capacity"] == 32 * MiB
    assert raw_info["Physical"] == os.stat(src / "r.raw").st_size == 32 * MiB
    assert os.stat(vr).st_size == 32 * MiB
    assert daemon.xattr(vr, "virtual_size") == str(32 * MiB)
    q_info = blkinfo(host, "resize1", "vdb")
    assert q_info["Capacity"] == 48 * MiB
    assert q_info["Physical"] == os.stat(src / "q.qcow2").st_size
    wait_for(
        lambda: daemon.xattr(vq, "virtual_size") == str(48 * MiB), 5, "qcow2 header's new size"
    )
    on_share = json.loads(qemu_img("info", "-U", "--output=json", src / "q.qcow2"))
    assert on_share["virtual-size"] == 48 * MiB
    check_running_then_destroy(daemon, host, "resize1", [vr, vq], [src / "r.raw", src / "q.qcow2"])
