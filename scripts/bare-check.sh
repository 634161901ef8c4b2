#!/usr/bin/env bash
# Check the README's two commands on a bare Debian root, as root: `bare-check.sh RELEASE MODE
# [DIR]` with RELEASE bookworm|trixie and MODE test|demo. Not part of `make test` (it
# debootstraps a root and downloads every package and wheel; 10-30 minutes).
#
# DIR (default /var/tmp/bare-RELEASE-MODE) gets root/: a `debootstrap --variant=minbase` of
# RELEASE plus ca-certificates and python3 (what Debian's cloud images carry; they have no
# make, gcc or python3-venv), with apt's lists emptied, and a `git clone` of this checkout's
# HEAD in root/root/fusemux. The command runs there with chroot, in a private mount namespace
# (`unshare --mount --propagation private`, so the tests' mounts never reach the host), with
# /proc, /sys and a plain tmpfs /dev holding only the nodes a container has (null zero full
# random urandom tty ptmx+pts shm fuse loop-control loop0..63): no devtmpfs, no udev.
#
# test: runs `./dev test` and keeps its output in DIR/test.log.
# demo: starts `./dev demo` in its own process group, lists the volumes, writes and reads one
#       with qemu-io, sends SIGINT to that group, then checks that no mount and no loop device
#       over a file of the root is left. Output in DIR/demo.log.
# Mounts are undone on exit; DIR is left for inspection: remove it with `rm -rf DIR`.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if [ "${1:-}" = --inner ]; then
  shift
  DIR=$1 MODE=$2
  R=$DIR/root
  cleanup() {
    set +e
    for m in dev/shm dev/pts dev sys proc; do
      mountpoint -q "$R/$m" && umount -l "$R/$m"
    done
    mountpoint -q "$R" && umount -l "$R"
  }
  trap cleanup EXIT
  # The root is a mount of its own, as on a machine or in a container (mountinfo shows "/").
  mount --bind "$R" "$R"
  mount -t proc proc "$R/proc"
  mount -t sysfs sys "$R/sys"
  mount -t tmpfs -o mode=0755,size=16m,nosuid tmpfs "$R/dev"
  mknod -m 666 "$R/dev/null" c 1 3
  mknod -m 666 "$R/dev/zero" c 1 5
  mknod -m 666 "$R/dev/full" c 1 7
  mknod -m 666 "$R/dev/random" c 1 8
  mknod -m 666 "$R/dev/urandom" c 1 9
  mknod -m 666 "$R/dev/tty" c 5 0
  mknod -m 666 "$R/dev/fuse" c 10 229
  mknod -m 660 "$R/dev/loop-control" c 10 237
  for n in $(seq 0 63); do mknod -m 660 "$R/dev/loop$n" b 7 "$n"; done
  mkdir "$R/dev/pts" "$R/dev/shm"
  mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"
  ln -s pts/ptmx "$R/dev/ptmx"
  mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
  ln -s /proc/self/fd "$R/dev/fd"
  ln -s /proc/self/fd/0 "$R/dev/stdin"
  ln -s /proc/self/fd/1 "$R/dev/stdout"
  ln -s /proc/self/fd/2 "$R/dev/stderr"
  in_root() {
    chroot "$R" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
      PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
  }
  t0=$(date +%s)
  if [ "$MODE" = test ]; then
    rc=0
    in_root bash -c 'cd /root/fusemux && ./dev test' >"$DIR/test.log" 2>&1 </dev/null || rc=$?
    echo "bare-check: ./dev test exited $rc after $(($(date +%s) - t0))s"
    grep -E '^=+ .*(passed|failed|error).* in ' "$DIR/test.log" | tail -n 1 || true
    exit "$rc"
  fi
  # demo
  setsid chroot "$R" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    bash -c 'cd /root/fusemux && exec ./dev demo' >"$DIR/demo.log" 2>&1 </dev/null &
  demo=$!
  ok=0
  for _ in $(seq 1 1800); do
    grep -q "Press Ctrl-C to stop" "$DIR/demo.log" && { ok=1; break; }
    kill -0 "$demo" 2>/dev/null || break
    sleep 1
  done
  echo "bare-check: demo serving=$ok after $(($(date +%s) - t0))s"
  status=1
  if [ "$ok" = 1 ]; then
    sleep 2
    mnt=/var/tmp/fusemux-demo/mnt
    vol=$mnt/volumes/gold/vm1-root.raw
    if in_root bash -c "ls -l $mnt/volumes/* && qemu-io -f raw -t none \
        -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' $vol && \
        getfattr -d -m user.fusemux $vol && /root/fusemux/.venv/bin/fusemux status $mnt"; then
      status=0
    fi
  fi
  kill -INT -- "-$demo" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$demo" 2>/dev/null || break; sleep 1; done
  if kill -0 "$demo" 2>/dev/null; then
    echo "bare-check: demo still running 60s after SIGINT; SIGKILL"
    kill -KILL -- "-$demo" 2>/dev/null || true
    status=1
  fi
  wait "$demo" || echo "bare-check: demo exited $?"
  left=$(grep -F " $R/" /proc/self/mountinfo | grep -vE " $R/(proc|sys|dev)[ /]" || true)
  [ -z "$left" ] || { echo "bare-check: mounts left:"; echo "$left"; status=1; }
  loops=$(grep -lF "$DIR" /sys/block/loop*/loop/backing_file 2>/dev/null || true)
  loops+=$(grep -lF "/var/tmp/fusemux-demo" /sys/block/loop*/loop/backing_file 2>/dev/null || true)
  [ -z "$loops" ] || { echo "bare-check: loop devices left: $loops"; status=1; }
  echo "bare-check: demo check status=$status after $(($(date +%s) - t0))s"
  exit "$status"
