"""The machine we boot on, as udev sees it, and the udev events that matter.

:func:`detect` builds a :class:`HardwareProfile`: memory (``/proc/meminfo``,
or the hypervisor's figures on Xen, where dom0 sees only its own share), CPUs,
the live medium (which disk holds the mounted medium, what kind it is and how
fast it reads), NICs, DRM displays and the virtualization the host offers.

:class:`HardwareMonitor` turns udev uevents into plain events
(:class:`MediumEjected`, :class:`MediumChanged`, :class:`MemoryAdded`,
:class:`NicAdded`, :class:`NicRemoved`) handed to a callback. It does not
import GLib: :func:`watch_with_glib` is the small piece of glue that watches
the monitor's file descriptor from a GLib main loop::

    monitor = HardwareMonitor(on_event, medium=profile.medium)
    source_id = watch_with_glib(monitor)    # GLib.source_remove(source_id) to stop

Read speed classes: ``slow`` media are seek-bound or narrow (optical drives,
USB 2 and slower, spinning disks), so restores from them run one at a time;
``fast`` media (USB 3, SSD, NVMe, a medium copied to RAM) can feed several.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import pyudev

from .bootopts import DEFAULT_MEDIA
from .errors import Failed, MediumUnavailable
from .hypervisor.base import HostMemory

__all__ = [
    "MediumInfo",
    "Nic",
    "Connector",
    "DrmCard",
    "Virtualization",
    "HardwareProfile",
    "Mount",
    "parse_mountinfo",
    "parse_meminfo",
    "find_mount",
    "medium_from_device",
    "find_medium",
    "detect",
    "MediumEjected",
    "MediumChanged",
    "MemoryAdded",
    "NicAdded",
    "NicRemoved",
    "HardwareEvent",
    "HardwareMonitor",
    "watch_with_glib",
]

KINDS = ("optical", "usb", "disk", "ram", "other")
#: USB links at or below this many Mbit/s (USB 2 "high speed") read slowly
USB_SLOW_MAX_MBPS = 480
#: file systems that mean the medium was copied to memory (``toram``)
RAM_FILESYSTEMS = ("tmpfs", "ramfs")


# --- the profile -----------------------------------------------------------------

@dataclass(frozen=True)
class MediumInfo:
    """The block device that holds the mounted live medium.

    ``device`` and ``sys_path`` name the whole disk (``/dev/sdb``); ``partition``
    the partition that is mounted, if it is one (``/dev/sdb1``). A medium copied
    to RAM has no device.
    """

    path: str
    kind: str
    speed: str
    device: str | None = None
    sys_path: str | None = None
    partition: str | None = None
    partition_sys_path: str | None = None
    bus: str = ""
    rotational: bool | None = None
    usb_speed_mbps: int | None = None
    model: str = ""
    fs_type: str = ""
    fs_uuid: str = ""
    fs_label: str = ""

    @property
    def seek_bound(self) -> bool:
        """Restores from it must run one at a time."""
        return self.speed == "slow"

    def as_dict(self) -> dict[str, str | int | bool]:
        """Plain values for the D-Bus ``Medium`` property (a{sv}); unknowns are empty or 0."""
        return {
            "path": self.path,
            "kind": self.kind,
            "speed": self.speed,
            "seek_bound": self.seek_bound,
            "device": self.device or "",
            "partition": self.partition or "",
            "bus": self.bus,
            "rotational": bool(self.rotational),
            "usb_speed_mbps": self.usb_speed_mbps or 0,
            "model": self.model,
            "fs_type": self.fs_type,
            "fs_uuid": self.fs_uuid,
            "fs_label": self.fs_label,
        }


@dataclass(frozen=True)
class Nic:
    name: str
    driver: str
    mac: str
    sys_path: str = ""


@dataclass(frozen=True)
class Connector:
    name: str
    status: str


@dataclass(frozen=True)
class DrmCard:
    name: str
    driver: str
    connectors: tuple[Connector, ...] = ()

    @property
    def connected(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.connectors if c.status == "connected")


@dataclass(frozen=True)
class Virtualization:
    """What the host offers: a KVM device, and whether we run as Xen's dom0.

    ``kvm`` only says the device exists; whether it can boot a guest is the
    QEMU backend's probe to make.
    """

    kvm: bool
    xen_dom0: bool


@dataclass(frozen=True)
class HardwareProfile:
    """Everything the planner and the scheduler need to know about the machine."""

    memory_total_mib: int
    memory_available_mib: int
    memory_source: str
    cpus: int
    medium: MediumInfo | None
    nics: tuple[Nic, ...]
    displays: tuple[DrmCard, ...]
    virtualization: Virtualization
    warnings: tuple[str, ...] = field(default=())

    @property
    def host_memory(self) -> HostMemory:
        """The figures :func:`xsession.memory.plan` works from."""
        return HostMemory(self.memory_total_mib, self.memory_available_mib)

    def as_dict(self) -> dict[str, str | int | bool | list[str]]:
        """Plain values for the D-Bus ``Hardware`` property (a{sv})."""
        return {
            "memory_total_mib": self.memory_total_mib,
            "memory_available_mib": self.memory_available_mib,
            "memory_source": self.memory_source,
            "cpus": self.cpus,
            "medium_kind": self.medium.kind if self.medium else "",
            "medium_speed": self.medium.speed if self.medium else "",
            "nics": [f"{n.name} {n.driver} {n.mac}" for n in self.nics],
            "displays": [c.name for c in self.displays],
            "connected_outputs": [o for c in self.displays for o in c.connected],
            "kvm": self.virtualization.kvm,
            "xen_dom0": self.virtualization.xen_dom0,
            "warnings": list(self.warnings),
        }


# --- /proc parsers (pure) ----------------------------------------------------------

@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``."""

    mount_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    fs_type: str
    source: str


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as ``\\040`` and so on."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse mountinfo text; malformed lines are skipped (the kernel writes none)."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        try:
            major, minor = (int(x) for x in fields[2].split(":"))
            mount_id = int(fields[0])
        except ValueError:
            continue
        mounts.append(Mount(mount_id, major, minor, _unescape(fields[3]), _unescape(fields[4]),
                            tail[0], _unescape(tail[1])))
    return mounts


