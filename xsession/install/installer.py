"""The install itself, in dom0, with Debian's tools.

:func:`plan` is pure: from what is installed (:class:`Source`), the target
disk and a new identity it returns the :class:`Step` list; :func:`run` carries
the steps out, reporting bytes done and checking for a cancel between steps and
inside the copy. The layout is GPT::

    1  1 MiB   BIOS boot (ef02)     GRUB's core for BIOS machines
    2  64 MiB  EFI system (ef00)    FAT32, GRUB as EFI/BOOT/BOOTX64.EFI (the removable path)
    3  rest    Linux root (8304)    ext4: the flavour's root as mastered, its new identity

Two kinds of flavour:

* a demo flavour's root is its kernel and initramfs (its whole system) plus
  ``/etc`` with the identity; it boots with ``xenubuntu.root=UUID=...``;
* an installed system's (``source: disk``) root is its file system image on the
  medium, as mastered (never the session's overlay): written into the root
  partition with ``qemu-img convert``, checked, grown and given a new UUID;
  then its live-session leftovers go (autologin, the guest agent, root without
  a password, the demo user's known password must be changed at first login).

Cancelled or failed after the first write, the disk's partition table and
signatures are wiped (:data:`SAFE_STATE`): nothing on it looks bootable.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HostUnfit, InstallFailed

__all__ = ["Source", "Identity", "Step", "plan", "run", "needed_bytes", "host_problems", "new_identity",
           "partition", "kernel_line", "grub_cfg", "SAFE_STATE", "CPU_FLAGS", "BIOS_MIB", "ESP_MIB", "LEFTOVERS"]

BIOS_MIB = 1
ESP_MIB = 64
#: root file system room beyond the files copied (ext4's own metadata, logs to come)
ROOT_SLACK_MIB = 64
#: what Debian's amd64 kernel needs of the CPU (the x86-64 baseline)
CPU_FLAGS = ("lm", "cmov", "cx8", "fpu", "fxsr", "mmx", "syscall", "sse", "sse2")
SAFE_STATE = "the partition table and signatures were wiped: nothing on the disk looks bootable"
COPY_CHUNK = 1 << 20
TOOL_TIMEOUT_S = 600


@dataclass(frozen=True)
class Source:
    """What gets installed, as it is on the medium: the kernel and initramfs, and for an
    installed system its root file system image (``root_image``, of ``root_image_size``
    bytes once raw). ``cmdline``: the flavour's kernel command line."""

    flavour: str
    title: str
    kernel: Path
    initrd: Path
    memory_mib: int
    cmdline: str = "console=ttyS0 panic=-1"
    root_image: Path | None = None
    root_image_size: int = 0

    def files(self) -> list[tuple[Path, str]]:
        """(file in dom0, path inside the new root)."""
        return [(self.kernel, "boot/vmlinuz"), (self.initrd, "boot/initrd.img")]

    def files_size(self) -> int:
        return sum(p.stat().st_size for p, _ in self.files())

    def size(self) -> int:
        """Bytes the root holds once installed."""
        return self.files_size() + self.root_image_size


@dataclass(frozen=True)
class Identity:
    """The installed system's own: file system UUIDs, machine-id, hostname."""

    hostname: str
    machine_id: str       # 32 hex digits (machine-id(5))
    root_uuid: str
    esp_id: str           # FAT volume id, 8 hex digits

    @property
    def esp_uuid(self) -> str:  # how blkid and fstab spell a FAT volume id
        return f"{self.esp_id[:4].upper()}-{self.esp_id[4:].upper()}"


def new_identity(flavour: str) -> Identity:
    mid = uuid.uuid4().hex
    return Identity(hostname=f"{flavour}-{mid[:6]}", machine_id=mid, root_uuid=str(uuid.uuid4()),
                    esp_id=uuid.uuid4().hex[:8])


def needed_bytes(source_size: int) -> int:
    """The smallest disk the flavour fits on: the partitions, the root's files and room."""
    mib = 1 + BIOS_MIB + ESP_MIB + ROOT_SLACK_MIB + 1  # GPT's own at both ends
    return mib * 2**20 + source_size * 11 // 10


def host_problems(host_memory: int, cpu_flags: set[str], memory_mib: int, disk_size: int,
                  needed: int) -> list[str]:
    """The check before writing (pure): what this computer lacks to run the installed
    flavour, each with its numbers; empty when nothing."""
    problems = []
    if host_memory < memory_mib * 2**20:
        problems.append(f"it has {host_memory // 2**20} MiB of memory; the flavour needs {memory_mib} MiB")
    if disk_size < needed:
        problems.append(f"the disk has {disk_size // 2**20} MiB; the flavour needs {needed // 2**20} MiB")
    missing = [f for f in CPU_FLAGS if f not in cpu_flags]
    if missing:
        problems.append(f"its CPU lacks {', '.join(missing)} ({len(missing)} of the {len(CPU_FLAGS)} "
                        "features a 64-bit kernel needs)")
    return problems


