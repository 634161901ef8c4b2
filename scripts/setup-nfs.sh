#!/usr/bin/env bash
# Host packages for the NFS guest tier (tests/nfs, `make test-nfs`), on Debian 12 as root.
# Kept apart from scripts/setup.sh so that the normal setup stays lean. The guest's kernel,
# busybox and rootfs are NOT installed here: tests/nfs/build-image.sh downloads and unpacks
# them into a cache (apt-get download + dpkg-deb -x, debootstrap), never onto the host.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  nfs-ganesha nfs-ganesha-vfs rpcbind   # the NFS server, on loopback in a private netns
  qemu-system-x86                       # the TCG guest that has a kernel NFS client
  debootstrap e2fsprogs cpio xz-utils zstd   # building the guest's rootfs and initramfs
  iproute2 util-linux kmod                # `ip link set lo up`, unshare
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-nfs: missing packages ${missing[*]}; run as root (apt-get install)" >&2
    exit 1
  fi
  echo "setup-nfs: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # ganesha's postinst starts its services where systemd runs; policy-rc.d keeps them off.
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
echo "setup-nfs: host packages done"
