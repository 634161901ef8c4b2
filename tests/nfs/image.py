"""Build (once) and cache the NFS tier's guest: kernel, initramfs and a Python rootfs image.

Everything comes from Debian packages and is unpacked into the cache, never installed on the
host:

- ``linux-image-cloud-amd64`` (and the versioned package it depends on), ``apt-get download``
  + ``dpkg-deb -x``: ``vmlinuz`` and the modules the guest needs (virtio, ext4, fuse, the NFS
  client), dependency-ordered from ``modules.dep`` and decompressed for busybox ``insmod``;
- ``busybox-static``: the initramfs's only binary (and the host-side ``nc`` of qemu's
  ``guestfwd``);
- a debootstrap'd minbase rootfs with python3, fuse3 and qemu-utils, plus fusemux's runtime
  dependencies (pyfuse3, trio, ...) copied from this checkout's ``.venv``, as an ext4 image
  made with ``mke2fs -d``. A compiled dependency (pyfuse3) is copied only when the venv's
  Python is the guest's (bookworm's 3.11 on a bookworm host); otherwise it comes from the
  guest release's own Debian package (``python3-pyfuse3``), and the pure-Python ones are
  still copied.

The Debian release of all three is ``FUSEMUX_NFS_RELEASE`` (``bookworm``, the default, or
``trixie``), whatever the host runs: kernel and busybox come through a private apt
configuration for that release in the cache (its own sources and lists; the host's apt is
not touched), and each release has its own cached image, so both can be kept side by side.

fusemux itself is not in the image: each run copies the checkout's ``fusemux/`` onto a small
payload disk (see ``tests/nfs/harness.py``), so the image survives code changes. The boot
part (kernel, initramfs) is keyed by a hash of this file, the rootfs by a hash of its own
inputs (packages, the code that builds it, ``pyproject.toml``), so either is rebuilt alone.

Run ``python -m tests.nfs.image [CACHE]`` to build it by hand.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import inspect
import lzma
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / ".cache" / "nfs-tier"
MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# The guest's Debian release, and the Python minor version each release ships.
RELEASES = {"bookworm": (3, 11), "trixie": (3, 13)}
RELEASE = os.environ.get("FUSEMUX_NFS_RELEASE", "bookworm")
ROOTFS_PACKAGES = ["python3", "fuse3", "qemu-utils"]
# Compiled runtime dependencies, and the Debian package that has each for the guest's Python.
COMPILED = {"pyfuse3": "python3-pyfuse3"}
# Modules the guest loads, in this order after their modules.dep dependencies.
GUEST_MODULES = [
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "ext4",
    "fuse",
    "nfsv3",
    "nfsv4",
]
# What fusemux needs at run time inside the guest (copied from the host's venv).
RUNTIME_DISTS = ["pyfuse3", "trio", "prometheus-client"]

INIT = r"""#!/bin/sh
# initramfs init: modules, network, the rootfs (a throw-away snapshot), then the agent.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /modules/$m || echo "insmod $m failed"; done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
mkdir -p /newroot
mount -t ext4 /dev/vda /newroot || { echo "GUEST-FATAL no rootfs"; poweroff -f; }
mkdir -p /newroot/payload
mount -t ext4 /dev/vdb /newroot/payload || { echo "GUEST-FATAL no payload"; poweroff -f; }
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /usr/bin/python3 -u /payload/agent.py
"""


@dataclass(frozen=True)
class Image:
    """Paths of one built guest image."""

    kernel: Path
    initramfs: Path
    rootfs: Path
    busybox: Path


def check_release(release: str = RELEASE) -> str:
    """*release* if the tier knows it, else a clear error naming the ones it knows."""
    if release not in RELEASES:
        raise SystemExit(
            f"FUSEMUX_NFS_RELEASE={release!r}: the NFS tier's guest can be "
            + " or ".join(sorted(RELEASES))
        )
    return release


def copies_compiled(release: str = RELEASE) -> bool:
    """Whether the venv's compiled dependencies fit the guest's Python (same minor version)."""
    return sys.version_info[:2] == RELEASES[release]


def rootfs_packages(release: str = RELEASE) -> list[str]:
    extra = [] if copies_compiled(release) else sorted(COMPILED.values())
    return ROOTFS_PACKAGES + extra


def cache_keys(release: str = RELEASE) -> tuple[str, str]:
    """(boot key, rootfs key): a change to the initramfs does not rebuild the slow rootfs."""
    boot = hashlib.sha256(Path(__file__).read_bytes())
    boot.update(release.encode())
    root = hashlib.sha256((REPO / "pyproject.toml").read_bytes())
    for part in (rootfs_packages(release), RUNTIME_DISTS, MIRROR, sys.version, release):
        root.update(repr(part).encode())
    root.update(inspect.getsource(_rootfs).encode())
    root.update(inspect.getsource(_runtime_files).encode())
    return (
        f"boot-{release}-" + boot.hexdigest()[:16],
        f"rootfs-{release}-" + root.hexdigest()[:16],
    )


def _run(*argv: str | Path, cwd: Path | None = None) -> str:
    res = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=900
    )
    if res.returncode != 0:
        raise RuntimeError(f"{argv} exited {res.returncode}: {res.stderr[-2000:]}")
    return res.stdout


def _apt(work: Path, release: str) -> list[str]:
    """apt options for a private configuration of *release* under *work* (lists updated)."""
    base = work / f"apt-{release}"
    for d in ("lists/partial", "cache/archives/partial", "parts", "prefs"):
        (base / d).mkdir(parents=True, exist_ok=True)
    sources = base / "sources.list"
    sources.write_text(f"deb [signed-by={KEYRING}] {MIRROR} {release} main\n")
    opts = [
        f"-oDir::Etc::SourceList={sources}",
        f"-oDir::Etc::SourceParts={base / 'parts'}",
        f"-oDir::Etc::PreferencesParts={base / 'prefs'}",
        f"-oDir::State::Lists={base / 'lists'}",
        f"-oDir::Cache={base / 'cache'}",
        "-oAcquire::Languages=none",
    ]
    _run("apt-get", *opts, "update", "-q")
    return opts


def _download(pkg: str, into: Path, apt: list[str]) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    _run("apt-get", *apt, "download", "-q", pkg, cwd=into)
    debs = sorted(into.glob(f"{pkg.split('=')[0]}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {pkg} left no .deb in {into}")
    return debs[-1]


def _kernel(work: Path, apt: list[str]) -> tuple[Path, Path]:
    """Unpack the cloud kernel; return (vmlinuz, modules dir)."""
    deps = _run("apt-cache", *apt, "depends", "linux-image-cloud-amd64")
    m = re.search(r"Depends: (linux-image-[0-9][^\s]*-cloud-amd64)", deps)
    if not m:
        raise RuntimeError(f"cannot find the versioned cloud kernel in: {deps}")
    deb = _download(m.group(1), work / "debs", apt)
    root = work / "kernel"
    _run("dpkg-deb", "-x", deb, root)
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    kver = vmlinuz.name.removeprefix("vmlinuz-")
    base = root / "lib" / "modules" / kver
    if not base.is_dir() and (root / "usr" / "lib" / "modules" / kver).is_dir():
        # trixie's package ships them under /usr (merged /usr); depmod -b looks in /lib.
        (root / "lib").mkdir(exist_ok=True)
        (root / "lib" / "modules").symlink_to("../usr/lib/modules")
    if base.is_dir():
        # The .deb ships no modules.dep (its postinst makes it): make it in the cache.
        _run("depmod", "-b", root, kver)
        return vmlinuz, base
    raise RuntimeError(f"no modules for {kver} in {root}")


def _module_order(moddir: Path, wanted: list[str]) -> list[str]:
    """Paths (relative to *moddir*) of *wanted* and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        by_name[name] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in deps.get(path, []):
            visit(d)
        order.append(path)

    for name in wanted:
        if name not in by_name:
            continue  # built into this kernel
        visit(by_name[name])
    return order