def find_mount(mounts: Sequence[Mount], path: str) -> Mount | None:
    """The mount that holds ``path``: the longest mount point that is a prefix,
    the last one mounted when several share it (later mounts hide earlier ones)."""
    path = os.path.normpath(path)
    best: Mount | None = None
    for m in mounts:
        mp = m.mount_point
        if path == mp or path.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) >= len(best.mount_point):
                best = m
    return best


def parse_meminfo(text: str) -> tuple[int, int]:
    """(total, available) MiB from ``/proc/meminfo`` text.

    Kernels before 3.14 lack MemAvailable; free + buffers + cached stands in.

    :raises ValueError: no MemTotal line.
    """
    kib: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            kib[key.strip()] = int(parts[0])
    if "MemTotal" not in kib:
        raise ValueError("no MemTotal line")
    available = kib.get("MemAvailable")
    if available is None:
        available = kib.get("MemFree", 0) + kib.get("Buffers", 0) + kib.get("Cached", 0)
    return kib["MemTotal"] // 1024, available // 1024


# --- udev --------------------------------------------------------------------------

def _attr(device: pyudev.Device, name: str) -> str | None:
    try:
        value = device.attributes.get(name)
    except (OSError, UnicodeDecodeError):
        return None
    return value.decode("utf-8", "replace").strip() if value is not None else None


def _prop(device: pyudev.Device, name: str, default: str = "") -> str:
    return device.properties.get(name, default)


def _driver(device: pyudev.Device | None) -> str:
    """The bound driver: the ``driver`` link, or the DRIVER udev recorded."""
    if device is None:
        return ""
    return device.driver or _prop(device, "DRIVER")