fi

RELEASE=${1:?usage: bare-check.sh bookworm|trixie test|demo [DIR]}
MODE=${2:?usage: bare-check.sh bookworm|trixie test|demo [DIR]}
DIR=${3:-/var/tmp/bare-$RELEASE-$MODE}
[ "$(id -u)" -eq 0 ] || { echo "bare-check: run as root" >&2; exit 1; }
case $MODE in test | demo) ;; *) echo "bare-check: MODE is test or demo" >&2; exit 2 ;; esac
command -v debootstrap >/dev/null || { echo "bare-check: apt-get install debootstrap" >&2; exit 1; }
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
R=$DIR/root
if [ ! -x "$R/usr/bin/python3" ] && [ -n "${BARE_FROM:-}" ]; then
  cp -a "$BARE_FROM" "$R"  # a copy of an earlier debootstrap of the same release
elif [ ! -x "$R/usr/bin/python3" ]; then
  t0=$(date +%s)
  debootstrap --variant=minbase --include=ca-certificates,python3 "$RELEASE" "$R" "$MIRROR" \
    >"$DIR/debootstrap.log" 2>&1
  echo "bare-check: debootstrap $RELEASE in $(($(date +%s) - t0))s"
fi
# What a fresh cloud image has: no package lists, no downloaded packages.
find "$R/var/lib/apt/lists" -maxdepth 1 -type f -delete
find "$R/var/cache/apt" -name '*.bin' -delete
find "$R/var/cache/apt/archives" -maxdepth 1 -name '*.deb' -delete
cp -L /etc/resolv.conf "$R/etc/resolv.conf"
# Where this machine reaches PyPI through an egress proxy with its own CA, the root trusts the
# same local CAs as the host (a cloud machine with direct access needs none).
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$R/usr/local/share/ca-certificates/"
  chroot "$R" update-ca-certificates >/dev/null
fi
rm -rf "$R/root/fusemux"
git clone -q "$REPO" "$R/root/fusemux"
echo "bare-check: $RELEASE $MODE in $R at $(git -C "$R/root/fusemux" log --oneline -1)"
exec unshare --mount --propagation private bash "$0" --inner "$DIR" "$MODE"
