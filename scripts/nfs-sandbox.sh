#!/usr/bin/env bash
# Run a command in a private network, mount and PID namespace (root only), for the NFS tier.
#
# rpcbind, nfs-ganesha, qemu and its guestfwd forwarders then use their standard ports on a
# private loopback without meeting anything else on the machine; a tmpfs on /run keeps
# rpcbind's and ganesha's sockets and lock files private; and `--kill-child` takes every
# process of the run down with it, even if pytest itself is killed.
set -euo pipefail
if [ "${FUSEMUX_NFS_SANDBOX:-}" != 1 ]; then
  exec unshare --net --mount --pid --fork --kill-child --mount-proc --propagation private \
    env FUSEMUX_NFS_SANDBOX=1 bash "$0" "$@"
fi
ip link set lo up
mount -t tmpfs -o mode=0755 tmpfs /run
# Not exec: bash stays PID 1 of the namespace and reaps whatever gets orphaned.
"$@"