def _speed_of(kind: str, rotational: bool | None, usb_mbps: int | None) -> str:
    if kind == "optical":
        return "slow"
    if kind == "usb":
        return "slow" if usb_mbps is None or usb_mbps <= USB_SLOW_MAX_MBPS else "fast"
    if kind == "ram":
        return "fast"
    if kind == "disk":
        return "slow" if rotational else "fast"
    return "slow"  # unknown: assume the worst, one restore at a time


def medium_from_device(device: pyudev.Device, path: str, fs_type: str = "") -> MediumInfo:
    """Describe the medium mounted from ``device`` (a disk or one of its partitions)."""
    disk = device
    partition = None
    if device.device_type == "partition":
        partition = device
        disk = device.find_parent("block", "disk") or device
    usb = disk.find_parent("usb", "usb_device")
    bus = _prop(disk, "ID_BUS") or _prop(device, "ID_BUS")
    rot_attr = _attr(disk, "queue/rotational")
    rotational = None if rot_attr is None else rot_attr == "1"
    usb_mbps = None
    if usb is not None:
        speed = _attr(usb, "speed")
        try:
            usb_mbps = int(float(speed)) if speed else None
        except ValueError:
            usb_mbps = None
    if _prop(disk, "ID_CDROM") == "1" or _prop(disk, "ID_TYPE") == "cd" or disk.sys_name.startswith("sr"):
        kind = "optical"
    elif usb is not None or bus == "usb":
        kind, bus = "usb", "usb"
    elif disk.sys_name.startswith("loop") or disk.sys_name.startswith("zram"):
        kind = "other"
    else:
        kind = "disk"
        if not bus:
            bus = "nvme" if disk.sys_name.startswith("nvme") else ""
    model = (_prop(disk, "ID_MODEL_FROM_DATABASE") or _prop(disk, "ID_MODEL")
             or _attr(disk, "device/model") or "").replace("_", " ").strip()
    fs_src = partition or disk
    return MediumInfo(
        path=path,
        kind=kind,
        speed=_speed_of(kind, rotational, usb_mbps),
        device=disk.device_node,
        sys_path=disk.sys_path,
        partition=partition.device_node if partition is not None else None,
        partition_sys_path=partition.sys_path if partition is not None else None,
        bus=bus,
        rotational=rotational,
        usb_speed_mbps=usb_mbps,
        model=model,
        fs_type=_prop(fs_src, "ID_FS_TYPE") or fs_type,
        fs_uuid=_prop(fs_src, "ID_FS_UUID"),
        fs_label=_prop(fs_src, "ID_FS_LABEL"),
    )


def _device_of_mount(context: pyudev.Context, mount: Mount) -> pyudev.Device | None:
    devnum = os.makedev(mount.major, mount.minor)
    try:
        return pyudev.Devices.from_device_number(context, "block", devnum)
    except pyudev.DeviceNotFoundError:
        pass
    # no /sys/dev/block link: match the numbers udev recorded
    for dev in context.list_devices(subsystem="block"):
        if _prop(dev, "MAJOR") == str(mount.major) and _prop(dev, "MINOR") == str(mount.minor):
            return dev
    return None


