"""Where a flavour comes from, and what of it goes onto the medium.

Three sources (``source`` in the manifest):

* ``initrd``: a tiny demo guest (a shared kernel, an initrd of its own, a small
  empty disk); ready when its console prints its ready line.
* ``disk``: an installed system, a bootable disk image (qcow2 or raw) with its
  kernel and initrd for a direct boot.
* ``iso``: a live ISO. It goes onto the medium and stays attached, read-only, as
  the VM's CD drive at restore too: a live system keeps reading its squashfs.
  Booted directly with its kernel and initrd when they are given (much faster
  under emulation), else through the ISO's own boot loader.

``disk`` and ``iso`` flavours come from a build folder holding ``flavour.json``
(``demo/build-flavour.sh`` makes them). Flavours we built carry the guest agent:
they get the guest channel, the VM generation ID device and a network, and are
ready when the agent says so; a build that does not say ``agent`` is ready when
its screen has settled.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ManifestError
from ..manifest import ColdBoot, Disk, Flavour, MachineConfig

__all__ = ["DEFAULT_MACHINE_TYPE", "SHARED_DIR", "BuiltFlavour", "read_build", "initrd_flavour", "built_flavour",
           "place", "backing_file", "share_backing", "disk_layers"]

DEFAULT_MACHINE_TYPE = "pc-i440fx-7.2"  # pinned: the `pc` alias moves with every QEMU release
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True)
class BuiltFlavour:
    """A build folder's ``flavour.json``, checked."""

    folder: Path
    name: str
    title: str
    description: str
    source: str               # disk | iso
    memory_mib: int
    kernel: str | None
    initrd: str | None
    cmdline: str
    image: str                # the disk image or the ISO, in the folder
    agent: bool               # the guest agent runs in it: channel readiness, freshening


def read_build(folder: Path) -> BuiltFlavour:
    """:raises ManifestError: a missing or malformed ``flavour.json``."""
    path = folder / "flavour.json"
    try:
        data: Any = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(str(path), f"cannot be read: {e}") from e

    def field(key: str, kind: type, default: Any = ...) -> Any:
        value = data.get(key, default) if isinstance(data, dict) else default
        if value is ... or not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ManifestError(str(path), f"needs {key!r} as {kind.__name__}")
        return value

    source = field("source", str)
    if source not in ("disk", "iso"):
        raise ManifestError(str(path), f"source must be disk or iso, not {source!r}")
    name = field("name", str)
    if not _NAME.fullmatch(name):
        raise ManifestError(str(path), f"{name!r} is not a flavour name")
    image = field("disk" if source == "disk" else "iso", str)
    kernel = field("kernel", str, None) if data.get("kernel") is not None else None
    initrd = field("initrd", str, None) if data.get("initrd") is not None else None
    for rel in (image, kernel, initrd):
        if rel is not None and not (folder / rel).is_file():
            raise ManifestError(str(path), f"names {rel!r}, which is not in {folder}")
    return BuiltFlavour(folder=folder, name=name, title=field("title", str, name),
                        description=field("description", str, ""), source=source,
                        memory_mib=field("memory_mib", int), kernel=kernel, initrd=initrd,
                        cmdline=field("cmdline", str, ""), image=image,
                        agent=bool(data.get("guest_port")) and bool(data.get("agent_port")))


def initrd_flavour(name: str, title: str, priority: int, memory_mib: int, vcpus: int, cmdline: str,
                   accel: str, cpu: str) -> Flavour:
    """A demo guest: shared kernel, its own initrd, a small disk, and the guest channel
    (it sends install requests; it has no agent, so it is ready on its console)."""
    base = f"flavours/{name}"
    return Flavour(
        name=name, title=title, priority=priority, backend="qemu",
        machine=MachineConfig(machine_type=DEFAULT_MACHINE_TYPE, memory_mib=memory_mib, vcpus=vcpus,
                              accel=accel, cpu=cpu, vga="std", disk_bus="virtio", guest_channel=True),
        disk=Disk(base=f"{base}/disk-base.qcow2", saved_overlay=f"{base}/disk-saved.qcow2",
                  session_template=f"{base}/disk-session.qcow2"),
        statefile=None,
        cold_boot=ColdBoot(kernel="pool/vmlinuz", initrd=f"{base}/initrd.cpio", cmdline=cmdline,
                           ready_line=f"XS-READY flavour={name}", timeout_s=120.0),
    )


