"""Runs hardware detection and the udev monitor inside a umockdev testbed.

Must run under ``umockdev-wrapper`` (its LD_PRELOAD sends /sys, /dev and the
uevent netlink socket into the testbed). Prints one JSON document on stdout;
``tests/test_hardware.py`` starts it and checks what it printed::

    umockdev-wrapper python3 tests/udev_scenarios.py detect desktop-usb
    umockdev-wrapper python3 tests/udev_scenarios.py events laptop-dvd
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import GLib, UMockdev  # noqa: E402

import pyudev  # noqa: E402

from xsession import hardware  # noqa: E402
from xsession.hypervisor.base import HostMemory  # noqa: E402

HERE = Path(__file__).resolve().parent / "umockdev"
EVENT_TIMEOUT_S = 5.0
STEP_MS = 30

DESKTOP_USB = "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2"
DESKTOP_SDB = DESKTOP_USB + "/1-2:1.0/host6/target6:0:0/6:0:0:0/block/sdb"
LAPTOP_SR0 = "/sys/devices/pci0000:00/0000:00:1f.2/ata2/host1/target1:0:0/1:0:0:0/block/sr0"

USB3_STICK = """\
P: /devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host7/target7:0:0/7:0:0:0/block/sdc/sdc1
N: sdc1
E: DEVNAME=/dev/sdc1
E: DEVTYPE=partition
E: MAJOR=8
E: MINOR=33
E: SUBSYSTEM=block
E: ID_BUS=usb
E: ID_FS_TYPE=vfat
E: ID_FS_UUID=4A1B-22C3
E: ID_FS_LABEL=XENUBUNTU
A: dev=8:33\\n
A: partition=1\\n

P: /devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host7/target7:0:0/7:0:0:0/block/sdc
N: sdc
E: DEVNAME=/dev/sdc
E: DEVTYPE=disk
E: MAJOR=8
E: MINOR=32
E: SUBSYSTEM=block
E: ID_BUS=usb
E: ID_MODEL=Extreme_Pro
A: dev=8:32\\n
A: queue/rotational=0\\n
A: removable=1\\n

P: /devices/pci0000:00/0000:00:14.0/usb2/2-1
E: DEVTYPE=usb_device
E: DRIVER=usb
E: SUBSYSTEM=usb
A: speed=5000\\n
A: version= 3.20\\n
"""


def records(path: Path) -> dict[str, str]:
    """The description's records by sysfs path (``/sys/devices/...``)."""
    out = {}
    for block in path.read_text().split("\n\n"):
        if block.strip():
            first = block.strip().splitlines()[0]
            out["/sys" + first[3:]] = block.strip() + "\n"
    return out


