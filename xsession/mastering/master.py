"""Mastering a QEMU medium: each flavour is booted once, left at its desktop and saved.

The layout it writes (as README.md shows it)::

    MEDIUM/xenubuntu/manifest.yaml
    MEDIUM/xenubuntu/pool/vmlinuz                  shared kernel
    MEDIUM/xenubuntu/pool/dists/, main/            the signed package pool (see .pool), with --pool-debs
    MEDIUM/xenubuntu/flavours/NAME/initrd.cpio     cold-boot initrd
    MEDIUM/xenubuntu/flavours/NAME/disk-base.qcow2 read-only disk base
    MEDIUM/xenubuntu/flavours/NAME/disk-saved.qcow2  the overlay as it was at save time
    MEDIUM/xenubuntu/flavours/NAME/disk-session.qcow2  an empty overlay of it, copied per session
    MEDIUM/xenubuntu/flavours/NAME/state.zst       the saved running state
    MEDIUM/xenubuntu/flavours/NAME/still.png       the screen as saved (built flavours)
    MEDIUM/xenubuntu/flavours/NAME/vmlinuz, initrd.img   a built flavour's own kernel
    MEDIUM/xenubuntu/flavours/NAME/NAME.iso        a live ISO flavour's CD
    MEDIUM/boot/grub/grub.cfg                      one entry per default flavour

Where each flavour's files come from is :mod:`.sources`' business.
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..errors import ManifestError, PoolError, XSessionError
from ..manifest import NICS, Flavour, Manifest, OfficeLayout, Statefile, manifest_to_dict, parse_manifest, parse_office
from ..cpumodel import FALLBACK_MODEL, choose_model, read_cpuinfo
from ..netplan import NetworkMode, plan_network
from ..network import NIC_ON_NETWORK, InternalNetwork
from . import sources
from .pool import QUERY, Pool, guest_apt_script
from .sources import DEFAULT_MACHINE_TYPE

if TYPE_CHECKING:
    from ..hypervisor.qemu import QemuBackend, QemuGuest

__all__ = ["FlavourSpec", "MediumSpec", "load_spec", "master_medium", "DEFAULT_MACHINE_TYPE"]

Report = Callable[[str], None]
#: the VM generation ID flavours are saved with (restores get a new one each time)
MASTERING_VMGENID = "6b8c9e3e-7f1a-4d2b-9c55-0e6f5a1d2c3b"


@dataclass(frozen=True)
class FlavourSpec:
    """One flavour of a mastering spec: a demo guest (``initrd``) or a build folder (``build``)."""

    name: str
    title: str
    priority: int
    memory_mib: int | None
    initrd: str = ""
    vcpus: int = 1
    #: a folder holding ``flavour.json`` (a disk image or a live ISO), relative to the guests folder
    build: str = ""
    #: the NIC (``none``, ``user``, ``internal``); empty: the source's own choice
    nic: str = ""


@dataclass(frozen=True)
class MediumSpec:
    default: str
    flavours: tuple[FlavourSpec, ...]
    kernel: str
    cmdline: str
    disk_mib: int = 16
    #: the medium's office (server and desktops), carried into its manifest as it is
    office: OfficeLayout | None = None


def load_spec(path: Path, memory_override: dict[str, int] | None = None) -> MediumSpec:
    """Read a mastering spec (see ``demo/flavours.yaml`` and ``demo/desktops.yaml``).

    :raises ManifestError: naming the file and field.
    """
    try:
        data = yaml.safe_load(path.read_text())
        flavours = []
        for f in data["flavours"]:
            memory = (memory_override or {}).get(f["name"], f.get("memory_mib"))
            if not f.get("build") and memory is None:
                raise KeyError("memory_mib")
            if not f.get("build") and not f.get("initrd"):
                raise KeyError("initrd (or build)")
            flavours.append(FlavourSpec(name=f["name"], title=f.get("title", f["name"]),
                                        priority=int(f.get("priority", 100)),
                                        memory_mib=None if memory is None else int(memory),
                                        initrd=f.get("initrd", ""), vcpus=int(f.get("vcpus", 1)),
                                        build=f.get("build", ""), nic=str(f.get("nic", ""))))
            if flavours[-1].nic not in ("", *NICS):
                raise ValueError(f"nic of {f['name']} must be one of {', '.join(NICS)}")
        if any(not f.build for f in flavours) and "kernel" not in data:
            raise KeyError("kernel")
        office = None
        if "office" in data:  # checked now by the manifest's own rules: a mastering must not fail at its end
            office = parse_office(data["office"], tuple(f.name for f in flavours), str(path))
        return MediumSpec(default=data.get("default", flavours[0].name), flavours=tuple(flavours),
                          kernel=data.get("kernel", ""),
                          cmdline=data.get("cmdline", "console=ttyS0 panic=-1 quiet"),
                          disk_mib=int(data.get("disk_mib", 16)), office=office)
    except ManifestError:
        raise
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise ManifestError(str(path), f"is not a valid mastering spec: {e!r}") from e


def _lay_out(spec: FlavourSpec, medium: MediumSpec, guests: Path, fdir: Path, accel: str, cpu: str) -> Flavour:
    """The flavour's manifest entry, its files put in its folder on the medium."""
    for f in ("state.zst", "still.png"):
        (fdir / f).unlink(missing_ok=True)
    if not spec.build:
        shutil.copyfile(guests / spec.initrd, fdir / "initrd.cpio")
        sources.disk_layers(fdir, base_size_mib=medium.disk_mib)
        assert spec.memory_mib is not None  # load_spec requires it of initrd guests
        flavour = sources.initrd_flavour(spec.name, spec.title, spec.priority, spec.memory_mib, spec.vcpus,
                                         medium.cmdline, accel, cpu)
        return _with_nic(flavour, spec.nic)
    build = sources.read_build(guests / spec.build)
    if build.name != spec.name:
        raise ManifestError(str(guests / spec.build / "flavour.json"),
                            f"builds {build.name!r}, but the spec calls it {spec.name!r}")
    if build.kernel is not None and build.initrd is not None:
        sources.place(build.folder / build.kernel, fdir / "vmlinuz")
        sources.place(build.folder / build.initrd, fdir / "initrd.img")
    if build.source == "iso":
        sources.place(build.folder / build.image, fdir / f"{build.name}.iso")
    else:
        sources.disk_layers(fdir, base_image=build.folder / build.image)
    flavour = sources.built_flavour(build, spec.priority, spec.memory_mib, spec.vcpus, accel, cpu)
    return _with_nic(replace(flavour, title=spec.title if spec.title != spec.name else flavour.title), spec.nic)


