"""A real Linux guest as a judge: Debian's cloud kernel under QEMU (TCG), an initramfs built here
from busybox, the host's mke2fs and e2fsck and the kernel's own modules, and a serial console to read the
guest's verdict from.

Everything the guest needs is found on the host (:func:`missing_judges` names what is not), so a
missing tool fails the test before the vdisk side runs."""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Iterable, Optional, Union

QEMU = "qemu-system-x86_64"
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")
# e2fsprogs tools copied into the guest (busybox's mke2fs makes ext2 only and it has no fsck).
E2FS_TOOLS = ("mke2fs", "e2fsck")
# What the guest needs from the cloud kernel's modules (the rest comes from modules.dep).
MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod")


def kernel() -> Optional[tuple[Path, Path]]:
    """(vmlinuz, its /lib/modules folder) of an installed cloud kernel, newest first, or None."""
    def version_key(path: str) -> list:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]

    for image in sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"), key=version_key, reverse=True):
        version = os.path.basename(image)[len("vmlinuz-"):]
        modules = Path("/lib/modules") / version
        if os.access(image, os.R_OK) and (modules / "modules.dep").exists():
            return Path(image), modules
    return None


def busybox() -> Optional[str]:
    """A statically linked busybox (it runs in the guest without any library)."""
    for path in BUSYBOX_PATHS:
        if os.access(path, os.X_OK):
            out = subprocess.run(["ldd", path], capture_output=True, text=True)
            if "not a dynamic executable" in out.stdout + out.stderr or out.returncode != 0:
                return path
    return None


def e2fs_tool(name: str) -> Optional[str]:
    return next((p for p in (f"/sbin/{name}", f"/usr/sbin/{name}") if os.access(p, os.X_OK)), None)


