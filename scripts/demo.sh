#!/usr/bin/env bash
# `make demo`: the everyday job on a real Windows 7 dynamic VHD bundled in fixtures/.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin/vdisk
W=demo-output
rm -rf "$W" && mkdir -p "$W"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

.venv/bin/python -c "import lzma, shutil; shutil.copyfileobj(lzma.open('fixtures/rdisk_win7dyn.vhd.xz'), open('$W/win7.vhd', 'wb'))"
step $V info "$W/win7.vhd"
step $V map "$W/win7.vhd"
step $V check "$W/win7.vhd"
step $V convert "$W/win7.vhd" "$W/win7.vdi" -O vdi
step $V compare "$W/win7.vhd" "$W/win7.vdi"
step $V create "$W/work.vdi" -f vdi --parent "$W/win7.vdi"
.venv/bin/python - "$W/work.vdi" <<'PY'
import sys, vdisk
with vdisk.open(sys.argv[1], "r+") as d:          # a differencing child: the parent stays untouched
    d.pwrite(b"written by the vdisk demo".ljust(512, b"\0"), 64 << 20)
PY
step $V info "$W/work.vdi" --chain
step $V compact "$W/win7.vdi" --dry-run
step qemu-img check -f vdi "$W/win7.vdi"
printf '\nDone: the images are in %s/ (remove it when you are finished).\n' "$W"