def find_medium(context: pyudev.Context, paths: str | Sequence[str] = DEFAULT_MEDIA,
                mountinfo: str | None = None) -> MediumInfo:
    """The medium mounted at the first of ``paths`` that is a mount point.

    :param mountinfo: mountinfo text; ``/proc/self/mountinfo`` when None.
    :raises MediumUnavailable: none of the paths is mounted, or its block
        device is not known to udev.
    """
    if isinstance(paths, str):
        paths = (paths,)
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError as e:
            raise MediumUnavailable(", ".join(paths), f"cannot read the mount table: {e}") from e
    mounts = parse_mountinfo(mountinfo)
    for path in paths:
        mount = find_mount(mounts, path)
        if mount is None or mount.mount_point != os.path.normpath(path):
            continue
        if mount.fs_type in RAM_FILESYSTEMS:
            return MediumInfo(path=path, kind="ram", speed="fast", fs_type=mount.fs_type)
        if mount.major == 0:
            # a virtual or network file system: nothing udev knows
            return MediumInfo(path=path, kind="other", speed="slow", fs_type=mount.fs_type)
        device = _device_of_mount(context, mount)
        if device is None:
            raise MediumUnavailable(path, f"block device {mount.major}:{mount.minor} ({mount.source}) "
                                          "is not known to udev")
        return medium_from_device(device, path, mount.fs_type)
    raise MediumUnavailable(", ".join(paths), "not mounted")


def _cpus(context: pyudev.Context) -> int:
    count = 0
    for dev in context.list_devices(subsystem="cpu"):
        if re.fullmatch(r"cpu\d+", dev.sys_name) and _attr(dev, "online") != "0":
            count += 1
    return count or os.cpu_count() or 1


def _is_physical_nic(device: pyudev.Device) -> bool:
    """A NIC of the machine, not lo, a bridge, a tap or a Xen guest's vif."""
    path = device.device_path
    return not (path.startswith("/devices/virtual/") or "/xen-backend/" in path
                or path.startswith("/devices/vif-"))


def _nic(device: pyudev.Device) -> Nic:
    driver = _prop(device, "ID_NET_DRIVER")
    if not driver:
        driver = _driver(device.parent)
    return Nic(name=device.sys_name, driver=driver, mac=_attr(device, "address") or "", sys_path=device.sys_path)


def _nics(context: pyudev.Context) -> tuple[Nic, ...]:
    nics = [_nic(d) for d in context.list_devices(subsystem="net") if _is_physical_nic(d)]
    return tuple(sorted(nics, key=lambda n: n.name))


def _displays(context: pyudev.Context) -> tuple[DrmCard, ...]:
    cards: dict[str, DrmCard] = {}
    connectors: dict[str, list[Connector]] = {}
    for dev in context.list_devices(subsystem="drm"):
        name = dev.sys_name
        card = re.fullmatch(r"(card\d+)(?:-(.+))?", name)
        if not card:
            continue  # renderD128, controlD64, version
        if card.group(2) is None:
            cards[name] = DrmCard(name, _driver(dev.parent))
        else:
            connectors.setdefault(card.group(1), []).append(Connector(name, _attr(dev, "status") or "unknown"))
    return tuple(
        DrmCard(c.name, c.driver, tuple(sorted(connectors.get(c.name, []), key=lambda x: x.name)))
        for _, c in sorted(cards.items())
    )


def _virtualization(context: pyudev.Context, proc: Path) -> Virtualization:
    try:
        pyudev.Devices.from_name(context, "misc", "kvm")
        kvm = True
    except pyudev.DeviceNotFoundError:
        kvm = False
    try:
        caps = (proc / "xen" / "capabilities").read_text()
    except OSError:
        caps = ""
    return Virtualization(kvm=kvm, xen_dom0="control_d" in caps)


