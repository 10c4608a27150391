"""The files in units/, checked by the programs that will read them at boot.

systemd-analyze verifies the service inside a throw-away root (so the host's
/usr and /etc stay untouched) and rates its sandbox; a private dbus-daemon with
the system bus's own default policy loads our bus policy and activation file
and is called as root and as an unprivileged user; xmllint validates the
polkit actions against polkit's DTD; systemd-tmpfiles creates the runtime
folder in a throw-away root; desktop-file-validate checks the X session entry.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from xsession import privatebus

UNITS = Path(__file__).resolve().parent.parent / "units"
SERVICE = UNITS / "xsessiond.service"
BUS_NAME = "org.xenubuntu.Sessions1"
MANAGER_PATH = "/org/xenubuntu/Sessions1"
MANAGER_IFACE = "org.xenubuntu.Sessions1.Manager"
MAX_EXPOSURE = 5.0


def run(*cmd: str | os.PathLike[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload]


def service_settings() -> dict[str, list[str]]:
    """Every ``Section.Key`` of the service with all its values (systemd adds up repeated keys)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in SERVICE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root that holds systemd's stock units, our unit and the programs it runs."""
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(SERVICE, root / "etc/systemd/system" / SERVICE.name)
    (root / "usr/libexec").mkdir(parents=True)
    daemon = root / "usr/libexec/xsessiond"
    daemon.write_text("#!/bin/sh\n")
    daemon.chmod(0o755)
    (root / "bin").mkdir()
    shutil.copy("/bin/sh", root / "bin/sh")
    return root


def test_service_verifies_without_any_message(unit_root: Path) -> None:
    result = run("systemd-analyze", "verify", f"--root={unit_root}", SERVICE.name)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""


def test_verify_would_catch_a_mistake(unit_root: Path) -> None:
    """The check above is only worth something if verify does complain."""
    broken = unit_root / "etc/systemd/system" / SERVICE.name
    broken.write_text(SERVICE.read_text().replace("Type=notify", "Type=notify\nKillMod=process"))
    (unit_root / "usr/libexec/xsessiond").unlink()
    result = run("systemd-analyze", "verify", f"--root={unit_root}", SERVICE.name)
    assert "KillMod" in result.stderr and "/usr/libexec/xsessiond" in result.stderr


def test_exposure_score() -> None:
    result = run("systemd-analyze", "security", "--offline=true", "--no-pager", SERVICE)
    assert result.returncode == 0, result.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert m, result.stdout[-500:]
    assert float(m.group(1)) <= MAX_EXPOSURE


def test_service_shape() -> None:
    unit = service_settings()
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.BusName"] == [BUS_NAME]
    assert unit["Service.ExecStart"] == ["/usr/libexec/xsessiond"]
    assert unit["Service.KillMode"] == ["process"]
    after = " ".join(unit["Unit.After"]).split()
    for dep in ("xenstored.service", "xenconsoled.service", "xen-init-dom0.service", "cdrom.mount",
                "run-live-medium.mount"):
        assert dep in after
    assert "control_d /proc/xen/capabilities" in unit["Service.ExecCondition"][0]
    assert "/run/xenubuntu" in unit["Service.ReadWritePaths"][0].split()
    assert "/dev/kvm rw" in unit["Service.DeviceAllow"] and "/dev/xen/privcmd rw" in unit["Service.DeviceAllow"]
    assert not any(key.startswith("Install.") for key in unit)  # the generator decides, not `systemctl enable`


@pytest.mark.parametrize(("capabilities", "runs"), [
    (None, True),              # plain KVM host: no Xen at all
    ("control_d\n", True),     # Xen's control domain
    ("", False),               # a Xen guest
])
def test_dom0_guard(tmp_path: Path, capabilities: str | None, runs: bool) -> None:
    """The ExecCondition= command, run as systemd would, against a stand-in /proc/xen."""
    condition = service_settings()["Service.ExecCondition"][0]
    caps = tmp_path / "capabilities"
    if capabilities is not None:
        caps.write_text(capabilities)
    argv = ["/bin/sh", "-c", condition.split("'")[1].replace("/proc/xen/capabilities", str(caps))]
    assert (subprocess.run(argv).returncode == 0) is runs


def test_tmpfiles_make_the_runtime_folder(tmp_path: Path) -> None:
    (tmp_path / "usr/lib/tmpfiles.d").mkdir(parents=True)
    shutil.copy(UNITS / "tmpfiles.d/xenubuntu.conf", tmp_path / "usr/lib/tmpfiles.d/xenubuntu.conf")
    result = run("systemd-tmpfiles", "--create", f"--root={tmp_path}")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    made = tmp_path / "run/xenubuntu"
    assert made.is_dir() and oct(made.stat().st_mode & 0o7777) == "0o755" and made.stat().st_uid == 0


def test_polkit_actions_validate_against_polkits_dtd() -> None:
    policy = UNITS / "org.xenubuntu.sessions1.policy"
    result = run("xmllint", "--noout", "--dtdvalid", "/usr/share/polkit-1/policyconfig-1.dtd", policy)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    defaults = {a.get("id"): {d.tag: d.text for d in a.find("defaults")}  # type: ignore[union-attr]
                for a in ET.parse(policy).getroot().iter("action")}
    assert defaults == {
        "org.xenubuntu.sessions1.manage":
            {"allow_any": "auth_admin", "allow_inactive": "auth_admin_keep", "allow_active": "yes"},
        "org.xenubuntu.sessions1.administer":
            {"allow_any": "auth_admin", "allow_inactive": "auth_admin", "allow_active": "auth_admin"},
    }