def partition(device: str, number: int) -> str:
    """The node of a partition: ``/dev/sda3``, ``/dev/loop0p3``, ``/dev/nvme0n1p3``."""
    return f"{device}p{number}" if device[-1].isdigit() else f"{device}{number}"


@dataclass(frozen=True)
class Step:
    """One step: a command (``argv``), or a copy of ``files`` into the new root, or
    ``write`` of text files into it; ``weight`` in bytes for progress."""

    name: str
    argv: tuple[str, ...] = ()
    files: tuple[tuple[Path, str], ...] = ()
    write: tuple[tuple[str, str], ...] = ()
    weight: int = 1 << 20
    writes_disk: bool = True
    #: the command prints its progress as qemu-img -p does ("(12.34/100%)")
    progress: bool = False
    ok_codes: tuple[int, ...] = (0,)


#: kernel options of a session that an installed system does without: the root is
#: named by UUID, and page poisoning only kept the statefiles small
_SESSION_ONLY = ("root=", "rw", "ro", "init_on_free=", "init_on_alloc=", "panic=")


def kernel_line(source: Source, ident: Identity) -> str:
    """The installed system's kernel options (pure)."""
    if source.root_image is None:  # the demo guest's init mounts its installed root itself
        return f"{source.cmdline} xenubuntu.root=UUID={ident.root_uuid}"
    kept = [o for o in source.cmdline.split()
            if not any(o == p or (p.endswith("=") and o.startswith(p)) for p in _SESSION_ONLY)]
    return " ".join([f"root=UUID={ident.root_uuid}", "ro", *kept])


def grub_cfg(source: Source, ident: Identity) -> str:
    return (f"# {source.title}, installed by XenUbuntu\n"
            "set timeout=0\n"
            "serial --unit=0 --speed=115200\n"
            "terminal_input serial console\nterminal_output serial console\n"
            f"search --no-floppy --fs-uuid --set=root {ident.root_uuid}\n"
            f"menuentry '{source.title}' {{\n"
            f"  linux /boot/vmlinuz {kernel_line(source, ident)}\n"
            "  initrd /boot/initrd.img\n"
            "}\n")


#: an installed system's live-session leftovers (paths in its root)
LEFTOVERS = ("etc/lightdm/lightdm.conf.d/50-xenubuntu.conf", "etc/xdg/autostart/xenubuntu-agent.desktop",
             "etc/systemd/system/multi-user.target.wants/xenubuntu-agent.service",
             "etc/systemd/system/xenubuntu-agent.service", "usr/local/bin/xenubuntu-agent",
             "etc/udev/rules.d/60-xenubuntu-guest.rules", "etc/xenubuntu", "usr/local/bin/xenubuntu-install",
             "usr/share/applications/xenubuntu-install.desktop")
#: root gets a locked password (the session's had none); the demo user's known one must change
ACCOUNTS_SCRIPT = ('set -e; passwd --root "$1" --lock root >/dev/null; '
                   'if grep -q "^user:" "$1/etc/passwd"; then chage --root "$1" --lastday 0 user; fi')


def _root_steps(source: Source, ident: Identity, root: str) -> list[Step]:
    if source.root_image is None:
        return [Step("make the root file system",
                     ("mkfs.ext4", "-q", "-F", "-L", source.flavour[:16], "-U", ident.root_uuid, root),
                     weight=4 << 20)]
    return [
        Step("copy the flavour's root file system as mastered",
             ("qemu-img", "convert", "-p", "-n", "-O", "raw", str(source.root_image), root),
             weight=source.root_image_size, progress=True),
        Step("check the copied file system", ("e2fsck", "-f", "-y", root), ok_codes=(0, 1)),
        Step("grow it to its partition", ("resize2fs", root)),
        Step("give it its own UUID and label", ("tune2fs", "-U", ident.root_uuid, "-L", source.flavour[:16], root)),
    ]


