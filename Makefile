# Two commands a newcomer needs: `make demo` and `make test`. Both set everything up on a fresh
# Debian machine (apt packages when missing and we are root, a virtualenv, the project itself).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := qemu-utils qemu-block-extra qemu-system-x86 libvhdi-utils fuse3 libnbd-bin python3-libnbd nbdkit libiscsi-bin hdparm \
                e2fsprogs fdisk gdisk mtools xz-utils bzip2 tar python3-venv zstd linux-image-cloud-amd64 busybox-static \
                dosfstools exfatprogs ntfs-3g zerofree

.PHONY: demo test bench deps venv clean

deps:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing apt packages: $(APT_PACKAGES)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	  else echo "note: some test tools are missing; run as root or: sudo apt-get install $(APT_PACKAGES)"; fi; \
	fi

$(BIN)/python:
	$(PY) -m venv $(VENV)

venv: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(BIN)/pip install -q -e '.[test,mount]'

test: deps venv
	$(BIN)/pytest -q

demo: deps venv
	@bash scripts/demo.sh

# Every benchmark, each against its anchor tool in the same run (several minutes; not a test).
BENCHES := core convert compact mount nbd scsi shadow backup scale vhdx fsaware iscsi
bench: deps venv
	@for b in $(BENCHES); do echo "== bench/bench_$$b.py"; $(BIN)/python bench/bench_$$b.py || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
