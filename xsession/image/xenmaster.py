"""Xen statefiles saved by the Xen the image carries: mastering inside the image's own dom0.

An ``xl save`` image is only good for the Xen (and toolstack) that wrote it,
so the Xen flavours of an image are mastered by that image's dom0: the
``xen-statefiles`` step boots the dom0 live system (the cached system and
product layers) in QEMU, with Xen loaded by QEMU's multiboot loader, and
dom0 runs ``xsession-master --backend xen`` there (:data:`DOM0_SCRIPT`, a
unit of the product layer that runs only with :data:`MASTER_WORD` on the
kernel command line).

Two raw disks carry the work, found in dom0 by their serial numbers only
(``/dev/disk/by-id/virtio-SERIAL``), so the unit never writes to a disk it
was not given:

``xsm-in``
    a tar of the mastering spec and the files it names (kernel, initrds);
``xsm-out``
    where dom0 writes a tar of the mastered medium (``xenubuntu/`` and
    ``boot/grub/grub.cfg``).

dom0 prints ``XENUBUNTU-MASTER status=N`` on the serial console once its
disks are synced; the host then ends the machine, unpacks the tar (regular
files and folders only, inside the output) and checks the manifest as the
manager would. The step is keyed by the hypervisor (Xen, dom0's kernel, the
toolstack's version: :func:`hypervisor_inputs`, not the rest of the system
layer), the source of the code that decides what a Xen statefile holds, the
spec and the guests' files.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path

from ..manifest import MANIFEST_RELPATH, Manifest, load_manifest
from . import iso
from .steps import Output, StepCache, StepContext, StepError, key_of

RECIPE = "xen-statefiles-1"
MASTER_WORD = "xenubuntu-master-in-dom0"
IN_SERIAL = "xsm-in"
OUT_SERIAL = "xsm-out"
OUT_DISK_MIB = 1024
DONE = re.compile(r"XENUBUNTU-MASTER status=(\d+)")
#: the machine: TCG as everywhere here; dom0 gets room for a raw save image in RAM
QEMU_CPU = "max,-smap,-erms"
MACHINE_MIB = 3072
DOM0_MEM = "dom0_mem=1536M,max:1536M"
TIMEOUT_S = 3600.0

#: the code whose behaviour a Xen statefile depends on (relative to the xsession package)
SOURCES = ("mastering/xen.py", "mastering/cli.py", "mastering/master.py", "mastering/grub.py",
           "hypervisor/xen.py", "hypervisor/xl.py", "hypervisor/xenctl.py", "manifest.py", "image/xenmaster.py")

DOM0_SCRIPT = f"""\
#!/bin/sh
# Master the Xen flavours handed in on the disk with serial {IN_SERIAL} and write
# the medium as a tar on the disk with serial {OUT_SERIAL} (an image build's step).
in=/dev/disk/by-id/virtio-{IN_SERIAL}
out=/dev/disk/by-id/virtio-{OUT_SERIAL}
work=/run/xenubuntu-master
# the status line comes after the sync: once it is seen, the host may end the machine
finish() {{ sync; echo "XENUBUNTU-MASTER status=$1"; systemctl --no-block poweroff; exit 0; }}
udevadm settle
if [ ! -b "$in" ] || [ ! -b "$out" ]; then echo "xenubuntu-master: no {IN_SERIAL}/{OUT_SERIAL} disks"; finish 2; fi
mkdir -p $work && mount -t tmpfs -o size=80% tmpfs $work || finish 3
mkdir -p $work/in $work/out $work/tmp
tar -xf "$in" -C $work/in || finish 4
TMPDIR=$work/tmp xsession-master --backend xen --xen-type pv $work/in/spec.yaml --guests $work/in/guests \\
    --out $work/out || finish 5
tar -cf "$out" -C $work/out . || finish 6
finish 0
"""
DOM0_UNIT = f"""\
[Unit]
Description=XenUbuntu image build: master the Xen flavours in this dom0
ConditionKernelCommandLine={MASTER_WORD}
ConditionPathExists=/proc/xen/capabilities
After=xen.service xenstored.service xenconsoled.service multi-user.target
[Service]
Type=oneshot
ExecStart=/usr/libexec/xenubuntu-master-in-dom0
StandardOutput=journal+console
StandardError=journal+console
[Install]
WantedBy=multi-user.target
"""


def dom0_commands() -> list[str]:
    """Shell lines for the product layer's chroot: the unit and its script."""
    import shlex

    return [
        f"printf %s {shlex.quote(DOM0_SCRIPT)} > /usr/libexec/xenubuntu-master-in-dom0",
        "chmod 755 /usr/libexec/xenubuntu-master-in-dom0",
        f"printf %s {shlex.quote(DOM0_UNIT)} > /etc/systemd/system/xenubuntu-master.service",
        "systemctl enable xenubuntu-master.service",
    ]


