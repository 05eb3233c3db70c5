#!/usr/bin/env bash
# `make demo`: the everyday job on a real Windows 7 dynamic VHD bundled in fixtures/: inspect,
# measure, convert, layer, mount, serve over NBD, shadow-copy. Everything it makes goes into
# demo-output/, which it removes at the end (also when a step fails or on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin/vdisk
W=demo-output
MNT="$W/mnt"
SERVER=""
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then kill -INT "$SERVER"; wait "$SERVER" || true; fi
  if mountpoint -q "$MNT" 2>/dev/null; then $V umount "$MNT" || true; fi
  show "rm -rf $W"
  rm -rf "$W"
  exit $status
}
rm -rf "$W" && mkdir -p "$W"
trap cleanup EXIT INT TERM

show() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }   # for commands with redirections, run beside it
show "xz -dc fixtures/rdisk_win7dyn.vhd.xz > $W/win7.vhd"
xz -dc fixtures/rdisk_win7dyn.vhd.xz > "$W/win7.vhd"
step $V info "$W/win7.vhd"
step $V map "$W/win7.vhd"
step $V map "$W/win7.vhd" --svg "$W/win7-map.svg"
step $V measure "$W/win7.vhd" -O vdi
step $V check "$W/win7.vhd"
step $V convert "$W/win7.vhd" "$W/win7.vdi" -O vdi
step $V compare "$W/win7.vhd" "$W/win7.vdi"
step $V create "$W/work.vdi" -f vdi --parent "$W/win7.vdi"
step .venv/bin/python -c "
import vdisk                                    # a differencing child: the parent stays untouched
with vdisk.open('$W/work.vdi', 'r+') as d:
    d.pwrite(b'written by the vdisk demo'.ljust(512, b'\0'), 64 << 20)"
step $V info "$W/work.vdi" --chain
step $V compact "$W/win7.vdi" --dry-run
step qemu-img check -f vdi "$W/win7.vdi"

# Mount read-only: the disk and each partition as a file; fdisk reads the table from the mount.
mkdir -p "$MNT"
step $V mount "$W/win7.vhd" "$MNT"
step ls -l "$MNT" "$MNT/by-name"
step fdisk -l "$MNT/disk"
step $V umount "$MNT"

# Serve over NBD (loopback, read-only) and ask a real client about it.
PORT=$(.venv/bin/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
show "$V serve nbd $W/win7.vhd --port $PORT &"
$V serve nbd "$W/win7.vhd" --port "$PORT" 2> "$W/serve.log" &
SERVER=$!
for _ in $(seq 100); do grep -q '^serving' "$W/serve.log" 2>/dev/null && break; sleep 0.1; done
cat "$W/serve.log"
step nbdinfo "nbd://127.0.0.1:$PORT/win7.vhd"
show "kill -INT $SERVER"
kill -INT "$SERVER"; wait "$SERVER" || true; SERVER=""

# A shadow copy (on a copy of the image): a read-only point in time while the image moves on.
step cp --sparse=always "$W/win7.vhd" "$W/live.vhd"
show "$V shadow create $W/live.vhd --description 'before the change'"
ID=$($V shadow create "$W/live.vhd" --description "before the change" | tail -n 1)
echo "$ID"
step .venv/bin/python -c "
import vdisk
with vdisk.open('$W/live.vhd', 'r+') as d:
    d.pwrite(b'changed after the shadow copy'.ljust(4096, b'\0'), 100 << 20)"
step $V shadow list "$W/live.vhd"
step $V shadow diff "$W/live.vhd" "$ID"
step $V shadow export "$W/live.vhd" "$ID" "$W/before.vhd"
step $V compare "$W/win7.vhd" "$W/before.vhd"

printf '\nDone.\n'