def built_flavour(build: BuiltFlavour, priority: int, memory_mib: int | None, vcpus: int, accel: str,
                  cpu: str) -> Flavour:
    """A flavour from a build folder: a disk image or a live ISO."""
    base = f"flavours/{build.name}"
    iso = build.source == "iso"
    machine = MachineConfig(machine_type=DEFAULT_MACHINE_TYPE, memory_mib=memory_mib or build.memory_mib,
                            vcpus=vcpus, accel=accel, cpu=cpu, vga="std",
                            disk_bus="none" if iso else "virtio", guest_channel=build.agent,
                            vmgenid=True, nic="user", cdrom=iso)
    return Flavour(
        name=build.name, title=build.title, priority=priority, backend="qemu", machine=machine,
        disk=None if iso else Disk(base=f"{base}/disk-base.qcow2", saved_overlay=f"{base}/disk-saved.qcow2",
                                   session_template=f"{base}/disk-session.qcow2"),
        statefile=None,
        cold_boot=ColdBoot(kernel=f"{base}/vmlinuz" if build.kernel else None,
                           initrd=f"{base}/initrd.img" if build.initrd else None, cmdline=build.cmdline,
                           ready_line=f"xenubuntu1 ready {build.name}" if build.agent else "",
                           timeout_s=600.0),  # a desktop under emulation takes about a minute
        description=build.description, source=build.source,
        readiness="channel" if build.agent else "screen",
        iso=f"{base}/{build.name}.iso" if iso else None,
        still=f"{base}/still.png",
    )


#: files at least this big are hard-linked onto the medium where the file system allows
LINK_MIN_BYTES = 64 << 20


def place(src: Path, dest: Path) -> None:
    """Put a read-only file onto the medium: a big one (a disk image, an ISO) as a hard
    link where the file system allows (the build cache and the medium often share one),
    a small one (a kernel, an initrd) as a copy of its own, else a copy."""
    dest.unlink(missing_ok=True)
    if src.stat().st_size >= LINK_MIN_BYTES:
        try:
            os.link(src, dest)
            return
        except OSError:
            pass
    shutil.copyfile(src, dest)


#: the medium's folder (under ``xenubuntu/``) of the disk images that several flavours'
#: own disk layers stand on: each is on the medium once, whatever uses it
SHARED_DIR = "shared"


def backing_file(image: Path) -> Path | None:
    """The file a qcow2 image stands on (None for a whole image), as qemu-img finds it.

    :raises ManifestError: qemu-img cannot read the image.
    """
    try:
        done = subprocess.run(["qemu-img", "info", "--output=json", str(image)], capture_output=True, text=True,
                              timeout=60, check=True)
        info = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        raise ManifestError(str(image), f"qemu-img cannot read it: {e}") from e
    name = info.get("full-backing-filename") or info.get("backing-filename")
    return Path(name) if name else None


def share_backing(backing: Path, shared: Path) -> Path:
    """Put the image a flavour's disk layer stands on into the medium's shared folder, once
    (a second flavour over the same image finds it there); its path on the medium.

    :raises ManifestError: the shared image stands on another one (one level is all a
        layer needs), or another image of that name is there already.
    """
    if backing_file(backing) is not None:
        raise ManifestError(str(backing), "a shared disk image must be whole (it stands on another)")
    shared.mkdir(parents=True, exist_ok=True)
    dest = shared / backing.name
    if dest.exists():
        if dest.samefile(backing) or filecmp.cmp(dest, backing, shallow=False):
            return dest
        raise ManifestError(str(dest), f"another image of that name than {backing} is on the medium already")
    place(backing, dest)
    return dest


def disk_layers(fdir: Path, base_size_mib: int | None = None, base_image: Path | None = None) -> None:
    """The disk base (a new empty one, or the build's image), the overlay that travels
    with the statefile and an empty template of it copied for each session.

    A build's image that is a layer over a common system brings that system to the
    medium's shared folder (``xenubuntu/shared/``, beside ``flavours/``), once for all
    the flavours over it, and names it relative to its own place there."""
    for f in ("disk-base.qcow2", "disk-saved.qcow2", "disk-session.qcow2"):
        (fdir / f).unlink(missing_ok=True)
    if base_image is not None:
        with open(base_image, "rb") as f:
            qcow2 = f.read(4) == b"QFI\xfb"
        backing = backing_file(base_image) if qcow2 else None
        if backing is not None:
            shared = share_backing(backing, fdir.parent.parent / SHARED_DIR)
            shutil.copyfile(base_image, fdir / "disk-base.qcow2")  # its own: its header is rewritten
            subprocess.run(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", os.path.relpath(shared, fdir),
                            "disk-base.qcow2"], cwd=fdir, check=True)
        elif qcow2:
            place(base_image, fdir / "disk-base.qcow2")
        else:
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(base_image), "disk-base.qcow2"],
                           cwd=fdir, check=True)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "disk-base.qcow2", f"{base_size_mib}M"],
                       cwd=fdir, check=True)
    # relative backing files: the medium can be mounted anywhere
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "disk-base.qcow2",
                    "disk-saved.qcow2"], cwd=fdir, check=True)
    # each session's overlay starts as a copy of this (no qemu-img on the restore's critical path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "disk-saved.qcow2",
                    "disk-session.qcow2"], cwd=fdir, check=True)