def plan(source: Source, device: str, ident: Identity, mnt: str) -> list[Step]:
    """The steps that install ``source`` onto ``device`` (pure); ``mnt`` is where the new
    root is mounted while it is filled."""
    esp, root = partition(device, 2), partition(device, 3)
    fstab = (f"# <file system> <mount point> <type> <options> <dump> <pass>\n"
             f"UUID={ident.root_uuid} / ext4 errors=remount-ro 0 1\n"
             f"UUID={ident.esp_uuid} /boot/efi vfat umask=0077,nofail,x-systemd.device-timeout=10s 0 2\n")
    return [
        Step("wipe the disk", ("wipefs", "--all", "--quiet", device)),
        Step("partition (GPT: BIOS boot, EFI system, root)",
             ("sgdisk", "--zap-all", "--clear",
              f"--new=1:2048:+{BIOS_MIB}M", "--typecode=1:ef02", "--change-name=1:BIOS boot",
              f"--new=2:0:+{ESP_MIB}M", "--typecode=2:ef00", "--change-name=2:EFI system",
              "--new=3:0:0", "--typecode=3:8304", f"--change-name=3:{source.flavour}", device)),
        # the kernel may keep the old table when the disk was busy a moment: partx tells it
        Step("wait for the partitions", ("sh", "-c", 'partx --update "$3" || blockdev --rereadpt "$3"; '
                                         'udevadm settle --timeout=30 2>/dev/null; '
                                         'for _ in $(seq 300); do [ -b "$1" ] && [ -b "$2" ] && exit 0; sleep 0.1; '
                                         'done; echo "no $1 or $2" >&2; exit 1', "sh", esp, root, device),
             writes_disk=False),
        Step("make the EFI file system", ("mkfs.vfat", "-F", "32", "-n", "EFI", "-i", ident.esp_id, esp)),
        *_root_steps(source, ident, root),
        Step("mount the new root", ("mount", "-t", "ext4", root, mnt), writes_disk=False),
        Step("copy the flavour's kernel and initramfs as mastered", files=tuple(source.files()),
             weight=source.files_size()),
        *([] if source.root_image is None else [
            Step("remove the live session's leftovers (autologin, the guest agent)",
                 ("sh", "-c", 'cd "$1" && shift && rm -rf -- "$@"', "sh", mnt, *LEFTOVERS)),
            Step("lock root's password; the known one of the desktop's user must change",
                 ("sh", "-c", ACCOUNTS_SCRIPT, "sh", mnt))]),
        Step("give it its own identity", write=(
            ("etc/hostname", ident.hostname + "\n"),
            ("etc/machine-id", ident.machine_id + "\n"),
            ("etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{ident.hostname}\n"),
            ("etc/fstab", fstab),
            ("boot/grub/grub.cfg", grub_cfg(source, ident)),
            ("boot/grub/efi-early.cfg", f"search.fs_uuid {ident.root_uuid} root\nset prefix=($root)/boot/grub\n"),
        )),
        Step("install GRUB for BIOS", ("grub-install", "--target=i386-pc", f"--boot-directory={mnt}/boot",
                                       "--no-floppy", device), weight=4 << 20),
        # the EFI image as grub-install makes it (its early config finds the root by UUID),
        # written into the FAT file system with mtools: no need to mount it in dom0
        Step("install GRUB for EFI", ("sh", "-c", EFI_SCRIPT, "sh", mnt, esp, *EFI_MODULES), weight=4 << 20),
        Step("write everything out", ("sync",), writes_disk=False),
    ]


#: built into the EFI image: enough to find the root and read grub.cfg; the rest is
#: copied to /boot/grub/x86_64-efi as grub-install does
EFI_MODULES = ("part_gpt", "part_msdos", "ext2", "fat", "search", "search_fs_uuid", "normal", "configfile",
               "linux", "echo", "test", "serial", "terminal", "efi_gop", "gzio")
EFI_SCRIPT = (
    'set -e; mnt=$1; esp=$2; shift 2; '
    'mkdir -p "$mnt/boot/grub/x86_64-efi"; '
    'cp /usr/lib/grub/x86_64-efi/*.mod /usr/lib/grub/x86_64-efi/*.lst "$mnt/boot/grub/x86_64-efi/"; '
    'grub-mkimage -O x86_64-efi -p /boot/grub -c "$mnt/boot/grub/efi-early.cfg" '
    '-o "$mnt/boot/grub/BOOTX64.EFI" "$@"; '
    'mmd -i "$esp" ::EFI ::EFI/BOOT; '
    'mcopy -i "$esp" "$mnt/boot/grub/BOOTX64.EFI" ::EFI/BOOT/BOOTX64.EFI; '
    'rm "$mnt/boot/grub/BOOTX64.EFI"')


class Cancelled(InstallFailed):
    dbus_name = "Cancelled"


@dataclass
class _Run:
    steps: list[Step]
    report: Callable[[int, int], None]
    cancel: threading.Event
    mnt: str
    total: int = 0
    done: int = 0
    log: list[str] = field(default_factory=list)


