"""Which disks a flavour may be installed onto, from udev.

Never the live medium, never a disk that is mounted or holds a mounted
partition, that is swap, that something stacks on (LVM, device-mapper, RAID:
its ``holders``), that is read-only, or that is smaller than the flavour needs.
Each refusal is a named error with its numbers (:mod:`.errors`).

:func:`refusal` is the pure decision over :class:`Disk` facts; :func:`disks`
gathers those facts from udev and the mount and swap tables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyudev

from ..hardware import MediumInfo, parse_mountinfo
from .errors import NoSuchTarget, TargetInUse, TargetIsLiveMedium, TargetRefused, TargetTooSmall

__all__ = ["Disk", "refusal", "disks", "candidates", "check_target", "NOT_DISKS"]

#: block devices that are never install targets and are not worth a refusal
NOT_DISKS = ("ram", "zram", "sr", "fd", "nbd")


@dataclass(frozen=True)
class Disk:
    """What decides whether a whole disk may be installed onto."""

    device: str                      # /dev/sdb
    sys_path: str
    size: int                        # bytes
    model: str = ""
    read_only: bool = False
    mounted: tuple[str, ...] = ()    # its own or its partitions' device nodes that are mounted
    swap: tuple[str, ...] = ()       # ... that are in use as swap
    holders: tuple[str, ...] = ()    # ... that something stacks on (dm-0, md0)

    def as_tuple(self) -> tuple[str, int, str]:
        return (self.device, self.size, self.model)


def refusal(disk: Disk, medium: MediumInfo | None, needed: int) -> TargetRefused | None:
    """Why ``disk`` may not be installed onto, or None when it may (pure)."""
    if medium is not None and medium.sys_path is not None and medium.sys_path == disk.sys_path:
        return TargetIsLiveMedium(disk.device, "it holds the live medium this system runs from"
                                  + (f" ({medium.path})" if medium.path else ""))
    if disk.mounted:
        return TargetInUse(disk.device, f"it is mounted ({', '.join(disk.mounted)})")
    if disk.swap:
        return TargetInUse(disk.device, f"it is used as swap ({', '.join(disk.swap)})")
    if disk.holders:
        return TargetInUse(disk.device, f"it is in use by {', '.join(disk.holders)} (LVM, device-mapper or RAID)")
    if disk.read_only:
        return TargetRefused(disk.device, "it is read-only")
    if disk.size < needed:
        return TargetTooSmall(disk.device, disk.size, needed)
    return None


def _swap_devnums(swaps: str) -> set[int]:
    out = set()
    for line in swaps.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0].startswith("/dev/"):
            try:
                out.add(os.stat(fields[0]).st_rdev)
            except OSError:
                pass
    return out


def _holders(sys_path: str) -> list[str]:
    try:
        return sorted(os.listdir(Path(sys_path) / "holders"))
    except OSError:
        return []


def disks(context: pyudev.Context, mountinfo: str | None = None, swaps: str | None = None) -> list[Disk]:
    """Every whole disk udev knows, with the facts :func:`refusal` needs.

    ``mountinfo`` and ``swaps``: the tables' text (``/proc/self/mountinfo``,
    ``/proc/swaps`` when None).
    """
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    if swaps is None:
        try:
            swaps = Path("/proc/swaps").read_text()
        except OSError:
            swaps = ""
    mounted = {os.makedev(m.major, m.minor) for m in parse_mountinfo(mountinfo) if m.major}
    swapped = _swap_devnums(swaps)
    out = []
    for dev in context.list_devices(subsystem="block", DEVTYPE="disk"):
        if dev.device_node is None or dev.sys_name.startswith(NOT_DISKS):
            continue
        try:
            size = int(dev.attributes.asint("size")) * 512
        except (KeyError, ValueError):
            continue
        if size == 0:  # an empty loop device, a card reader with no card
            continue
        parts = [dev, *(c for c in dev.children if c.device_type == "partition")]
        model = (dev.properties.get("ID_MODEL") or _attr(dev, "device/model")
                 or (f"loop device over {Path(_attr(dev, 'loop/backing_file')).name}"
                     if dev.sys_name.startswith("loop") else ""))
        out.append(Disk(
            device=dev.device_node, sys_path=dev.sys_path, size=size, model=model.replace("_", " ").strip(),
            read_only=_attr(dev, "ro") == "1",
            mounted=tuple(p.device_node for p in parts if p.device_number in mounted and p.device_node),
            swap=tuple(p.device_node for p in parts if p.device_number in swapped and p.device_node),
            holders=tuple(h for p in parts for h in _holders(p.sys_path)),
        ))
    return out


def _attr(dev: pyudev.Device, name: str) -> str:
    try:
        value = dev.attributes.get(name)
    except (KeyError, OSError):
        return ""
    return value.decode(errors="replace").strip() if isinstance(value, bytes) else ""


def candidates(context: pyudev.Context, medium: MediumInfo | None, needed: int,
               mountinfo: str | None = None, swaps: str | None = None) -> list[Disk]:
    """The disks that may be installed onto, as offered to a person."""
    return [d for d in disks(context, mountinfo, swaps) if refusal(d, medium, needed) is None]


def check_target(context: pyudev.Context, device: str, medium: MediumInfo | None, needed: int,
                 mountinfo: str | None = None, swaps: str | None = None) -> Disk:
    """The disk at ``device`` when it may be installed onto, looked at now.

    :raises TargetRefused: (a subclass naming why) it may not.
    """
    for disk in disks(context, mountinfo, swaps):
        if disk.device == device:
            why = refusal(disk, medium, needed)
            if why is not None:
                raise why
            return disk
    raise NoSuchTarget(device, "it is not a whole disk that udev knows")
