#!/usr/bin/env bash
# Shared by scripts/setup.sh and scripts/setup-nfs.sh: install the Debian packages given as
# arguments that are not installed yet (as root; `apt-get update` first). With
# NO_SERVICES=1, services the packages ship are not started (policy-rc.d), so installing a
# server package for the tests leaves no daemon running on the host.
set -euo pipefail
tag=${APT_TAG:-setup}
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "$tag: missing packages ${missing[*]}; run as root (apt-get install)" >&2
  exit 1
fi
echo "$tag: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ "${NO_SERVICES:-0}" = 1 ] && [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod 0755 "$policy"
  own_policy=1
fi
cleanup() { if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