def _with_nic(flavour: Flavour, nic: str) -> Flavour:
    return replace(flavour, machine=replace(flavour.machine, nic=nic)) if nic else flavour


def _master_one(backend: QemuBackend, spec: FlavourSpec, medium: MediumSpec, guests: Path, root: Path,
                accel: str, settle_s: float, report: Report, level: int = 3,
                before_save: Callable[[QemuGuest, Flavour], None] | None = None,
                splitter: QemuBackend | None = None) -> Flavour:
    fdir = root / "flavours" / spec.name
    fdir.mkdir(parents=True, exist_ok=True)
    # under KVM a conservative named model this host runs, so the statefile restores on any
    # host of its class; under TCG the emulated qemu64
    cpu = choose_model(read_cpuinfo()) if accel == "kvm" else FALLBACK_MODEL
    flavour = _lay_out(spec, medium, guests, fdir, accel, cpu)
    manifest = Manifest(path=str(root / "manifest.yaml"), default=medium.default, flavours=(flavour,))
    rundir = Path(tempfile.mkdtemp(prefix=f"xsm-{spec.name}-"))  # short: unix socket paths <= 107 bytes
    still = fdir / "still.png" if flavour.still else None
    try:
        t0 = time.monotonic()
        report(f"{spec.name}: booting ({flavour.memory_mib} MiB, {accel}, {flavour.source}; "
               f"ready when {_READY_WORDS[flavour.readiness]})")
        disk = fdir / "disk-saved.qcow2" if flavour.disk is not None else None
        guest = backend.boot_for_save(flavour, manifest, rundir, disk)
        try:
            report(f"{spec.name}: ready after {time.monotonic() - t0:.1f} s")
            if flavour.readiness != "console":
                backend.settle(guest, flavour)  # the desktop painted, as a person would find it
                report(f"{spec.name}: screen settled after {time.monotonic() - t0:.1f} s")
            time.sleep(settle_s)
            if before_save is not None:
                before_save(guest, flavour)
            if flavour.readiness == "channel":  # our agent runs with qemu-guest-agent in it
                # caches dropped (a smaller statefile), then what a restore needs first warmed again
                backend.prepare_for_save(guest, flavour)
            t1 = time.monotonic()
            saved = backend.save(guest, fdir / "state.zst", level=level, still=still)
        except BaseException:  # Ctrl-C too: the guest runs in its own session and would stay
            guest.stop()
            raise
        report(f"{spec.name}: saved {saved.raw_size / 1e6:.1f} MB -> {saved.size / 1e6:.1f} MB zstd "
               f"in {time.monotonic() - t1:.1f} s")
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    sf = Statefile(path=f"flavours/{spec.name}/state.zst", size=saved.size, sha256=saved.sha256,
                   compression="zstd", raw_size=saved.raw_size, saved_with=flavour.machine)
    flavour = replace(flavour, statefile=sf)
    if splitter is not None:
        rundir = Path(tempfile.mkdtemp(prefix=f"xsm-{spec.name}-"))
        try:
            t1 = time.monotonic()
            lazy = splitter.save_lazy_image(flavour, manifest, rundir, level)
        except XSessionError as e:  # the statefile stands on its own: restores stream it
            report(f"{spec.name}: not split for lazy restores: {e}")
            return flavour
        finally:
            shutil.rmtree(rundir, ignore_errors=True)
        report(f"{spec.name}: split for lazy restores in {time.monotonic() - t1:.1f} s: RAM image "
               f"{lazy.ram.size / 1e6:.1f} MB zstd (holds {lazy.held_mib} MiB decoded), devices "
               f"{lazy.devices.size / 1e6:.2f} MB")
        flavour = replace(flavour, statefile=replace(sf, lazy=lazy))
    return flavour


