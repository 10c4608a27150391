"""Mastering a QEMU medium: each flavour is booted once, left at its desktop and saved.

The layout it writes (as README.md shows it)::

    MEDIUM/xenubuntu/manifest.yaml
    MEDIUM/xenubuntu/pool/vmlinuz                  shared kernel
    MEDIUM/xenubuntu/flavours/NAME/initrd.cpio     cold-boot initrd
    MEDIUM/xenubuntu/flavours/NAME/disk-base.qcow2 read-only disk base
    MEDIUM/xenubuntu/flavours/NAME/disk-saved.qcow2  the overlay as it was at save time
    MEDIUM/xenubuntu/flavours/NAME/disk-session.qcow2  an empty overlay of it, copied per session
    MEDIUM/xenubuntu/flavours/NAME/state.zst       the saved running state
    MEDIUM/boot/grub/grub.cfg                      one entry per default flavour
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..errors import ManifestError
from ..manifest import (ColdBoot, Disk, Flavour, MachineConfig, Manifest, Statefile, manifest_to_dict,
                        parse_manifest)

if TYPE_CHECKING:
    from ..hypervisor.qemu import QemuBackend

__all__ = ["FlavourSpec", "MediumSpec", "load_spec", "master_medium", "DEFAULT_MACHINE_TYPE"]

DEFAULT_MACHINE_TYPE = "pc-i440fx-7.2"  # pinned: the `pc` alias moves with every QEMU release
Report = Callable[[str], None]


@dataclass(frozen=True)
class FlavourSpec:
    name: str
    title: str
    priority: int
    memory_mib: int
    initrd: str
    vcpus: int = 1


@dataclass(frozen=True)
class MediumSpec:
    default: str
    flavours: tuple[FlavourSpec, ...]
    kernel: str
    cmdline: str
    disk_mib: int = 16


def load_spec(path: Path, memory_override: dict[str, int] | None = None) -> MediumSpec:
    """Read a mastering spec (see ``demo/flavours.yaml``).

    :raises ManifestError: naming the file and field.
    """
    try:
        data = yaml.safe_load(path.read_text())
        flavours = tuple(
            FlavourSpec(name=f["name"], title=f.get("title", f["name"]), priority=int(f.get("priority", 100)),
                        memory_mib=int((memory_override or {}).get(f["name"], f["memory_mib"])),
                        initrd=f["initrd"], vcpus=int(f.get("vcpus", 1)))
            for f in data["flavours"])
        return MediumSpec(default=data.get("default", flavours[0].name), flavours=flavours, kernel=data["kernel"],
                          cmdline=data.get("cmdline", "console=ttyS0 panic=-1 quiet"),
                          disk_mib=int(data.get("disk_mib", 16)))
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, IndexError) as e:
        raise ManifestError(str(path), f"is not a valid mastering spec: {e!r}") from e


def _flavour_entry(spec: FlavourSpec, medium: MediumSpec, accel: str) -> Flavour:
    base = f"flavours/{spec.name}"
    return Flavour(
        name=spec.name, title=spec.title, priority=spec.priority, backend="qemu",
        machine=MachineConfig(machine_type=DEFAULT_MACHINE_TYPE, memory_mib=spec.memory_mib, vcpus=spec.vcpus,
                              accel=accel, cpu="qemu64", vga="std", disk_bus="virtio"),
        disk=Disk(base=f"{base}/disk-base.qcow2", saved_overlay=f"{base}/disk-saved.qcow2",
                  session_template=f"{base}/disk-session.qcow2"),
        statefile=None,
        cold_boot=ColdBoot(kernel="pool/vmlinuz", initrd=f"{base}/initrd.cpio", cmdline=medium.cmdline,
                           ready_line=f"XS-READY flavour={spec.name}", timeout_s=120.0),
    )


def _master_one(backend: QemuBackend, spec: FlavourSpec, medium: MediumSpec, guests: Path, root: Path,
                accel: str, settle_s: float, report: Report) -> Flavour:
    flavour = _flavour_entry(spec, medium, accel)
    fdir = root / "flavours" / spec.name
    fdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(guests / spec.initrd, fdir / "initrd.cpio")
    for f in ("disk-base.qcow2", "disk-saved.qcow2", "disk-session.qcow2", "state.zst"):
        (fdir / f).unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "disk-base.qcow2", f"{medium.disk_mib}M"],
                   cwd=fdir, check=True)
    # relative backing file: the medium can be mounted anywhere
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "disk-base.qcow2",
                    "disk-saved.qcow2"], cwd=fdir, check=True)
    # each session's overlay starts as a copy of this (no qemu-img on the restore's critical path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "disk-saved.qcow2",
                    "disk-session.qcow2"], cwd=fdir, check=True)
    manifest = Manifest(path=str(root / "manifest.yaml"), default=medium.default, flavours=(flavour,))
    rundir = Path(tempfile.mkdtemp(prefix=f"xsm-{spec.name}-"))  # short: unix socket paths <= 107 bytes
    try:
        t0 = time.monotonic()
        report(f"{spec.name}: booting ({spec.memory_mib} MiB, {accel})")
        guest = backend.boot_for_save(flavour, manifest, rundir, fdir / "disk-saved.qcow2")
        try:
            t_boot = time.monotonic() - t0
            report(f"{spec.name}: ready after {t_boot:.1f} s; letting it settle {settle_s:.0f} s")
            time.sleep(settle_s)  # the desktop is idle, as a person would find it
            t1 = time.monotonic()
            saved = backend.save(guest, fdir / "state.zst")
        except BaseException:  # Ctrl-C too: the guest runs in its own session and would stay
            guest.stop()
            raise
        report(f"{spec.name}: saved {saved.raw_size / 1e6:.1f} MB -> {saved.size / 1e6:.1f} MB zstd "
               f"in {time.monotonic() - t1:.1f} s")
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    sf = Statefile(path=f"flavours/{spec.name}/state.zst", size=saved.size, sha256=saved.sha256,
                   compression="zstd", raw_size=saved.raw_size, saved_with=flavour.machine)
    return replace(flavour, statefile=sf)


def resolve_accel(accel: str, spec: MediumSpec, guests: Path) -> str:
    """``auto`` becomes ``kvm`` when a probe boot of the first flavour works, else ``tcg``."""
    if accel != "auto":
        return accel
    first = _flavour_entry(spec.flavours[0], spec, "kvm")
    work = Path(tempfile.mkdtemp(prefix="xsm-probe-"))
    try:
        (work / "pool").mkdir()
        shutil.copyfile(guests / spec.kernel, work / "pool" / "vmlinuz")
        (work / "flavours" / first.name).mkdir(parents=True)
        shutil.copyfile(guests / spec.flavours[0].initrd, work / "flavours" / first.name / "initrd.cpio")
        manifest = Manifest(path=str(work / "manifest.yaml"), default=first.name, flavours=(first,))
        from ..hypervisor.qemu import QemuBackend  # QMP (qemu.qmp) only where QEMU runs
        return "kvm" if QemuBackend().kvm_usable(first, manifest) else "tcg"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def master_medium(spec: MediumSpec, guests: Path, out: Path, *, accel: str = "tcg", jobs: int = 2,
                  settle_s: float = 1.0, report: Report = print) -> Manifest:
    """Build a whole medium under ``out``; returns the validated manifest it wrote.

    :raises HypervisorError: a flavour did not boot or save.
    """
    root = out / "xenubuntu"
    (root / "pool").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(guests / spec.kernel, root / "pool" / "vmlinuz")
    from ..hypervisor.qemu import QemuBackend
    backend = QemuBackend()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(_master_one, backend, f, spec, guests, root, accel, settle_s, report)
                   for f in spec.flavours]
        flavours = tuple(f.result() for f in futures)
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest = Manifest(path=str(root / "manifest.yaml"), default=spec.default, flavours=flavours, created=created)
    text = "# XenUbuntu medium manifest, written by xsession-master\n" + yaml.safe_dump(
        manifest_to_dict(manifest), sort_keys=False)
    manifest = parse_manifest(text, str(root / "manifest.yaml"))  # what we write must load
    tmp = root / "manifest.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(root / "manifest.yaml")
    write_boot_menu(manifest, out)
    report(f"medium written: {root / 'manifest.yaml'} ({len(flavours)} flavours, default {spec.default})")
    return manifest


def write_boot_menu(manifest: Manifest, out: Path) -> None:
    from .grub import render_grub_cfg

    grub = out / "boot" / "grub"
    grub.mkdir(parents=True, exist_ok=True)
    (grub / "grub.cfg").write_text(render_grub_cfg(manifest))