def detect(
    context: pyudev.Context | None = None,
    *,
    medium_paths: str | Sequence[str] = DEFAULT_MEDIA,
    mountinfo: str | None = None,
    proc: str | os.PathLike[str] = "/proc",
    host_memory: HostMemory | None = None,
) -> HardwareProfile:
    """Look at the machine once.

    A medium that cannot be found is no error here (a warning; ``medium`` is
    None): the engine decides what that means.

    :param medium_paths: where the medium may be mounted, first match wins
        (``xenubuntu.medium`` when given).
    :param mountinfo: mountinfo text; ``/proc/self/mountinfo`` when None.
    :param proc: where ``meminfo`` and ``xen/capabilities`` are read from.
    :param host_memory: the hypervisor's figures on Xen (``Backend.host_memory()``),
        used instead of ``meminfo``, which shows only dom0's share there.
    :raises Failed: ``meminfo`` cannot be read or has no MemTotal.
    """
    context = context or pyudev.Context()
    proc = Path(proc)
    warnings: list[str] = []
    if host_memory is not None:
        total, available, source = host_memory.total_mib, host_memory.free_mib, "hypervisor"
    else:
        meminfo = proc / "meminfo"
        try:
            total, available = parse_meminfo(meminfo.read_text())
        except (OSError, ValueError) as e:
            raise Failed(f"cannot read the memory size from {meminfo}: {e}") from e
        source = "meminfo"
    try:
        medium: MediumInfo | None = find_medium(context, medium_paths, mountinfo)
    except MediumUnavailable as e:
        medium = None
        warnings.append(str(e))
    return HardwareProfile(
        memory_total_mib=total,
        memory_available_mib=available,
        memory_source=source,
        cpus=_cpus(context),
        medium=medium,
        nics=_nics(context),
        displays=_displays(context),
        virtualization=_virtualization(context, proc),
        warnings=tuple(warnings),
    )


# --- events ------------------------------------------------------------------------

@dataclass(frozen=True)
class MediumEjected:
    """The medium went away: tray opened, disc or stick removed. Restores reading
    from it fail with ``MediumUnavailable``."""

    device: str
    reason: str


@dataclass(frozen=True)
class MediumChanged:
    """A medium is (back) in place. ``same`` tells whether it carries the file
    system the session manager booted from (same UUID), so waiting restores can
    be retried; a different disc is not our medium."""

    device: str
    same: bool
    fs_uuid: str
    fs_label: str


@dataclass(frozen=True)
class MemoryAdded:
    """A memory block came online (hotplug): plan again."""

    block: str
    size_mib: int | None


@dataclass(frozen=True)
class NicAdded:
    nic: Nic


@dataclass(frozen=True)
class NicRemoved:
    name: str


HardwareEvent = Union[MediumEjected, MediumChanged, MemoryAdded, NicAdded, NicRemoved]
EventCallback = Callable[[HardwareEvent], None]

WATCHED_SUBSYSTEMS = ("block", "net", "memory")