def run(source: Source, device: str, ident: Identity, report: Callable[[int, int], None],
        cancel: threading.Event, step_hook: Callable[[Step], None] | None = None) -> None:
    """Install ``source`` onto ``device`` (checked by the caller as a target).

    ``step_hook`` is called before each step (tests cancel halfway with it).

    :raises InstallFailed: a step failed (``Cancelled``: a cancel); the disk was wiped.
    """
    mnt = tempfile.mkdtemp(prefix="xsession-install-")
    steps = plan(source, device, ident, mnt)
    r = _Run(steps, report, cancel, mnt, total=sum(s.weight for s in steps))
    wrote = False
    try:
        for step in steps:
            if step_hook is not None:
                step_hook(step)
            if cancel.is_set():
                raise Cancelled(step.name, "cancelled", "")
            wrote = wrote or step.writes_disk
            _do(r, step)
            r.done += step.weight
            report(r.done, r.total)
    except InstallFailed as e:
        _unmount(mnt)
        state = _wipe(device) if wrote else "the disk was not written to"
        raise type(e)(e.step, e.why, state) from e
    finally:
        _unmount(mnt)
        shutil.rmtree(mnt, ignore_errors=True)


def _do(r: _Run, step: Step) -> None:
    if step.argv and step.progress:
        _run_with_progress(r, step)
    elif step.argv:
        try:
            done = subprocess.run(step.argv, capture_output=True, timeout=TOOL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise InstallFailed(step.name, str(e), "") from e
        if done.returncode not in step.ok_codes:
            err = (done.stderr or done.stdout).decode(errors="replace").strip()[-400:]
            raise InstallFailed(step.name, f"{step.argv[0]} exited with status {done.returncode}: {err}", "")
    base = r.done
    for src, rel in step.files:
        _copy(r, step, src, Path(r.mnt) / rel)
    r.done = base  # the step's weight is added once it is complete
    for rel, text in step.write:
        dest = Path(r.mnt) / rel
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
        except OSError as e:
            raise InstallFailed(step.name, f"cannot write /{rel}: {e}", "") from e


_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _run_with_progress(r: _Run, step: Step) -> None:
    """A long copy by a tool (qemu-img): its percent becomes bytes done; a cancel kills it."""
    try:
        proc = subprocess.Popen(step.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        raise InstallFailed(step.name, str(e), "") from e
    assert proc.stdout is not None and proc.stderr is not None
    base = r.done
    try:
        while chunk := proc.stdout.read1(256):  # type: ignore[attr-defined]
            if r.cancel.is_set():
                raise Cancelled(step.name, "cancelled", "")
            found = _PERCENT.findall(chunk)
            if found:
                r.report(base + int(step.weight * float(found[-1]) / 100), r.total)
        status = proc.wait(TOOL_TIMEOUT_S)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        err = proc.stderr.read().decode(errors="replace").strip()[-400:]
        proc.stdout.close()
        proc.stderr.close()
    if status not in step.ok_codes:
        raise InstallFailed(step.name, f"{step.argv[0]} exited with status {status}: {err}", "")


def _copy(r: _Run, step: Step, src: Path, dest: Path) -> None:
    """Copy in chunks: progress as it goes, a cancel seen within a chunk."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            while chunk := fin.read(COPY_CHUNK):
                if r.cancel.is_set():
                    raise Cancelled(step.name, "cancelled", "")
                fout.write(chunk)
                r.done += len(chunk)
                r.report(r.done, r.total)
            os.fsync(fout.fileno())
    except OSError as e:
        raise InstallFailed(step.name, f"cannot copy {src.name}: {e}", "") from e


def _unmount(mnt: str) -> None:
    if os.path.ismount(mnt):
        subprocess.run(["umount", mnt], capture_output=True, timeout=60)


def _wipe(device: str) -> str:
    """Wipe the partition table (both GPT copies, the protective MBR) and signatures."""
    ok = True
    for argv in (["wipefs", "--all", "--force", "--quiet", device], ["sgdisk", "--zap-all", device]):
        ok = subprocess.run(argv, capture_output=True, timeout=60).returncode == 0 and ok
    subprocess.run(["partx", "--delete", device], capture_output=True, timeout=60)  # none left: fine
    subprocess.run(["udevadm", "settle", "--timeout=30"], capture_output=True, timeout=60)
    return SAFE_STATE if ok else "the disk could not be wiped: it may hold a partial system"


def check_host(memory_bytes: int, cpuinfo: str, source: Source, disk_size: int) -> None:
    """:raises HostUnfit: the check before writing failed; its numbers are in the message."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    problems = host_problems(memory_bytes, flags, source.memory_mib, disk_size, needed_bytes(source.size()))
    if problems:
        raise HostUnfit(problems)
