#!/usr/bin/env bash
# Host packages for the NFS guest tier (tests/nfs, `make test-nfs`), on Debian 12 as root.
# Kept apart from scripts/setup.sh so that the normal setup stays lean. The guest's kernel,
# busybox and rootfs are NOT installed here: tests/nfs/image.py downloads and unpacks
# them into a cache (apt-get download + dpkg-deb -x, debootstrap), never onto the host.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  nfs-ganesha nfs-ganesha-vfs rpcbind   # the NFS server, on loopback in a private netns
  qemu-system-x86                       # the TCG guest that has a kernel NFS client
  debootstrap e2fsprogs cpio xz-utils zstd   # building the guest's rootfs and initramfs
  iproute2 util-linux kmod                # `ip link set lo up`, unshare
)

# The server packages must not start their own services on the host (the tier runs its own
# ganesha and rpcbind inside a private network namespace).
APT_TAG=setup-nfs NO_SERVICES=1 bash scripts/apt-install.sh "${APT_PACKAGES[@]}"
echo "setup-nfs: host packages done"