def spec_files(spec_path: Path, guests: Path) -> list[Path]:
    """The guests' files a (busybox demo) spec names: its kernel and each flavour's initrd."""
    import yaml

    data = yaml.safe_load(spec_path.read_text())
    names = [data["kernel"], *(f["initrd"] for f in data["flavours"])]
    return [guests / n for n in names]


def hypervisor_inputs(system: Output) -> list[object]:
    """What of the system layer a save image depends on: Xen, dom0's kernel and the
    versions of the Xen packages (the toolstack writes the image); the rest of the
    layer (a desktop for the chooser, say) may change without mastering again."""
    versions = (system.path / "packages.txt").read_text().splitlines()
    xen = sorted(line for line in versions if line.startswith(("xen-", "libxen", "xenstore")))
    return [system.path / "xen.gz", system.path / "vmlinuz", *xen]


def _source_files() -> list[object]:
    pkg = Path(__file__).resolve().parent.parent
    return [item for rel in SOURCES for item in (rel, pkg / rel)]


def _in_tar(spec_path: Path, files: list[Path], dest: Path) -> None:
    with tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(spec_path, "spec.yaml")
        for f in files:
            tar.add(f, f"guests/{f.name}")


def member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a member of dom0's tar may not be unpacked, or None (a file or folder inside the output)."""
    if not (member.isfile() or member.isdir()):
        return "not a regular file or folder"
    parts = Path(member.name).parts
    if member.name.startswith("/") or ".." in parts or "\0" in member.name:
        return "a path that leads out of the medium"
    return None


def unpack_medium(tar_path: Path, dest: Path) -> Manifest:
    """Unpack dom0's tar of the medium into ``dest`` and load its manifest.

    Only regular files and folders below ``dest`` are taken; the tar ends
    where the zero blocks begin, the rest of the disk is ignored.

    :raises StepError: the tar cannot be read or holds something else.
    :raises ManifestError: the manifest does not validate.
    """
    try:
        with tarfile.open(tar_path, "r:") as tar:
            members = tar.getmembers()
            for member in members:
                problem = member_problem(member)
                if problem:
                    raise StepError(f"xen-statefiles: dom0's tar holds {member.name!r}: {problem}")
                member.mode &= 0o755
                member.uid = member.gid = 0
            tar.extractall(dest, members=members)
    except (tarfile.TarError, OSError) as e:
        raise StepError(f"xen-statefiles: cannot unpack dom0's medium: {e}") from e
    manifest = load_manifest(dest / MANIFEST_RELPATH)
    for f in manifest.flavours:
        if f.statefile is None:
            raise StepError(f"xen-statefiles: dom0 saved no statefile for {f.name}")
        path = manifest.resolve(f.statefile.path)
        if path.stat().st_size != f.statefile.size:
            raise StepError(f"xen-statefiles: {f.statefile.path} is not of the recorded size")
    if not (dest / iso.GRUB_CFG).is_file():
        raise StepError("xen-statefiles: dom0 wrote no boot menu")
    return manifest


def qemu_argv(xen: Path, kernel: Path, initrd: Path, cd: Path, in_disk: Path, out_disk: Path,
              dom0_args: str) -> list[str]:
    """QEMU booting Xen (multiboot) with dom0's kernel and initrd as modules, the layers on a CD."""
    if "," in dom0_args:
        raise ValueError("dom0's command line goes through QEMU's comma-separated -initrd")
    return ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", QEMU_CPU, "-smp", "2",
            "-m", str(MACHINE_MIB), "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-kernel", str(xen), "-append", f"{DOM0_MEM} {iso.TCG_XEN} console=com1 com1=115200,8n1 noreboot",
            "-initrd", f"{kernel} {dom0_args},{initrd}",
            "-drive", f"file={cd},media=cdrom,if=none,id=cd0,readonly=on", "-device", "ide-cd,drive=cd0,bus=ide.0",
            "-drive", f"file={in_disk},format=raw,if=none,id=in0,readonly=on",
            "-device", f"virtio-blk-pci,drive=in0,serial={IN_SERIAL}",
            "-drive", f"file={out_disk},format=raw,if=none,id=out0",
            "-device", f"virtio-blk-pci,drive=out0,serial={OUT_SERIAL}"]


class EmulatorCrashed(StepError):
    """QEMU itself ended by a signal it was not sent (a crash of the emulator, not of dom0)."""