def qemu_has_iscsi() -> bool:
    """QEMU's libiscsi block driver is a module (qemu-block-extra); without it "Unknown driver"."""
    probe = subprocess.run([QEMU, "-drive", "driver=iscsi,help"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
    return "Unknown driver" not in probe.stderr


def missing_judges() -> list[str]:
    """What the guest test needs and this machine lacks (CI installs all of it)."""
    missing = [tool for tool in (QEMU, "e2fsck", "debugfs", "ldd") if shutil.which(tool) is None]
    if QEMU not in missing and not qemu_has_iscsi():
        missing.append("QEMU's libiscsi block driver (apt-get install qemu-block-extra)")
    if kernel() is None:
        missing.append("a cloud kernel (/boot/vmlinuz-*-cloud-amd64: "
                       "apt-get install linux-image-cloud-amd64)")
    if busybox() is None:
        missing.append("a static busybox (apt-get install busybox-static)")
    missing += [f"{name} (e2fsprogs)" for name in E2FS_TOOLS if e2fs_tool(name) is None]
    return missing


# -- initramfs ---------------------------------------------------------------------------------

class Cpio:
    """An uncompressed newc ("070701") archive, the format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._ino += 1
        self._parts += [header, encoded, bytes((-(len(header) + len(encoded))) & 3),
                        data, bytes((-len(data)) & 3)]

    def directory(self, name: str) -> None:
        name = name.strip("/")
        if not name or name in self._dirs:
            return
        self.directory(os.path.dirname(name))
        self._dirs.add(name)
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def node(self, name: str, kind: int, major: int, minor: int, mode: int = 0o600) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        encoded = name.encode() + b"\0"
        fields = (self._ino, kind | mode, 0, 0, 1, 0, 0, 0, 0, major, minor, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._ino += 1
        self._parts += [header, encoded, bytes((-(len(header) + len(encoded))) & 3)]

    def host_file(self, name: str, path: Union[str, Path]) -> None:
        """A host file (symlinks followed), keeping its permission bits."""
        self.file(name, Path(path).read_bytes(), os.stat(path).st_mode & 0o777)

    def getvalue(self) -> bytes:
        trailer = Cpio()
        trailer._ino = 0
        trailer._entry("TRAILER!!!", 0)
        return b"".join(self._parts + trailer._parts)


def shared_libraries(binary: str) -> list[str]:
    """The libraries (and the loader) ``binary`` loads, as ``ldd`` resolves them on this host."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        match = re.search(r"(/\S+)", line.split("=>")[-1])
        if match and os.path.exists(match.group(1)):
            libs.append(match.group(1))
    return libs


def module_order(modules_dir: Path, wanted: Iterable[str]) -> list[str]:
    """Relative paths of ``wanted`` modules and their dependencies, each after what it needs."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[os.path.basename(path).split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps[path]:
            visit(dep)
        order.append(path)

    for name in wanted:
        if name in by_name:            # absent: built into this kernel
            visit(by_name[name])
    return order


def build_initramfs(init_script: str, data: dict[str, bytes]) -> bytes:
    """An initramfs whose /init is ``init_script`` (run by busybox sh), with busybox's applets,
    the host's mke2fs and e2fsck with their libraries, the block-device modules (insmod-ed in order from
    /modules.order) and ``data`` (guest path -> bytes)."""
    image_modules = kernel()
    assert image_modules is not None
    _, modules_dir = image_modules
    archive = Cpio()
    for folder in ("dev", "proc", "sys", "tmp", "mnt", "root", "etc"):
        archive.directory(folder)
    archive.node("dev/console", stat.S_IFCHR, 5, 1)
    archive.node("dev/null", stat.S_IFCHR, 1, 3, 0o666)
    archive.host_file("bin/busybox", busybox())
    archive.symlink("bin/sh", "busybox")
    libraries: set[str] = set()
    for name in E2FS_TOOLS:
        tool = e2fs_tool(name)
        archive.host_file("sbin/" + name, tool)
        libraries.update(shared_libraries(tool))
    for lib in sorted(libraries):
        archive.host_file(lib, lib)
    if os.path.exists("/etc/mke2fs.conf"):
        archive.host_file("etc/mke2fs.conf", "/etc/mke2fs.conf")
    order = module_order(modules_dir, MODULES)
    for rel in order:
        archive.host_file("modules/" + os.path.basename(rel), modules_dir / rel)
    archive.file("modules.order", "".join(os.path.basename(r) + "\n" for r in order).encode())
    for name, blob in data.items():
        archive.file(name, blob)
    archive.file("init", init_script.encode(), 0o755)
    return archive.getvalue()


# -- running the guest -------------------------------------------------------------------------

class GuestResult:
    def __init__(self, console: str, returncode: Optional[int], seconds: float):
        self.console = console
        self.returncode = returncode
        self.seconds = seconds

    def lines(self, prefix: str) -> list[str]:
        return [line.strip() for line in self.console.splitlines() if line.strip().startswith(prefix)]

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-n:])


def run_guest(initrd: Path, drive_args: list[str], console: Path, *, timeout: float = 120.0,
              memory: str = "256") -> GuestResult:
    """Boot the cloud kernel with ``initrd`` and the given drive/device arguments until the guest
    powers off (or ``timeout`` passes: then QEMU is killed). The serial console goes to
    ``console``; QEMU never outlives this call."""
    image_modules = kernel()
    assert image_modules is not None
    vmlinuz, _ = image_modules
    cmd = [QEMU, "-accel", "tcg", "-machine", "q35", "-m", memory, "-smp", "1", "-nodefaults",
           "-display", "none", "-no-reboot", "-serial", f"file:{console}",
           "-kernel", str(vmlinuz), "-initrd", str(initrd),
           "-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init", *drive_args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code: Optional[int] = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
        out = b""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = console.read_text(errors="replace") if console.exists() else ""
    if out:
        text += "\n[qemu] " + out.decode(errors="replace")
    if code is None:
        text += f"\n[test] QEMU killed after {timeout:.0f} s"
    return GuestResult(text, code, time.monotonic() - start)