_READY_WORDS = {"console": "its console says so", "channel": "its guest agent says so",
                "screen": "its screen has settled"}


def resolve_accel(accel: str, spec: MediumSpec, guests: Path) -> str:
    """``auto`` becomes ``kvm`` when a probe boot of the first flavour works, else ``tcg``."""
    if accel != "auto":
        return accel
    spec0 = spec.flavours[0]
    if spec0.build or spec0.memory_mib is None:
        return "tcg"  # the probe boots a demo guest; a desktop probe would take a minute
    first = sources.initrd_flavour(spec0.name, spec0.title, spec0.priority, spec0.memory_mib, spec0.vcpus,
                                   spec.cmdline, "kvm", "qemu64")
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
                  settle_s: float = 1.0, report: Report = print, level: int = 3,
                  pool_debs: Path | None = None, lazy_qemu: str | None = None) -> Manifest:
    """Build a whole medium under ``out``; returns the validated manifest it wrote.

    ``pool_debs``: the builds' package cache; when given, the flavours' installed
    packages go into the medium's signed package pool and each flavour's apt is
    pointed at it (:mod:`.pool`).

    ``level``: zstd's compression level for the statefiles. 3 masters quickly; 19 makes
    them about a fifth smaller (what a DVD reads) at a much longer mastering, and
    decompresses as fast (see bench/RESULTS.md).

    ``lazy_qemu``: a QEMU that maps RAM images (8.2 or later); each statefile is then
    also split for lazy restores (:meth:`QemuBackend.save_lazy_image`).

    :raises HypervisorError: a flavour did not boot or save.
    """
    root = out / "xenubuntu"
    (root / "pool").mkdir(parents=True, exist_ok=True)
    if spec.kernel:
        shutil.copyfile(guests / spec.kernel, root / "pool" / "vmlinuz")
    from ..hypervisor.qemu import QemuBackend
    # saved with a known generation ID: any restore that gives another one reseeds the guest
    backend = QemuBackend(vmgenid_guid=MASTERING_VMGENID)
    splitter = None if lazy_qemu is None else QemuBackend(binary=lazy_qemu, vmgenid_guid=MASTERING_VMGENID,
                                                          freshen=False)
    # flavours on the internal network are saved on it, with the addresses they keep at every restore
    on_net = [f.name for f in spec.flavours if f.nic == NIC_ON_NETWORK]
    network = InternalNetwork(plan_network(on_net, NetworkMode.INTERNAL),
                              Path(tempfile.mkdtemp(prefix="xsm-net-"))) if on_net else None
    pool = Pool(root / "pool", pool_debs) if pool_debs is not None else None
    try:
        if network is not None:
            network.up()
            backend.network = network
            report(f"internal network up: dom0 {network.address}, {len(on_net)} flavour(s) on it")
        before_save = None
        if pool is not None:
            before_save = _pool_hook(pool, pool.make_key(), plan_network(on_net, NetworkMode.INTERNAL).dom0_address,
                                     report)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as workers:
            futures = [workers.submit(_master_one, backend, f, spec, guests, root, accel, settle_s, report, level,
                                      before_save, splitter)
                       for f in spec.flavours]
            flavours = tuple(f.result() for f in futures)
        if pool is not None:
            sizes = pool.build()
            report(f"package pool: {sizes['packages']} packages, {sizes['bytes'] / 1e6:.1f} MB stored once "
                   f"({sizes['bytes_without_sharing'] / 1e6:.1f} MB if each flavour kept its own), signed")
    finally:
        if pool is not None:
            pool.close()
        if network is not None:
            network.close(teardown=True)
            shutil.rmtree(network.rundir, ignore_errors=True)
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest = Manifest(path=str(root / "manifest.yaml"), default=spec.default, flavours=flavours, created=created,
                        office=spec.office)
    text = "# XenUbuntu medium manifest, written by xsession-master\n" + yaml.safe_dump(
        manifest_to_dict(manifest), sort_keys=False)
    manifest = parse_manifest(text, str(root / "manifest.yaml"))  # what we write must load
    tmp = root / "manifest.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(root / "manifest.yaml")
    write_boot_menu(manifest, out)
    report(f"medium written: {root / 'manifest.yaml'} ({len(flavours)} flavours, default {spec.default})")
    return manifest