def test_desktop_entry_validates() -> None:
    entry = UNITS / "xenubuntu.desktop"
    result = run("desktop-file-validate", entry)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stdout
    ini = configparser.ConfigParser(interpolation=None)
    ini.optionxform = str  # type: ignore[assignment,method-assign]
    ini.read(entry)
    assert ini["Desktop Entry"]["Exec"].split()[0] == "xsession-gui"


# --- the bus policy and activation, on a private system-like bus ---------------

OWNER = textwrap.dedent("""
    import sys
    from gi.repository import Gio, GLib
    XML = '''<node><interface name="org.xenubuntu.Sessions1.Manager">
      <method name="ListSessions"><arg type="a(ssso)" direction="out"/></method>
      <method name="SetDefault"><arg type="s" direction="in"/></method>
      <property name="Version" type="s" access="read"/>
    </interface></node>'''
    bus = Gio.DBusConnection.new_for_address_sync(
        sys.argv[1], Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
        | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
    def call(conn, sender, path, iface, method, params, inv):
        if method == "ListSessions":
            inv.return_value(GLib.Variant("(a(ssso))", ([("ubuntu", "Ubuntu", "running", "/x")],)))
        else:
            inv.return_value(None)
    def prop(conn, sender, path, iface, name):
        return GLib.Variant("s", "1")
    bus.register_object("/org/xenubuntu/Sessions1", Gio.DBusNodeInfo.new_for_xml(XML).interfaces[0],
                        call, prop, None)
    reply = bus.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                          "RequestName", GLib.Variant("(su)", (sys.argv[2], 4)), None, 0, -1, None)
    print(reply.unpack()[0], flush=True)
    GLib.MainLoop().run()
""")


def system_like_config(tmp_path: Path) -> Path:
    """The system-like bus, with our activation file in its service folder."""
    services = tmp_path / "system-services"
    services.mkdir()
    shutil.copy(UNITS / f"{BUS_NAME}.service", services)
    return privatebus.system_like_config(tmp_path, listen="unix:tmpdir=/tmp", servicedirs=(services,))


@pytest.fixture
def system_bus(tmp_path: Path) -> Iterator[str]:
    config = system_like_config(tmp_path)
    bus = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert bus.stdout is not None
    address = bus.stdout.readline().strip()
    try:
        assert address, bus.stderr.read() if bus.stderr else ""
        yield address
    finally:
        bus.terminate()
        bus.wait(10)


def as_nobody(*cmd: str) -> list[str]:
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]


def own(address: str, user_cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(user_cmd + [sys.executable, "-c", OWNER, address, BUS_NAME],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def busctl(address: str, *args: str, user: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = ["busctl", f"--address={address}", "--timeout=5", *args]
    return run(*(as_nobody(*cmd) if user else cmd))


def test_activation_file_is_read_by_the_bus(system_bus: str) -> None:
    ini = configparser.ConfigParser(interpolation=None)
    ini.optionxform = str  # type: ignore[assignment,method-assign]
    ini.read(UNITS / f"{BUS_NAME}.service")
    assert ini["D-BUS Service"]["SystemdService"] == SERVICE.name
    names = busctl(system_bus, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                   "org.freedesktop.DBus", "ListActivatableNames")
    assert names.returncode == 0, names.stderr
    assert f'"{BUS_NAME}"' in names.stdout


def test_only_root_owns_the_name(system_bus: str) -> None:
    intruder = own(system_bus, as_nobody())
    _, err = intruder.communicate(timeout=30)
    assert intruder.returncode != 0 and "AccessDenied" in err

    owner = own(system_bus, [])
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline().strip() == "1"  # primary owner
    finally:
        owner.terminate()
        owner.wait(10)


def test_anyone_may_call_and_read(system_bus: str) -> None:
    owner = own(system_bus, [])
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "1"
        for user in (False, True):
            listed = busctl(system_bus, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListSessions", user=user)
            assert listed.returncode == 0 and "ubuntu" in listed.stdout, listed.stderr
            version = busctl(system_bus, "get-property", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "Version",
                             user=user)
            assert version.returncode == 0 and '"1"' in version.stdout, version.stderr
            intro = busctl(system_bus, "introspect", BUS_NAME, MANAGER_PATH, user=user)
            assert intro.returncode == 0 and "ListSessions" in intro.stdout, intro.stderr
            # a mutating method reaches the daemon, which asks polkit
            changed = busctl(system_bus, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "SetDefault", "s",
                             "kubuntu", user=user)
            assert changed.returncode == 0, changed.stderr
        # anything else on the name stays closed to an unprivileged caller
        other = busctl(system_bus, "call", BUS_NAME, MANAGER_PATH, "org.example.Other", "Poke", user=True)
        assert other.returncode != 0 and "denied" in other.stderr.lower()
    finally:
        owner.terminate()
        owner.wait(10)