def _initramfs(work: Path, moddir: Path, busybox: Path, out: Path) -> None:
    root = work / "initramfs"
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "proc", "sys", "dev", "modules", "newroot"):
        (root / d).mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    names = []
    for rel in _module_order(moddir, GUEST_MODULES):
        src = moddir / rel
        name = src.name.split(".ko")[0] + ".ko"
        data = src.read_bytes()
        if src.name.endswith(".xz"):
            data = lzma.decompress(data)
        elif src.name.endswith(".zst"):
            data = subprocess.run(["zstd", "-dc", str(src)], capture_output=True, check=True).stdout
        (root / "modules" / name).write_bytes(data)
        names.append(name)
    (root / "modules.order").write_text("\n".join(names) + "\n")
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    files = subprocess.run(
        ["find", "."], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    cpio = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        cwd=root,
        input=files.encode(),
        capture_output=True,
        check=True,
    ).stdout
    out.write_bytes(cpio)


def _runtime_files(compiled: bool = True) -> list[tuple[Path, str]]:
    """(absolute source, path relative to site-packages) of RUNTIME_DISTS and their deps.

    Without *compiled*, the dists in COMPILED are left out (their dependencies are not).
    """
    env = {k: str(v) for k, v in default_environment().items()}
    env["extra"] = ""
    seen: set[str] = set()
    todo = list(RUNTIME_DISTS)
    out: list[tuple[Path, str]] = []
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        dist = md.distribution(name)
        files = dist.files or []
        if not compiled and key in COMPILED:
            files = []  # the guest's Debian package has it, built for the guest's Python
        for f in files:
            src = Path(str(dist.locate_file(f)))
            if src.is_file() and "__pycache__" not in f.parts:
                out.append((src, str(f)))
        for req_s in dist.requires or []:
            req = Requirement(req_s)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return out