def _boot(ctx: StepContext, argv: list[str], timeout: float) -> int:
    """Run the machine to its end; the status dom0 printed (the console goes to the step's log).

    :raises EmulatorCrashed: QEMU died of a signal of its own (TCG has crashed here, rarely).
    :raises StepError: dom0 did not say it finished (a hang ends at ``timeout``).
    """
    ctx.report(f"  {ctx.name}: mastering in the image's dom0 (QEMU, TCG)")
    t0 = time.monotonic()
    status = None
    timed_out = threading.Event()
    with open(ctx.log, "a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def end() -> None:  # a machine that hangs in silence ends too
            timed_out.set()
            proc.kill()
        watchdog = threading.Timer(timeout, end)
        watchdog.start()
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                log.write(f"[{time.monotonic() - t0:8.1f}] {line}\n")
                log.flush()
                m = DONE.search(line)
                if m:
                    status = int(m.group(1))
                    break  # dom0 synced its disks first: no need to wait for its shutdown
                if "xsession-master" in line or "XENUBUNTU-MASTER" in line or "medium written" in line:
                    ctx.report(f"  {ctx.name}: {line.strip()[-200:]}")
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    ctx.timings["boot and master"] = round(time.monotonic() - t0, 1)
    if status is None:
        if proc.returncode is not None and proc.returncode < 0 and not timed_out.is_set():
            raise EmulatorCrashed(f"{ctx.name}: QEMU crashed (signal {-proc.returncode}) while dom0 was "
                                  f"mastering\n{_tail(ctx.log)}")
        raise StepError(f"{ctx.name}: dom0 did not finish mastering (QEMU exit {proc.returncode})\n"
                        f"{_tail(ctx.log)}")
    return status


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def master(cache: StepCache, system: Output, squash: Output, product: Output, spec_path: Path,
           guests: Path, *, timeout: float = TIMEOUT_S) -> Output:
    """The ``xen-statefiles`` step: the medium of ``spec_path``'s flavours, saved by the image's Xen.

    ``product`` must carry :func:`dom0_commands` (every product layer does).
    The output's ``medium/`` folder is a complete medium (manifest, pool,
    statefiles, boot menu).

    :raises StepError: dom0 failed (its console is in the step's log) or its result is not a medium.
    """
    files = spec_files(spec_path, guests)
    key = key_of([RECIPE, *hypervisor_inputs(system), *_source_files(), spec_path, *files, QEMU_CPU, DOM0_MEM,
                  iso.TCG_XEN])

    def build(ctx: StepContext) -> dict:
        work = ctx.out / "work"
        work.mkdir()
        xen = work / "xen"
        with gzip.open(system.path / "xen.gz", "rb") as src, open(xen, "wb") as dst:
            shutil.copyfileobj(src, dst)  # QEMU's multiboot loader takes the ELF, not the .gz
        cd = work / "layers.iso"
        ctx.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", iso.VOLUME_ID, "-o", str(cd), "-graft-points",
                 f"{iso.SYSTEM_SQUASHFS}={squash.path / 'filesystem.squashfs'}",
                 f"{iso.PRODUCT_SQUASHFS}={product.path / 'xenubuntu.squashfs'}"], what="layers ISO")
        in_disk = work / "in.tar"
        _in_tar(spec_path, files, in_disk)
        out_disk = work / "out.img"
        args = f"boot=casper xenubuntu.restore=off {MASTER_WORD} console=hvc0 init_on_alloc=0"
        argv = qemu_argv(xen, system.path / "vmlinuz", product.path / "initrd", cd, in_disk, out_disk, args)
        for attempt in (1, 2):  # an emulator that crashed gets one more boot, on a fresh disk
            with open(out_disk, "wb") as f:
                f.truncate(OUT_DISK_MIB << 20)
            try:
                status = _boot(ctx, argv, timeout)
                break
            except EmulatorCrashed as e:
                if attempt == 2:
                    raise
                ctx.report(f"  {ctx.name}: {str(e).splitlines()[0]}; booting it again")
        if status != 0:
            raise StepError(f"{ctx.name}: mastering in dom0 failed (status {status})\n{_tail(ctx.log)}")
        manifest = unpack_medium(out_disk, ctx.out / "medium")
        shutil.rmtree(work)
        return {"flavours": [f.name for f in manifest.flavours], "default": manifest.default}

    return cache.step("xen-statefiles", key, build)


__all__ = ["master", "dom0_commands", "unpack_medium", "qemu_argv", "EmulatorCrashed", "MASTER_WORD", "DOM0_SCRIPT",
           "DOM0_UNIT"]
