"""The office on D-Bus, with xsessiond as its own process on a private bus, polkitd, and
real demo guests whose lines travel their real channels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gi.repository import GLib

from xsession.bus import introspection_xml
from xsession.office.dbus import OFFICE_IFACE, OFFICE_PATH

from .buslib import (BUS_NAME, HELPER_USER, MANAGER_PATH, NOBODY, REPO, Signals, busctl, ctl, gdbus,
                     interface_members)
from .guestlib import Speaker, until, with_office

ERROR = "org.xenubuntu.Sessions1.Error."
OFFICE_SESSIONS = ("server", "kubuntu", "ubuntu")


def _office(client) -> dict:
    return client.call(OFFICE_PATH, "org.freedesktop.DBus.Properties", "GetAll",
                       GLib.Variant("(s)", (OFFICE_IFACE,)))[0]


def _speaker(client, name: str) -> Speaker:
    return Speaker(client.session(name)["Console"]["serial"], lambda: client.session(name)["Heartbeat"]["seq"],
                   name).connect()


def test_the_office_over_the_bus_from_start_to_reset(polkitd, xsessiond, client, medium: Path):
    daemon = xsessiond(medium_path=with_office(medium, "server", ["kubuntu", "ubuntu"]))
    objects = client.call(MANAGER_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")[0]
    office = objects[OFFICE_PATH][OFFICE_IFACE]
    assert office["State"] == "idle" and office["Started"] == 0.0
    assert office["Server"] == f"{MANAGER_PATH}/session/server"
    assert office["Desktops"] == [f"{MANAGER_PATH}/session/kubuntu", f"{MANAGER_PATH}/session/ubuntu"]
    assert office["Workers"] == {"kubuntu": ("", ""), "ubuntu": ("", "")}
    assert office["Counters"] == {"Saved": 0, "Added": 0, "Read": 0, "Seen": 0, "FirstRead": -1.0, "FirstSeen": -1.0}
    published = interface_members(client.call(OFFICE_PATH, "org.freedesktop.DBus.Introspectable", "Introspect")[0])
    assert published[OFFICE_IFACE] == interface_members(introspection_xml())[OFFICE_IFACE]

    # nobody may start, pause or reset it; reading is for everyone
    for method in ("Start", "Pause", "Reset"):
        refused = gdbus(polkitd, "call", "--dest", BUS_NAME, "--object-path", OFFICE_PATH, "--method",
                        f"{OFFICE_IFACE}.{method}", user=NOBODY)
        assert refused.returncode != 0 and f"{ERROR}NotAuthorized" in refused.stderr, (method, refused.stderr)
    assert busctl(polkitd, "get-property", BUS_NAME, OFFICE_PATH, OFFICE_IFACE, "State",
                  user=NOBODY).stdout.strip() == 's "idle"'
    assert set(client.states().values()) == {"available"}

    # a user who may manage sessions starts it: the server and both desktops run
    signals = Signals(polkitd)
    try:
        started = busctl(polkitd, "call", BUS_NAME, OFFICE_PATH, OFFICE_IFACE, "Start", user=HELPER_USER)
        assert started.returncode == 0, started.stderr
        assert client.prop(OFFICE_PATH, OFFICE_IFACE, "State") == "running"
        assert client.prop(OFFICE_PATH, OFFICE_IFACE, "Started") > 0
        for name in OFFICE_SESSIONS:
            client.wait_state(name, {"running"})
        assert client.state("xubuntu") == "available"
        guests = {n: _speaker(client, n) for n in OFFICE_SESSIONS}
        kubuntu, ubuntu = guests["kubuntu"], guests["ubuntu"]

        # "office start" reaches the desktop's worker, and is said until it acknowledges
        until(lambda: "xenubuntu1 office start" in kubuntu.heard(), 30, "office start inside kubuntu")
        kubuntu.say("xenubuntu1 office state running")
        signals.wait_for(OFFICE_PATH, "Workers", lambda w: w["kubuntu"] == ("running", ""), 30)

        # the desktops' reports become Activity signals (xsessionctl office watch shows them) and counters
        watch = subprocess.Popen([sys.executable, "-m", "xsession.ctl", "--address", polkitd, "office", "watch",
                                  "--count", "2", "--timeout", "60"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=REPO)
        assert watch.stderr is not None and "watching" in watch.stderr.readline()
        kubuntu.say("xenubuntu1 office saved alice-0001-3fa2c1")
        ubuntu.say("xenubuntu1 office read alice-0001-3fa2c1")
        out, _ = watch.communicate(timeout=60)
        assert watch.returncode == 0, out
        lines = [ln.split()[1:] for ln in out.splitlines()]
        assert lines == [["kubuntu", "saved", "alice-0001-3fa2c1"], ["ubuntu", "read", "alice-0001-3fa2c1"]]
        signals.wait_for(OFFICE_PATH, "Counters", lambda c: c["Read"] == 1, 30)
        counters = client.prop(OFFICE_PATH, OFFICE_IFACE, "Counters")
        assert counters["Saved"] == 1 and counters["Read"] == 1 and counters["Seen"] == 0
        assert 0 <= counters["FirstRead"] < 120 and counters["FirstSeen"] == -1.0
        activity = client.call(OFFICE_PATH, OFFICE_IFACE, "ListActivity")[0]
        assert [(s.rsplit("/", 1)[1], k, i) for _, s, k, i in activity] == [
            ("kubuntu", "saved", "alice-0001-3fa2c1"), ("ubuntu", "read", "alice-0001-3fa2c1")]

        # the server is no desktop: its office line is refused and changes nothing
        guests["server"].say("xenubuntu1 office saved carol-0001")
        guests["server"].heartbeat()
        until(lambda: "an office message from server" in daemon.log_text(), 30, "the refusal in the log")
        assert client.prop(OFFICE_PATH, OFFICE_IFACE, "Counters") == counters
        assert len(client.call(OFFICE_PATH, OFFICE_IFACE, "ListActivity")[0]) == 2

        status = ctl(polkitd, "office")
        assert status.returncode == 0, status.stderr
        assert "office: running" in status.stdout and "server: server" in status.stdout
        assert "kubuntu      worker running" in status.stdout and "ubuntu       worker unknown" in status.stdout
        assert "documents: 1 saved, 1 read by another desktop" in status.stdout, status.stdout

        paused = ctl(polkitd, "office", "pause")
        assert paused.returncode == 0 and client.prop(OFFICE_PATH, OFFICE_IFACE, "State") == "paused"
        ubuntu.heartbeat()
        until(lambda: "xenubuntu1 office pause" in ubuntu.heard(), 30, "office pause inside ubuntu")

        # reset: every session of the office restored afresh, the counters zero
        changes = {n: client.session(n)["LastChange"] for n in OFFICE_SESSIONS}
        reset = ctl(polkitd, "office", "reset")
        assert reset.returncode == 0, reset.stderr
        office = _office(client)
        assert office["State"] == "idle" and office["Started"] == 0.0 and office["Counters"]["Saved"] == 0
        assert office["Workers"] == {"kubuntu": ("", ""), "ubuntu": ("", "")}
        assert client.call(OFFICE_PATH, OFFICE_IFACE, "ListActivity")[0] == []
        for name in OFFICE_SESSIONS:
            client.wait_state(name, {"running"})
            assert client.session(name)["LastChange"] > changes[name]
        signals.wait_for(OFFICE_PATH, "State", "idle", 10)
    finally:
        signals.close()


def test_a_medium_without_an_office_says_so(private_bus, xsessiond, client):
    xsessiond()
    objects = client.call(MANAGER_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")[0]
    assert OFFICE_PATH not in objects
    assert client.prop(OFFICE_PATH, OFFICE_IFACE, "State") == "absent"
    for method in ("Start", "Pause", "Reset"):
        assert client.error(OFFICE_PATH, OFFICE_IFACE, method) == f"{ERROR}NoOffice"
    status = ctl(private_bus, "office")
    assert status.returncode == 1 and "absent" in status.stdout
    start = ctl(private_bus, "office", "start")
    assert start.returncode == 1 and start.stderr.startswith("xsessionctl: office start: this medium has no office")
    assert set(client.states().values()) == {"available"}
