#!/usr/bin/env bash
# Host packages for the libvirt tier (tests/libvirt, `make test-libvirt`), on Debian 12 as
# root. Kept apart from scripts/setup.sh so that the normal setup stays lean. The packages'
# services are NOT started (NO_SERVICES=1): the tier runs its own libvirtd, virtlogd and
# virtlockd as child processes with private config/run/state directories.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  # libvirt-daemon alone lacks /etc/libvirt/qemu.conf and the libvirt-qemu user; the -sysv
  # variant avoids pulling systemd units (this tier needs no systemd).
  libvirt-daemon-system libvirt-daemon-system-sysv libvirt-clients
  qemu-system-x86 qemu-utils        # the TCG domain; qemu-img for images and overlays
  attr util-linux iproute2          # getfattr; unshare/nsenter; ip (migration namespaces)
)

APT_TAG=setup-libvirt NO_SERVICES=1 bash scripts/apt-install.sh "${APT_PACKAGES[@]}"
echo "setup-libvirt: host packages done"
