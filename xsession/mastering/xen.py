"""Mastering Xen flavours: boot a PV or PVH guest, save it with ``xl save``, compress.

Runs in a dom0 (the mastering host). Each flavour is cold-booted through the
same :class:`~xsession.hypervisor.xen.XenBackend` and xl configuration a
restore uses, so the saved image matches what the manager will rebuild; it is
given ``settle_s`` after its ready line (a desktop goes on starting things),
saved (``xl save`` ends the domain), compressed with ``zstd -T0 -1`` with frame
checksums, and described by a :class:`~xsession.manifest.Statefile` (size and
sha256 of the compressed file, size of the raw image). The raw image lives
only in ``workdir`` until it is compressed.

Medium layout (relative to the manifest's folder)::

    pool/KERNEL, pool/INITRD          shared by all flavours that boot them
    flavours/NAME/state.xl.zst        the compressed xl save image
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import HypervisorError
from ..hypervisor.xen import XenBackend
from ..netplan import NetworkMode, plan_network
from ..network import NIC_ON_NETWORK, InternalNetwork
from ..manifest import (ColdBoot, Flavour, MachineConfig, Manifest, OfficeLayout, Statefile, manifest_to_dict,
                        parse_manifest)

__all__ = ["XenFlavourSpec", "master_flavour", "master_medium", "compress", "POOL", "STATE_NAME"]

POOL = "pool"
STATE_NAME = "state.xl.zst"
#: PVH under an emulated CPU (QEMU TCG): RDTSCP and AVX make the guest hang or fault
TCG_PVH_CPUID = "host,rdtscp=0,avx=0"


@dataclass(frozen=True)
class XenFlavourSpec:
    """What to master: a flavour's identity, its domain and how it boots."""

    name: str
    title: str
    priority: int
    kernel: Path
    initrd: Path
    cmdline: str
    ready_line: str
    machine_type: str = "pv"
    memory_mib: int = 256
    vcpus: int = 1
    cpuid: str = "host"
    boot_timeout_s: float = 120.0
    settle_s: float = 3.0
    #: a screen: a PV framebuffer and keyboard that Xen's device model serves over VNC
    display: bool = True
    #: the guest channel (install requests): a PV channel the device model serves
    channel: bool = True
    #: ``internal``: a vif on dom0's internal network (the backend's network, when it has one)
    nic: str = "none"


def _into_pool(src: Path, root: Path) -> str:
    """Copy a boot file into the shared pool (once) and return its medium path."""
    rel = f"{POOL}/{src.name}"
    dest = root / rel
    if not dest.exists() or dest.stat().st_size != src.stat().st_size:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    return rel


def compress(raw: Path, dest: Path, timeout: float = 600.0) -> tuple[int, str]:
    """``zstd -T0 -1 --check`` ``raw`` into ``dest``; returns the size and sha256 of ``dest``.

    :raises HypervisorError: zstd failed (its words kept) or timed out.
    """
    argv = ["zstd", "-T0", "-1", "--check", "-q", "-f", str(raw), "-o", str(dest)]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise HypervisorError(" ".join(argv), f"timed out after {timeout:g} s") from e
    if p.returncode != 0:
        raise HypervisorError(" ".join(argv), f"exit status {p.returncode}", p.stderr)
    h = hashlib.sha256()
    with open(dest, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return dest.stat().st_size, h.hexdigest()


def master_flavour(backend: XenBackend, spec: XenFlavourSpec, root: Path, workdir: Path) -> Flavour:
    """Boot, settle, save and compress one flavour onto the medium at ``root``.

    :raises HypervisorError: the guest did not boot or become ready, or xl save / zstd failed.
    :raises MediumUnavailable: the kernel or initrd is missing.
    """
    machine = MachineConfig(machine_type=spec.machine_type, memory_mib=spec.memory_mib, vcpus=spec.vcpus,
                            cpu=spec.cpuid, vga="std" if spec.display else "none", disk_bus="none",
                            guest_channel=spec.channel, nic=spec.nic)
    cold = ColdBoot(kernel=_into_pool(spec.kernel, root), initrd=_into_pool(spec.initrd, root),
                    cmdline=spec.cmdline, ready_line=spec.ready_line, timeout_s=spec.boot_timeout_s)
    flavour = Flavour(name=spec.name, title=spec.title, priority=spec.priority, backend="xen", machine=machine,
                      disk=None, statefile=None, cold_boot=cold)
    manifest = Manifest(path=str(root / "manifest.yaml"), default=spec.name, flavours=(flavour,))
    rundir = workdir / spec.name
    guest = backend.cold_boot(flavour, manifest, rundir)
    raw = workdir / f"{spec.name}.xl"
    try:
        time.sleep(spec.settle_s)
        raw_size = backend.save(guest, raw)
    except BaseException:
        guest.stop()
        raw.unlink(missing_ok=True)
        raise
    rel = f"flavours/{spec.name}/{STATE_NAME}"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    try:
        size, sha = compress(raw, root / rel)
    finally:
        raw.unlink(missing_ok=True)
    statefile = Statefile(path=rel, size=size, sha256=sha, compression="zstd", raw_size=raw_size,
                          saved_with=machine)
    return dataclasses.replace(flavour, statefile=statefile)


def master_medium(backend: XenBackend, specs: Sequence[XenFlavourSpec], root: Path, workdir: Path,
                  default: str | None = None, office: OfficeLayout | None = None) -> Manifest:
    """Master every flavour (one at a time: each save needs the memory of a whole guest)
    and write ``root/manifest.yaml``; returns the manifest as the manager will read it.

    :raises HypervisorError: a flavour could not be booted or saved.
    :raises ManifestError: the result does not validate (a bug, caught before shipping).
    """
    root.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    # flavours on the internal network are saved on it, with the addresses they keep at every restore
    on_net = [spec.name for spec in specs if spec.nic == NIC_ON_NETWORK]
    network = None
    if on_net and backend.network is None:
        network = InternalNetwork(plan_network(on_net, NetworkMode.INTERNAL), workdir / "network")
        network.up()
        backend.network = network
    try:
        flavours = tuple(master_flavour(backend, spec, root, workdir) for spec in specs)
    finally:
        if network is not None:
            backend.network = None
            network.close(teardown=True)
    path = root / "manifest.yaml"
    manifest = Manifest(path=str(path), default=default or min(flavours, key=lambda f: f.priority).name,
                        flavours=flavours, office=office,
                        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    text = yaml.safe_dump(manifest_to_dict(manifest), sort_keys=False)
    parse_manifest(text, str(path))  # what we write must be what the manager accepts
    path.write_text(text, encoding="utf-8")
    return parse_manifest(text, str(path))