def _rootfs(work: Path, out: Path, release: str) -> None:
    root = work / "rootfs"
    shutil.rmtree(root, ignore_errors=True)
    _run(
        "debootstrap",
        "--variant=minbase",
        "--include=" + ",".join(rootfs_packages(release)),
        release,
        root,
        MIRROR,
    )
    # Trim what the guest never needs, so mke2fs and the boot read less.
    for junk in ("usr/share/doc", "usr/share/man", "usr/share/locale", "var/cache/apt"):
        shutil.rmtree(root / junk, ignore_errors=True)
    for lists in (root / "var/lib/apt/lists").glob("*_Packages"):
        lists.unlink()
    site = root / "opt" / "fusemux-deps"
    for src, rel in _runtime_files(compiled=copies_compiled(release)):
        dst = site / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    for d in ("mnt/fm", "srv", "payload", "tmp", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    size_mb = int(_run("du", "-sm", root).split()[0]) * 13 // 10 + 64
    tmp = out.with_suffix(".tmp")
    _run("mke2fs", "-q", "-F", "-t", "ext4", "-d", root, tmp, f"{size_mb}M")
    tmp.rename(out)
    shutil.rmtree(root, ignore_errors=True)


def locate(cache: Path = DEFAULT_CACHE) -> Image | None:
    """The cached image for the current keys, or None if a part of it is not built."""
    boot_key, root_key = cache_keys(check_release())
    if not all((cache / key / "done").exists() for key in (boot_key, root_key)):
        return None
    return _paths(cache)


def _paths(cache: Path) -> Image:
    boot_key, root_key = cache_keys(RELEASE)
    boot, rootdir = cache / boot_key, cache / root_key
    return Image(
        kernel=boot / "vmlinuz",
        initramfs=boot / "initramfs.cpio",
        rootfs=rootdir / "rootfs.ext4",
        busybox=boot / "busybox",
    )


def build(cache: Path = DEFAULT_CACHE, log: bool = True) -> Image:
    """Return the cached image for the current keys, building what is missing first."""
    release = check_release()
    boot_key, root_key = cache_keys(release)
    image = _paths(cache)
    for key, step in ((boot_key, _build_boot), (root_key, _build_rootfs)):
        final = cache / key
        if (final / "done").exists():
            continue
        t0 = time.monotonic()
        work = cache / f"work-{key}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        work.mkdir(parents=True)
        final.mkdir(parents=True)
        try:
            step(work, image)
            (final / "done").write_text(f"{time.monotonic() - t0:.1f}\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if log:
            print(f"nfs-tier image: built {final} in {time.monotonic() - t0:.0f}s", flush=True)
    # Older keys of this release are dead weight (another release's image is kept), and so
    # are images from before the release was part of the key.
    old_key = re.compile(rf"(boot|rootfs|work-boot|work-rootfs)-({release}-)?[0-9a-f]{{16}}")
    for old in cache.iterdir():
        if old.is_dir() and old_key.fullmatch(old.name) and old.name not in (boot_key, root_key):
            shutil.rmtree(old, ignore_errors=True)
    return image


def _build_boot(work: Path, image: Image) -> None:
    apt = _apt(work, RELEASE)
    bb_deb = _download("busybox-static", work / "debs", apt)
    _run("dpkg-deb", "-x", bb_deb, work / "busybox")
    # /bin/busybox in bookworm's package, /usr/bin/busybox (merged /usr) in trixie's.
    found = [p for p in ("bin/busybox", "usr/bin/busybox") if (work / "busybox" / p).is_file()]
    if not found:
        raise RuntimeError(f"no busybox binary in {bb_deb}")
    shutil.copy2(work / "busybox" / found[0], image.busybox)
    vmlinuz, moddir = _kernel(work, apt)
    shutil.copy2(vmlinuz, image.kernel)
    _initramfs(work, moddir, image.busybox, image.initramfs)


def _build_rootfs(work: Path, image: Image) -> None:
    _rootfs(work, image.rootfs, RELEASE)


if __name__ == "__main__":
    os.umask(0o022)
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE))