def _pool_hook(pool: Pool, key: bytes, address: str, report: Report) -> Callable[[QemuGuest, Flavour], None]:
    """Before a flavour is saved: its apt pointed at the pool, its packages listed (through its agent)."""
    from ..hypervisor.qga import AgentError

    def configure(guest: QemuGuest, flavour: Flavour) -> None:
        if not flavour.machine.guest_channel:
            return  # no agent: nothing to ask and no way to configure it
        try:
            with guest.agent(timeout=30.0) as agent:
                status, _, err = agent.run(["/bin/sh", "-c", guest_apt_script(address, key)], timeout=60.0)
                if status != 0:
                    raise PoolError(flavour.name, f"pointing apt at the pool said {err[-200:]!r}")
                status, out, err = agent.run(QUERY, timeout=120.0)
                if status != 0:
                    raise PoolError(flavour.name, f"dpkg-query said {err[-200:]!r}")
        except AgentError as e:
            raise PoolError(flavour.name, f"its agent did not answer: {e}") from e
        report(f"{flavour.name}: apt points at the pool; {pool.add_flavour(flavour.name, out)} packages installed")
    return configure


def write_boot_menu(manifest: Manifest, out: Path) -> None:
    from .grub import render_grub_cfg

    grub = out / "boot" / "grub"
    grub.mkdir(parents=True, exist_ok=True)
    (grub / "grub.cfg").write_text(render_grub_cfg(manifest))
