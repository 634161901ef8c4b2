#!/usr/bin/env bash
# Install everything fusemux needs on a Debian 12 or 13 host (as root): system packages, a
# venv in .venv built from the system Python, and fusemux with its test and lint tools into it.
#
# The packages cover every external command fusemux and its tests run (grep tests/ and
# fusemux/ for them): mount/umount/losetup (mount), setpriv (util-linux), fincore
# (util-linux-extra: its own package on Debian 13; on 12 util-linux depends on it), sfdisk
# (fdisk), mkfs.ext4/debugfs (e2fsprogs), getfattr/setfattr (attr), fusermount3 (fuse3),
# qemu-img/qemu-io/qemu-nbd (qemu-utils), qemu-system-x86_64 (qemu-system-x86: a paused VM
# holding its disk's locks), systemd-analyze (systemd: the unit file check; a bare root or a
# container may lack it), fio and mergerfs (benchmarks and their smoke test). No test may call
# git: a checkout made from a tarball has none.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc make pkg-config
  libfuse3-dev fuse3
  qemu-utils attr e2fsprogs util-linux util-linux-extra mount procps kmod fdisk
  fio mergerfs
  qemu-system-x86 systemd
)

APT_TAG=setup bash scripts/apt-install.sh "${APT_PACKAGES[@]}"
NO_SERVICES=1 APT_TAG=setup bash scripts/apt-install.sh prometheus  # tests/mount/test_metrics.py

# The system Python (Debian 12: 3.11, 13: 3.13) has venv and headers once the packages above
# are in.
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,dev]'
touch .venv/.setup-done
echo "setup: done (.venv)"
