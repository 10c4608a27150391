"""Hardware detection and the udev monitor against umockdev testbeds.

The real pyudev code runs inside ``umockdev-wrapper`` (``udev_scenarios.py``),
with hand-written device descriptions of three machines in ``umockdev/``:

- laptop-dvd: 2 GiB, 2 CPUs, booted from an ATA DVD drive (sr0), Wi-Fi, no KVM;
- desktop-usb: 8 GiB, 4 CPUs, booted from a USB 2 stick, two Ethernet NICs, KVM;
- workstation-nvme: 32 GiB, 16 CPUs, booted from an NVMe partition, one NIC
  plus virtual ones, two graphics cards, KVM.

The parsers of /proc text are plain functions and run here directly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from xsession import hardware
from xsession.hardware import find_mount, parse_meminfo, parse_mountinfo

HERE = Path(__file__).resolve().parent
WRAPPER = shutil.which("umockdev-wrapper")


def scenario(*args: str) -> Any:
    """Run one scenario under umockdev-wrapper; its JSON output."""
    assert WRAPPER, "umockdev-wrapper is missing: tools/setup installs the umockdev package"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([WRAPPER, sys.executable, str(HERE / "udev_scenarios.py"), *args],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, f"scenario {args} failed ({proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def laptop() -> Any:
    return scenario("detect", "laptop-dvd")


@pytest.fixture(scope="module")
def desktop() -> Any:
    return scenario("detect", "desktop-usb")


@pytest.fixture(scope="module")
def workstation() -> Any:
    return scenario("detect", "workstation-nvme")


# --- detection ---------------------------------------------------------------------

def test_laptop_boots_from_a_dvd(laptop: Any) -> None:
    p = laptop["profile"]
    assert (p["memory_total_mib"], p["memory_available_mib"], p["memory_source"]) == (1966, 1716, "meminfo")
    assert p["cpus"] == 2
    m = laptop["medium"]
    assert m["kind"] == "optical" and m["speed"] == "slow" and m["seek_bound"]
    assert m["device"] == "/dev/sr0" and m["partition"] == ""
    assert m["bus"] == "ata" and m["rotational"] is True
    assert m["model"] == "MATSHITA DVD-RAM UJ8E2"
    assert m["fs_uuid"] == "2026-11-01-12-00-00-00" and m["path"] == "/cdrom"
    assert [n["name"] for n in p["nics"]] == ["wlp3s0"]  # lo is no NIC of the machine
    assert p["nics"][0]["driver"] == "iwlwifi" and p["nics"][0]["mac"] == "8c:70:5a:1e:44:90"
    assert p["virtualization"] == {"kvm": False, "xen_dom0": False}
    assert laptop["as_dict"]["connected_outputs"] == ["card0-eDP-1"]
    assert p["displays"][0]["driver"] == "i915"  # renderD128 is not a card


def test_desktop_boots_from_a_usb2_stick_with_two_nics(desktop: Any) -> None:
    p = desktop["profile"]
    assert (p["memory_total_mib"], p["cpus"]) == (7857, 4)
    m = desktop["medium"]
    # the stick claims to rotate, as many do: the bus decides, and USB 2 is slow
    assert m["kind"] == "usb" and m["usb_speed_mbps"] == 480 and m["rotational"] is True
    assert m["speed"] == "slow"
    assert (m["device"], m["partition"]) == ("/dev/sdb", "/dev/sdb1")
    assert m["model"] == "Cruzer Blade" and m["fs_type"] == "iso9660"
    assert [(n["name"], n["driver"]) for n in p["nics"]] == [("enp3s0", "r8169"), ("enp4s0", "e1000e")]
    assert p["virtualization"]["kvm"] is True
    assert desktop["as_dict"]["nics"] == ["enp3s0 r8169 4c:cc:6a:0b:12:7e", "enp4s0 e1000e 00:1b:21:3a:9f:c4"]


def test_workstation_boots_from_nvme(workstation: Any) -> None:
    p = workstation["profile"]
    assert (p["memory_total_mib"], p["cpus"]) == (32034, 16)
    m = workstation["medium"]
    assert m["path"] == "/run/live/medium"  # live-boot's place, the second default
    assert (m["kind"], m["bus"], m["speed"], m["rotational"]) == ("disk", "nvme", "fast", False)
    assert (m["device"], m["partition"]) == ("/dev/nvme0n1", "/dev/nvme0n1p3")
    assert m["model"] == "Samsung SSD 970 EVO Plus 1TB"
    assert [n["name"] for n in p["nics"]] == ["eno1"]  # not xenbr0, tap0, lo
    cards = {c["name"]: c for c in p["displays"]}
    assert sorted(cards) == ["card0", "card1"] and cards["card1"]["driver"] == "ast"
    assert workstation["as_dict"]["connected_outputs"] == ["card0-DP-1", "card0-DP-2"]


@pytest.mark.parametrize("fixture", ["laptop", "desktop", "workstation"])
def test_as_dict_holds_plain_values(fixture: str, request: pytest.FixtureRequest) -> None:
    result = request.getfixturevalue(fixture)
    for d in (result["as_dict"], result["medium"]):
        for key, value in d.items():
            assert isinstance(value, (str, int, bool, list)), key
            if isinstance(value, list):
                assert all(isinstance(v, str) for v in value), key


def test_usb3_stick_is_fast() -> None:
    m = scenario("detect", "desktop-usb", "usb3")["medium"]
    assert (m["kind"], m["usb_speed_mbps"], m["speed"], m["device"]) == ("usb", 5000, "fast", "/dev/sdc")


def test_on_xen_the_hypervisor_gives_the_memory() -> None:
    r = scenario("detect", "desktop-usb", "xen")
    p = r["profile"]
    assert (p["memory_total_mib"], p["memory_available_mib"], p["memory_source"]) == (8191, 6000, "hypervisor")
    assert p["virtualization"]["xen_dom0"] is True


def test_a_missing_medium_is_a_warning() -> None:
    r = scenario("detect", "laptop-dvd", "unmounted")
    assert r["medium"] is None
    assert r["as_dict"]["medium_kind"] == ""
    assert any("not mounted" in w for w in r["profile"]["warnings"])


# --- events ------------------------------------------------------------------------

def test_desktop_events_nic_memory_and_stick() -> None:
    r = scenario("events", "desktop-usb")
    assert not r["timed_out"]
    assert [e["type"] for e in r["events"]] == [
        "NicAdded", "NicRemoved", "MemoryAdded", "MediumEjected", "MediumChanged"]
    nic_added, nic_removed, memory, ejected, back = r["events"]
    assert (nic_added["nic"]["name"], nic_added["nic"]["driver"]) == ("enx00e04c680001", "r8152")
    assert nic_removed["name"] == "enp4s0"
    assert (memory["block"], memory["size_mib"]) == ("memory2", 128)
    assert (ejected["device"], ejected["reason"]) == ("/dev/sdb1", "removed")
    assert back["same"] is True and back["fs_uuid"] == "2026-11-01-12-00-00-00"
    assert r["present"] is True


def test_laptop_events_eject_and_discs() -> None:
    r = scenario("events", "laptop-dvd")
    assert not r["timed_out"]
    assert [(e["type"], e.get("same"), e.get("reason")) for e in r["events"]] == [
        ("MediumEjected", None, "eject requested"),
        ("MediumChanged", False, None),   # someone else's disc
        ("MediumChanged", True, None),    # ours again: retry waiting restores
    ]
    assert r["events"][1]["fs_label"] == "Ubuntu_19.10"
    assert r["present"] is True


# --- pure parsers ------------------------------------------------------------------

def test_mountinfo_resolves_the_medium_mount() -> None:
    text = (HERE / "umockdev" / "desktop-usb" / "mountinfo").read_text()
    text += r"41 27 8:49 / /media/my\040stick rw - vfat /dev/sdd1 rw" + "\n"
    mounts = parse_mountinfo(text + "garbage line\n")
    m = find_mount(mounts, "/cdrom")
    assert m is not None and (m.major, m.minor, m.fs_type, m.source) == (8, 17, "iso9660", "/dev/sdb1")
    assert find_mount(mounts, "/cdrom/casper/filesystem.squashfs") == m
    assert find_mount(mounts, "/media/my stick").source == "/dev/sdd1"  # type: ignore[union-attr]
    assert find_mount(mounts, "/home").mount_point == "/"  # type: ignore[union-attr]


def test_a_later_mount_on_the_same_point_wins() -> None:
    text = ("27 28 11:0 / /cdrom ro - iso9660 /dev/sr0 ro\n"
            "40 28 0:50 / /cdrom ro - tmpfs tmpfs ro\n")
    assert find_mount(parse_mountinfo(text), "/cdrom").fs_type == "tmpfs"  # type: ignore[union-attr]


def test_meminfo() -> None:
    assert parse_meminfo((HERE / "umockdev" / "workstation-nvme" / "meminfo").read_text()) == (32034, 31261)
    # before Linux 3.14: no MemAvailable
    assert parse_meminfo("MemTotal: 2048000 kB\nMemFree: 1024000 kB\nBuffers: 0 kB\nCached: 102400 kB\n") \
        == (2000, 1100)
    with pytest.raises(ValueError):
        parse_meminfo("MemFree: 1 kB\n")


def test_unreadable_meminfo_fails(tmp_path: Path) -> None:
    with pytest.raises(hardware.Failed, match="meminfo"):
        hardware.detect(proc=tmp_path, mountinfo="")


def test_read_speed_classes() -> None:
    s = hardware._speed_of
    assert s("optical", True, None) == "slow"
    assert s("usb", True, 480) == "slow" and s("usb", False, 12) == "slow" and s("usb", False, 5000) == "fast"
    assert s("usb", None, None) == "slow"  # unknown link speed: assume the worst
    assert s("disk", True, None) == "slow" and s("disk", False, None) == "fast"
    assert s("ram", None, None) == "fast"


# --- install targets -----------------------------------------------------------------

def test_install_targets_on_a_recorded_machine_never_the_medium_a_busy_or_a_small_disk():
    """The desktop booted from a USB stick (recorded), plus three forged disks: only the
    internal SSD is offered; each other disk has its named refusal, with numbers."""
    result = scenario("targets", "desktop-usb")
    assert result["medium"] == "/dev/sdb"
    assert result["offered"] == ["/dev/sda"] and result["refusals"]["/dev/sda"] is None
    assert result["sizes"]["/dev/sda"] == 976773168 * 512
    refusals = result["refusals"]
    assert refusals["/dev/sdb"]["dbus"] == "TargetIsLiveMedium" and "/cdrom" in refusals["/dev/sdb"]["message"]
    assert refusals["/dev/sdc"]["dbus"] == "TargetTooSmall"
    assert "64 MiB" in refusals["/dev/sdc"]["message"] and "512 MiB" in refusals["/dev/sdc"]["message"]
    assert refusals["/dev/sdd"]["dbus"] == "TargetInUse" and "/dev/sdd1" in refusals["/dev/sdd"]["message"]
    assert refusals["/dev/sde"]["dbus"] == "TargetInUse" and "dm-0" in refusals["/dev/sde"]["message"]