class HardwareMonitor:
    """Turns udev events into :data:`HardwareEvent` values for a callback.

    It keeps what it needs to tell our medium apart from any other disk: the
    medium's device paths and file system UUID, and whether it is present.
    Events are read by :meth:`dispatch` when :meth:`fileno` is readable; it
    never blocks.

    >>> monitor = HardwareMonitor(print, medium=None)   # doctest: +SKIP
    >>> monitor.start(); monitor.dispatch()            # doctest: +SKIP
    """

    def __init__(self, callback: EventCallback, medium: MediumInfo | None = None,
                 context: pyudev.Context | None = None) -> None:
        self.callback = callback
        self.medium = medium
        self.medium_present = medium is not None
        self._online_blocks: set[str] = set()
        self._block_size_mib: int | None = None
        self.context = context or pyudev.Context()
        # the netlink socket is opened here and closed by close()
        self.monitor = pyudev.Monitor.from_netlink(self.context)
        for subsystem in WATCHED_SUBSYSTEMS:
            self.monitor.filter_by(subsystem)
        self._started = False

    def fileno(self) -> int:
        return self.monitor.fileno()

    def start(self) -> None:
        """Start receiving; events before this are not seen."""
        if not self._started:
            self.monitor.start()
            self._started = True

    def close(self) -> None:
        """Stop receiving; idempotent."""
        try:
            self.monitor.stop()
        except Exception:  # pyudev raises on a second stop in some versions
            pass
        self._started = False

    def dispatch(self) -> int:
        """Read every pending uevent, hand the resulting events to the callback.

        :returns: how many events were delivered.
        """
        self.start()
        count = 0
        while True:
            device = self.monitor.poll(timeout=0)
            if device is None:
                return count
            for event in self.translate(device.action or "", device):
                self.callback(event)
                count += 1

    # -- translation: udev device + action -> events ----------------------------

    def translate(self, action: str, device: pyudev.Device) -> list[HardwareEvent]:
        """The events one uevent means; updates what the monitor knows of the medium."""
        subsystem = device.subsystem
        if subsystem == "block":
            return self._block(action, device)
        if subsystem == "net":
            if not _is_physical_nic(device):
                return []
            if action == "add":
                return [NicAdded(_nic(device))]
            if action == "remove":
                return [NicRemoved(device.sys_name)]
            return []
        if subsystem == "memory":
            return self._memory(action, device)
        return []

    def _removes_medium(self, device: pyudev.Device) -> bool:
        """The removed device is the medium's disk or partition, or one of their parents."""
        m = self.medium
        if m is None:
            return False
        prefix = device.sys_path.rstrip("/") + "/"
        return any(p and (p == device.sys_path or p.startswith(prefix)) for p in (m.sys_path, m.partition_sys_path))

    def _block(self, action: str, device: pyudev.Device) -> list[HardwareEvent]:
        m = self.medium
        if m is None:
            return []
        name = device.device_node or device.sys_name
        if action == "remove" and self._removes_medium(device):
            if not self.medium_present:
                return []
            self.medium_present = False
            return [MediumEjected(name, "removed")]
        if action == "change" and device.sys_path == m.sys_path and m.kind == "optical":
            if _prop(device, "DISK_EJECT_REQUEST") == "1" or _prop(device, "ID_CDROM_MEDIA") != "1":
                if not self.medium_present:
                    return []
                self.medium_present = False
                why = "eject requested" if _prop(device, "DISK_EJECT_REQUEST") == "1" else "no disc in the drive"
                return [MediumEjected(name, why)]
            uuid = _prop(device, "ID_FS_UUID")
            same = bool(m.fs_uuid) and uuid == m.fs_uuid
            if self.medium_present and same:
                return []  # a change event about the disc we have
            self.medium_present = same
            return [MediumChanged(name, same, uuid, _prop(device, "ID_FS_LABEL"))]
        if action in ("add", "change") and not self.medium_present:
            uuid = _prop(device, "ID_FS_UUID")
            if m.fs_uuid and uuid == m.fs_uuid:
                self.medium_present = True
                return [MediumChanged(name, True, uuid, _prop(device, "ID_FS_LABEL"))]
        return []

    def _block_size(self, device: pyudev.Device) -> int | None:
        if self._block_size_mib is None:
            try:
                text = (Path(device.sys_path).parent / "block_size_bytes").read_text().strip()
                self._block_size_mib = int(text, 16) // (1024 * 1024)
            except (OSError, ValueError):
                return None
        return self._block_size_mib

    def _memory(self, action: str, device: pyudev.Device) -> list[HardwareEvent]:
        name = device.sys_name
        # "online" when a block is onlined by hand or by auto_online_blocks; an "add"
        # of a block that is online already counts too. "change" does not: blocks
        # online before the monitor started would look new.
        online = action == "online" or (action == "add" and _attr(device, "state") == "online")
        if action in ("offline", "remove"):
            self._online_blocks.discard(name)
            return []
        if not online or name in self._online_blocks:
            return []
        self._online_blocks.add(name)
        return [MemoryAdded(name, self._block_size(device))]


def watch_with_glib(monitor: HardwareMonitor, priority: int | None = None) -> int:
    """Dispatch the monitor's events from the default GLib main context.

    :returns: the GLib source id; ``GLib.source_remove(id)`` stops watching.
    """
    from gi.repository import GLib  # only here: the rest of the module runs without GLib

    def on_readable(_fd: Any, _condition: Any) -> bool:
        monitor.dispatch()
        return True  # keep watching

    monitor.start()
    return GLib.io_add_watch(monitor.fileno(), priority if priority is not None else GLib.PRIORITY_DEFAULT,
                             GLib.IO_IN, on_readable)