def edited(record: str, drop: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> str:
    lines = [ln for ln in record.splitlines() if not ln.startswith(drop)] if drop else record.splitlines()
    p, rest = lines[0], lines[1:]
    return "\n".join([p, *add, *rest]) + "\n"


def testbed(machine: str) -> UMockdev.Testbed:
    tb = UMockdev.Testbed.new()
    tb.add_from_file(str(HERE / f"{machine}.umockdev"))
    # a sysfs file of no device: the memory block size (128 MiB here)
    mem = Path(tb.get_sys_dir()) / "devices" / "system" / "memory"
    mem.mkdir(parents=True, exist_ok=True)
    (mem / "block_size_bytes").write_text("8000000\n")
    return tb


def remove_device(tb: UMockdev.Testbed, path: str) -> None:
    """Remove a device and the links umockdev 0.17 leaves behind (``/sys/block/NAME``,
    ``/sys/dev/block/MAJ:MIN``), so that a device of the same name can come back."""
    tb.remove_device(path)
    sys_dir = Path(tb.get_sys_dir())
    for folder in [sys_dir / "block", *sys_dir.glob("dev/*"), *sys_dir.glob("class/*")]:
        for link in folder.iterdir() if folder.is_dir() else ():
            if link.is_symlink() and not link.exists():
                link.unlink()


def rewrite_properties(tb: UMockdev.Testbed, path: str, drop: tuple[str, ...] = (),
                       add: tuple[str, ...] = ()) -> None:
    """Change a device's udev properties as udev does on a change event: some go,
    some come. umockdev keeps them in the testbed's ``uevent`` file."""
    uevent = Path(tb.get_root_dir() + path) / "uevent"
    keep = [ln for ln in uevent.read_text().splitlines() if ln and not ln.startswith(drop)]
    names = {a.split("=", 1)[0] for a in add}
    keep = [ln for ln in keep if ln.split("=", 1)[0] not in names]
    uevent.write_text("\n".join(keep + list(add)) + "\n")


def plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {"type": type(obj).__name__, **{k: plain(v) for k, v in dataclasses.asdict(obj).items()}}
    return obj


def detect(machine: str, *flags: str) -> Any:
    tb = testbed(machine)
    proc = HERE / machine
    host = None
    with tempfile.TemporaryDirectory() as tmp:
        if "xen" in flags:
            proc = Path(tmp)
            (proc / "xen").mkdir()
            (proc / "xen" / "capabilities").write_text("control_d\n")
            host = HostMemory(total_mib=8191, free_mib=6000)
        if "usb3" in flags:
            tb.add_from_string(USB3_STICK)
        mountinfo = (HERE / machine / "mountinfo").read_text()
        if "usb3" in flags:
            mountinfo += "40 28 8:33 / /media/stick ro,relatime - vfat /dev/sdc1 ro\n"
        if "unmounted" in flags:
            mountinfo = "".join(ln for ln in mountinfo.splitlines(True) if " /cdrom " not in ln
                                and " /run/live/medium " not in ln)
        paths = ("/media/stick",) if "usb3" in flags else hardware.DEFAULT_MEDIA
        profile = hardware.detect(pyudev.Context(), medium_paths=paths, mountinfo=mountinfo,
                                  proc=proc, host_memory=host)
    return {"profile": plain(profile), "as_dict": profile.as_dict(),
            "medium": profile.medium.as_dict() if profile.medium else None}


def run_steps(machine: str, steps: list[Callable[[UMockdev.Testbed], None]], expected: int) -> Any:
    """Start a monitor on a GLib loop, play the steps, collect events until
    ``expected`` arrived (plus a short grace for unexpected ones) or the timeout."""
    tb = testbed(machine)
    profile = hardware.detect(pyudev.Context(), mountinfo=(HERE / machine / "mountinfo").read_text(),
                              proc=HERE / machine)
    events: list[Any] = []
    loop = GLib.MainLoop()
    monitor = hardware.HardwareMonitor(events.append, medium=profile.medium)
    source = hardware.watch_with_glib(monitor)
    pending = list(steps)
    timed_out = []

    def step() -> bool:
        if pending:
            pending.pop(0)(tb)
            return True
        if len(events) >= expected:
            GLib.timeout_add(200, loop.quit)  # grace: anything extra shows up too
            return False
        return True

    def timeout() -> bool:
        timed_out.append(True)
        loop.quit()
        return False

    GLib.timeout_add(STEP_MS, step)
    timer = GLib.timeout_add(int(EVENT_TIMEOUT_S * 1000), timeout)
    loop.run()
    if not timed_out:
        GLib.source_remove(timer)
    GLib.source_remove(source)
    monitor.close()
    return {"events": [plain(e) for e in events], "timed_out": bool(timed_out),
            "present": monitor.medium_present}


def events_desktop() -> Any:
    recs = records(HERE / "desktop-usb.umockdev")
    sdb, sdb1 = recs[DESKTOP_SDB], recs[DESKTOP_SDB + "/sdb1"]
    new_nic = (
        "P: /devices/pci0000:00/0000:00:14.0/usb1/1-4/1-4:1.0/net/enx00e04c680001\n"
        "E: ID_NET_DRIVER=r8152\nE: INTERFACE=enx00e04c680001\nE: SUBSYSTEM=net\n"
        "A: address=00:e0:4c:68:00:01\\n\nA: type=1\\n\n"
    )
    tap = "P: /devices/virtual/net/tap0\nE: INTERFACE=tap0\nE: SUBSYSTEM=net\nA: address=fe:54:00:aa:bb:cc\\n\n"
    enp4 = "/sys/devices/pci0000:00/0000:00:1c.3/0000:04:00.0/net/enp4s0"
    mem2 = "/sys/devices/system/memory/memory2"
    other_stick = edited(sdb1.replace("sdb", "sdc").replace("8:17", "8:33").replace("MINOR=17", "MINOR=33"),
                         drop=("E: ID_FS_UUID=",), add=("E: ID_FS_UUID=1234-ABCD",))

    def add(text: str) -> Callable[[UMockdev.Testbed], None]:
        return lambda tb: tb.add_from_string(text)  # umockdev announces it with an "add" uevent

    def remove(path: str) -> Callable[[UMockdev.Testbed], None]:
        # the kernel announces a removal while the device still exists in sysfs
        return lambda tb: (tb.uevent(path, "remove"), remove_device(tb, path))

    steps = [
        add(new_nic),                                                    # NicAdded
        add(tap),                                                        # nothing: virtual
        remove(enp4),                                                    # NicRemoved
        add("P: /devices/system/memory/memory2\nE: SUBSYSTEM=memory\nA: state=offline\\n\n"),  # nothing: offline
        lambda tb: (tb.set_attribute(mem2, "state", "online"), tb.uevent(mem2, "online")),  # MemoryAdded
        lambda tb: tb.uevent(mem2, "online"),                            # nothing: already counted
        lambda tb: tb.uevent(DESKTOP_SDB, "change"),                     # nothing: stick still there
        remove(DESKTOP_SDB + "/sdb1"),                                   # MediumEjected
        remove(DESKTOP_SDB),                                             # nothing: already gone
        add(other_stick),                                                # nothing: not our medium
        add(sdb),                                                        # MediumChanged(same): isohybrid disk
        add(sdb1),                                                       # nothing: back already
    ]
    return run_steps("desktop-usb", steps, expected=5)


def events_laptop() -> Any:
    media = ("ID_CDROM_MEDIA", "ID_FS_", "DISK_MEDIA_CHANGE", "DISK_EJECT_REQUEST")
    ours = ("ID_CDROM_MEDIA=1", "ID_CDROM_MEDIA_DVD=1", "ID_FS_TYPE=iso9660",
            "ID_FS_UUID=2026-11-01-12-00-00-00", "ID_FS_LABEL=XenUbuntu_26.04")
    other = ("ID_CDROM_MEDIA=1", "ID_CDROM_MEDIA_DVD=1", "ID_FS_TYPE=iso9660",
             "ID_FS_UUID=2019-10-17-13-00-00-00", "ID_FS_LABEL=Ubuntu_19.10")

    def change(drop: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> Callable[[UMockdev.Testbed], None]:
        return lambda tb: (rewrite_properties(tb, LAPTOP_SR0, drop, add), tb.uevent(LAPTOP_SR0, "change"))

    steps = [
        change(),                                                        # nothing: same disc
        change(add=("DISK_EJECT_REQUEST=1",)),                           # MediumEjected(eject requested)
        change(drop=media, add=("DISK_MEDIA_CHANGE=1",)),                # nothing: already ejected
        change(drop=media, add=("DISK_MEDIA_CHANGE=1", *other)),         # MediumChanged(same=False)
        change(drop=media, add=("DISK_MEDIA_CHANGE=1",)),                # nothing: ours was gone already
        change(drop=media, add=("DISK_MEDIA_CHANGE=1", *ours)),          # MediumChanged(same=True)
        change(drop=media, add=("DISK_MEDIA_CHANGE=1", *ours)),          # nothing: our disc still
    ]
    return run_steps("laptop-dvd", steps, expected=3)


#: forged for the install's targets: a small internal disk, one whose partition is mounted, and
#: an LVM physical volume (device-mapper stacks on it: its holders)
SMALL_AND_BUSY = """\
P: /devices/pci0000:00/0000:00:17.0/ata3/host2/target2:0:0/2:0:0:0/block/sdc
N: sdc
E: DEVNAME=/dev/sdc
E: DEVTYPE=disk
E: MAJOR=8
E: MINOR=32
E: SUBSYSTEM=block
E: ID_BUS=ata
E: ID_MODEL=Tiny_SSD
A: dev=8:32\\n
A: size=131072\\n

P: /devices/pci0000:00/0000:00:17.0/ata4/host3/target3:0:0/3:0:0:0/block/sdd
N: sdd
E: DEVNAME=/dev/sdd
E: DEVTYPE=disk
E: MAJOR=8
E: MINOR=48
E: SUBSYSTEM=block
E: ID_BUS=ata
E: ID_MODEL=Data_HDD
A: dev=8:48\\n
A: size=1953525168\\n

P: /devices/pci0000:00/0000:00:17.0/ata4/host3/target3:0:0/3:0:0:0/block/sdd/sdd1
N: sdd1
E: DEVNAME=/dev/sdd1
E: DEVTYPE=partition
E: MAJOR=8
E: MINOR=49
E: SUBSYSTEM=block
A: dev=8:49\\n
A: partition=1\\n
A: size=1953523120\\n

P: /devices/pci0000:00/0000:00:17.0/ata5/host4/target4:0:0/4:0:0:0/block/sde
N: sde
E: DEVNAME=/dev/sde
E: DEVTYPE=disk
E: MAJOR=8
E: MINOR=64
E: SUBSYSTEM=block
E: ID_BUS=ata
E: ID_FS_TYPE=LVM2_member
A: dev=8:64\\n
A: size=1953525168\\n
A: holders/dm-0=
"""


def install_targets(machine: str) -> Any:
    """What the install may write to on a recorded machine (and two forged disks)."""
    from xsession.install import targets
    tb = testbed(machine)
    tb.set_attribute(DESKTOP_SDB, "size", "15633408")  # the stick holding the live medium: 8 GB
    tb.add_from_string(SMALL_AND_BUSY)
    mountinfo = (HERE / machine / "mountinfo").read_text() + "41 28 8:49 / /home rw - ext4 /dev/sdd1 rw\n"
    profile = hardware.detect(pyudev.Context(), mountinfo=mountinfo, proc=HERE / machine)
    needed = 512 * 2**20
    found = targets.disks(pyudev.Context(), mountinfo=mountinfo, swaps="Filename\tType\tSize\n")
    refusals = {}
    for disk in found:
        why = targets.refusal(disk, profile.medium, needed)
        refusals[disk.device] = None if why is None else {"error": type(why).__name__, "dbus": why.dbus_name,
                                                           "message": str(why)}
    offered = [d.device for d in targets.candidates(pyudev.Context(), profile.medium, needed, mountinfo=mountinfo,
                                                    swaps="")]
    return {"medium": profile.medium.device if profile.medium else None, "refusals": refusals,
            "offered": offered, "sizes": {d.device: d.size for d in found}}


def main(argv: list[str]) -> int:
    if "umockdev" not in os.environ.get("LD_PRELOAD", ""):
        print("run me under umockdev-wrapper", file=sys.stderr)
        return 2
    what, *args = argv
    if what == "detect":
        result = detect(*args)
    elif what == "targets":
        result = install_targets(*args)
    elif what == "events" and args == ["desktop-usb"]:
        result = events_desktop()
    elif what == "events" and args == ["laptop-dvd"]:
        result = events_laptop()
    else:
        print(f"unknown scenario {argv}", file=sys.stderr)
        return 2
    json.dump(result, sys.stdout, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
