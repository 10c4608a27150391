"""xsessiond on a private system-like bus, for real: its own process, real QEMU guests,
the real polkitd, and clients we did not write (busctl, gdbus) as other processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from gi.repository import GLib

from xsession.bus import introspection_xml
from xsession.install.dbus import JOB_IFACE

from .buslib import (BUS_NAME, ERROR, HELPER_USER, MANAGER_IFACE, MANAGER_PATH, NOBODY, SESSION_IFACE, Signals,
                     busctl, ctl, gdbus, interface_members)
from .guestlib import ask, qemu_pids_under, session_qemu_pid

KUBUNTU = f"{MANAGER_PATH}/session/kubuntu"
UBUNTU = f"{MANAGER_PATH}/session/ubuntu"


def test_ready_and_what_busctl_and_gdbus_see(private_bus, xsessiond, client):
    daemon = xsessiond("xenubuntu.restore=off xenubuntu.flavour=ubuntu")
    assert any(n.startswith("STATUS=0 of 4 sessions running") for n in daemon.notes), daemon.notes

    # introspection: exactly the interfaces of the installed XML file
    published = interface_members(client.call(MANAGER_PATH, "org.freedesktop.DBus.Introspectable", "Introspect")[0])
    published.update(interface_members(client.call(KUBUNTU, "org.freedesktop.DBus.Introspectable", "Introspect")[0]))
    # the office answers even on a medium without one (State "absent"; test_office_bus.py)
    published.update(interface_members(client.call(f"{MANAGER_PATH}/office", "org.freedesktop.DBus.Introspectable",
                                                   "Introspect")[0]))
    for iface, members in interface_members(introspection_xml()).items():
        if iface == JOB_IFACE:
            continue  # published for each install job: test_install_e2e looks at one
        assert published[iface] == members, iface

    intro = busctl(private_bus, "introspect", BUS_NAME, KUBUNTU)
    assert intro.returncode == 0, intro.stderr
    for member in (".Activate", ".Pause", ".Reset", ".State", ".Console", ".Progress"):
        assert member in intro.stdout
    tree = busctl(private_bus, "tree", BUS_NAME)
    assert all(f"{MANAGER_PATH}/session/{n}" in tree.stdout for n in ("kubuntu", "ubuntu", "xubuntu", "server"))

    got = busctl(private_bus, "get-property", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "DefaultFlavour",
                 "RestorePolicy", "Backend")
    assert got.stdout.split("\n")[:3] == ['s "ubuntu"', 's "off"', 's "qemu"'], got.stdout
    medium = gdbus(private_bus, "call", "--dest", BUS_NAME, "--object-path", MANAGER_PATH, "--method",
                   "org.freedesktop.DBus.Properties.Get", MANAGER_IFACE, "Medium")
    assert "'available': <true>" in medium.stdout, medium.stdout + medium.stderr
    objects = gdbus(private_bus, "call", "--dest", BUS_NAME, "--object-path", MANAGER_PATH, "--method",
                    "org.freedesktop.DBus.ObjectManager.GetManagedObjects")
    assert objects.stdout.count("'org.xenubuntu.Sessions1.Session'") == 4, objects.stdout
    assert "'State': <'available'>" in objects.stdout

    # a method call from busctl, the result seen by gdbus
    listed = busctl(private_bus, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "GetSession", "s", "server")
    assert listed.stdout.strip() == f'o "{MANAGER_PATH}/session/server"'
    memory = client.prop(MANAGER_PATH, MANAGER_IFACE, "Memory")
    assert memory["total_mib"] > 0 and memory["committed_mib"] == 0 and memory["reserve_mib"] > 0


def _read_until(proc: subprocess.Popen, done, timeout: float) -> list[str]:
    """Lines of a running process's output up to the first for which ``done`` holds."""
    import queue
    import threading
    assert proc.stdout is not None
    lines = getattr(proc, "_lines", None)
    if lines is None:  # one reader thread per process; it ends with the process's output
        lines = proc._lines = queue.Queue()  # type: ignore[attr-defined]
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"not seen within {timeout} s; got {seen[-5:]}") from None
        seen.append(line.rstrip("\n"))
        if done(line):
            return seen


def test_activate_is_announced_to_a_monitor(private_bus, xsessiond, client):
    xsessiond()
    monitor = subprocess.Popen(["gdbus", "monitor", "--address", private_bus, "--dest", BUS_NAME],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        # gdbus monitor says who owns the name once its match rules are in place
        lines += _read_until(monitor, lambda line: "is owned by" in line, timeout=20)
        started = time.monotonic()
        reply = busctl(private_bus, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "Activate", "sa{sv}",
                       "ubuntu", "0")
        assert reply.stdout.strip() == f'o "{UBUNTU}"', reply.stderr
        client.wait_state("ubuntu", {"running"})
        elapsed = time.monotonic() - started
        lines += _read_until(monitor, lambda line: line.startswith(UBUNTU) and "'State': <'running'>" in line,
                             timeout=20)
    finally:
        monitor.terminate()
        monitor.wait(timeout=10)
    out = "\n".join(lines) + "\n"
    ubuntu = [line for line in out.splitlines() if line.startswith(UBUNTU) and "PropertiesChanged" in line]
    states = [m.group(1) for line in ubuntu for m in [re.search(r"'State': <'(\w+)'>", line)] if m]
    assert states == ["queued", "restoring", "running"], ubuntu
    assert any("'Progress': <" in line for line in ubuntu)
    # one signal per state; progress alone comes at most ten times a second
    assert len(ubuntu) <= elapsed / 0.1 + 4, (elapsed, ubuntu)
    manager = [line for line in out.splitlines() if line.startswith(f"{MANAGER_PATH}: ")
               and "PropertiesChanged" in line]
    assert any("'Memory'" in line for line in manager), "the memory plan follows the sessions"


def test_each_state_change_is_one_properties_changed_with_its_values(private_bus, xsessiond, client):
    """Every state a session goes through reaches the bus in its own PropertiesChanged, in
    order, carrying that change's values; progress never comes after the state that ended it;
    and the signals replayed over the first reading give what a reading gives afterwards."""
    xsessiond()
    signals = Signals(private_bus)
    try:
        before = client.session("ubuntu")
        assert before["State"] == "available"
        client.activate("ubuntu")
        signals.wait_for(UBUNTU, "State", "running")
        running = client.session("ubuntu")
        client.call(UBUNTU, SESSION_IFACE, "Pause")
        client.call(UBUNTU, SESSION_IFACE, "Resume")
        client.call(UBUNTU, SESSION_IFACE, "Stop")
        signals.wait_for(UBUNTU, "State", "stopped")
        after = client.session("ubuntu")
        signals.wait_for(MANAGER_PATH, "Memory", lambda memory: memory["running_mib"] == 0)
    finally:
        signals.close()
    # the manager's memory plan follows the session's states
    assert any(c["Memory"]["running_mib"] > 0 for c in signals.of(MANAGER_PATH) if "Memory" in c)
    got = signals.of(UBUNTU)
    with_state = [changed for changed in got if "State" in changed]
    assert [c["State"] for c in with_state] == ["queued", "restoring", "running", "paused", "running",
                                                "stopped"], got
    # a change of state carries its reason and its time, each one later than the one before
    assert all({"StateReason", "LastChange"} <= c.keys() for c in with_state), with_state
    times = [c["LastChange"] for c in with_state]
    assert times == sorted(times) and len(set(times)) == len(times), times
    assert [c["StateReason"] for c in with_state][:3] == ["requested", "reading the statefile",
                                                          "restored from its statefile"]
    # the signal that says running carries the values a reading gives while it runs
    first_running = got.index(with_state[2])
    for key, value in with_state[2].items():
        assert running[key] == value, key
    assert running["Progress"] == 1.0 and running["BytesDone"] == running["BytesTotal"] > 0
    assert "vnc" in with_state[2]["Console"]
    # between restoring and running only progress, never going back; none after running
    restoring = got.index(with_state[1])
    progress = got[restoring + 1:first_running]
    assert all(c.keys() <= {"Progress", "BytesDone", "BytesTotal"} for c in progress), progress
    done = [c["BytesDone"] for c in progress if "BytesDone" in c]
    assert done == sorted(done) and all(d <= running["BytesTotal"] for d in done), done
    assert all("Progress" not in c for c in got[first_running + 1:] if "State" not in c)
    # the signals are all a front-end needs: replayed over the first reading, they give the last
    replayed = dict(before)
    for changed in got:
        replayed.update(changed)
    assert replayed == after
    assert after["State"] == "stopped" and after["Console"] == {}


def test_an_unprivileged_caller_reads_but_every_change_is_refused(polkitd, xsessiond, client):
    xsessiond()
    client.activate("kubuntu")
    client.wait_state("kubuntu", {"running"})
    before = client.states()
    default = client.prop(MANAGER_PATH, MANAGER_IFACE, "DefaultFlavour")

    # reading is for everyone
    assert busctl(polkitd, "get-property", BUS_NAME, KUBUNTU, SESSION_IFACE, "State",
                  user=NOBODY).stdout.strip() == 's "running"'
    listed = busctl(polkitd, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListSessions", user=NOBODY)
    assert listed.returncode == 0 and '"kubuntu"' in listed.stdout

    calls = [
        (MANAGER_PATH, MANAGER_IFACE, "Activate", "sa{sv}", "ubuntu", "0"),
        (MANAGER_PATH, MANAGER_IFACE, "SetDefault", "s", "server"),
        (UBUNTU, SESSION_IFACE, "Activate"),
        (KUBUNTU, SESSION_IFACE, "Pause"),
        (KUBUNTU, SESSION_IFACE, "Resume"),
        (KUBUNTU, SESSION_IFACE, "Stop"),
        (KUBUNTU, SESSION_IFACE, "Reset"),
    ]
    for path, iface, method, *args in calls:
        refused = gdbus(polkitd, "call", "--dest", BUS_NAME, "--object-path", path, "--method",
                        f"{iface}.{method}", *_gdbus_args(args), user=NOBODY)
        assert refused.returncode != 0, (method, refused.stdout)
        assert f"{ERROR}NotAuthorized" in refused.stderr, (method, refused.stderr)
    refused = ctl(polkitd, "stop", "kubuntu", user=NOBODY)
    assert refused.returncode == 1
    assert refused.stderr.startswith("xsessionctl: stop kubuntu: not authorized: "), refused.stderr
    assert client.states() == before
    assert client.prop(MANAGER_PATH, MANAGER_IFACE, "DefaultFlavour") == default
    assert len(qemu_pids_under(Path(client.session("kubuntu")["Console"]["serial"]).parents[2])) == 1

    # polkit's yes gets through: the test rule lets one user manage, not administer
    paused = busctl(polkitd, "call", BUS_NAME, KUBUNTU, SESSION_IFACE, "Pause", user=HELPER_USER)
    assert paused.returncode == 0, paused.stderr
    assert client.state("kubuntu") == "paused"
    admin = gdbus(polkitd, "call", "--dest", BUS_NAME, "--object-path", MANAGER_PATH, "--method",
                  f"{MANAGER_IFACE}.SetDefault", "server", user=HELPER_USER)
    assert f"{ERROR}NotAuthorized" in admin.stderr and "authenticate" in admin.stderr, admin.stderr


def _gdbus_args(args: list[str]) -> list[str]:
    """busctl-style (signature, values) to gdbus's GVariant text."""
    if not args:
        return []
    if args[0] == "sa{sv}":
        return [args[1], "@a{sv} {}"]
    return args[1:]


def test_bad_arguments_get_the_named_error_and_change_nothing(private_bus, xsessiond, client):
    xsessiond()
    client.activate("kubuntu")
    client.wait_state("kubuntu", {"running"})
    before = client.states()

    def activate(name: str, options: dict) -> str:
        return client.error(MANAGER_PATH, MANAGER_IFACE, "Activate", GLib.Variant("(sa{sv})", (name, options)))

    assert activate("debian", {}) == ERROR + "NoSuchFlavour"
    assert client.error(MANAGER_PATH, MANAGER_IFACE, "GetSession", GLib.Variant("(s)", ("debian",))) \
        == ERROR + "NoSuchFlavour"
    assert client.error(MANAGER_PATH, MANAGER_IFACE, "SetDefault", GLib.Variant("(s)", ("debian",))) \
        == ERROR + "NoSuchFlavour"
    assert activate("ubuntu", {"turbo": GLib.Variant("b", True)}) == "org.freedesktop.DBus.Error.InvalidArgs"
    assert activate("ubuntu", {"reset": GLib.Variant("i", 2)}) == "org.freedesktop.DBus.Error.InvalidArgs"
    assert activate("ubuntu", {"reset": GLib.Variant("s", "yes")}) == "org.freedesktop.DBus.Error.InvalidArgs"
    assert client.error(UBUNTU, SESSION_IFACE, "Pause") == ERROR + "InvalidState"
    assert client.error(UBUNTU, SESSION_IFACE, "Resume") == ERROR + "InvalidState"
    assert client.error(UBUNTU, SESSION_IFACE, "Stop") == ERROR + "InvalidState"
    assert client.error(KUBUNTU, SESSION_IFACE, "Resume") == ERROR + "InvalidState"
    # the wrong signature is refused by GDBus itself, before our code
    wrong = busctl(private_bus, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "Activate", "s", "ubuntu")
    assert wrong.returncode != 0
    time.sleep(0.3)
    assert client.states() == before


def test_a_missing_medium_still_gives_a_daemon_that_says_why(private_bus, xsessiond, client, tmp_path):
    empty = tmp_path / "no-medium"
    empty.mkdir()
    xsessiond(medium_path=empty)
    warnings = client.prop(MANAGER_PATH, MANAGER_IFACE, "Warnings")
    medium = client.prop(MANAGER_PATH, MANAGER_IFACE, "Medium")
    assert medium["available"] is False and "no XenUbuntu medium" in medium["error"]
    assert any("no XenUbuntu medium" in w for w in warnings)
    assert client.call(MANAGER_PATH, MANAGER_IFACE, "ListSessions")[0] == []
    assert client.error(MANAGER_PATH, MANAGER_IFACE, "Activate",
                        GLib.Variant("(sa{sv})", ("ubuntu", {}))) == ERROR + "MediumUnavailable"
    failed = ctl(private_bus, "activate", "ubuntu")
    assert failed.returncode == 1 and "the medium is unavailable" in failed.stderr


def test_a_broken_manifest_still_gives_a_daemon_that_says_why(xsessiond, client, medium):
    manifest = medium / "xenubuntu/manifest.yaml"
    text = manifest.read_text()
    manifest.unlink()  # a hard link: replace, never modify in place
    manifest.write_text(text.replace("memory_mib: 256", "memory_mib: lots", 1))
    xsessiond()
    medium_prop = client.prop(MANAGER_PATH, MANAGER_IFACE, "Medium")
    assert medium_prop["available"] is False and "memory_mib" in medium_prop["error"]
    assert client.error(MANAGER_PATH, MANAGER_IFACE, "GetSession", GLib.Variant("(s)", ("ubuntu",))) \
        == ERROR + "MediumUnavailable"


def test_guests_survive_the_daemon_and_are_adopted(xsessiond, client, runtime_dir):
    """SIGKILL while sessions run and one restores; a guest killed meanwhile is reported."""
    first = xsessiond(stop_guests=False)
    for name in ("kubuntu", "ubuntu", "server"):
        client.activate(name)
    for name in ("kubuntu", "ubuntu", "server"):
        client.wait_state(name, {"running"})
    counters = {n: int(ask(client.session(n)["Console"]["serial"], "PING before").rsplit("=", 1)[1])
                for n in ("kubuntu", "ubuntu")}

    # kill it while xubuntu restores: once its QEMU was started and is being fed
    client.activate("xubuntu")
    record = runtime_dir / "sessions/xubuntu/guest.json"
    deadline = time.monotonic() + 30
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    first.proc.send_signal(signal.SIGSTOP)
    cut_short = not (runtime_dir / "sessions/xubuntu/ran").exists()
    first.kill()
    # and while the manager is away, one guest dies
    server_pid = session_qemu_pid(runtime_dir, "server")
    os.kill(server_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{server_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = {n: session_qemu_pid(runtime_dir, n) for n in ("kubuntu", "ubuntu")}

    second = xsessiond(stop_guests=False)
    for name in ("kubuntu", "ubuntu"):
        view = client.session(name)
        assert view["State"] == "running" and view["StateReason"] == "adopted from the previous manager"
        answer = ask(view["Console"]["serial"], "PING after")
        assert f"flavour={name}" in answer and int(answer.rsplit("=", 1)[1]) >= counters[name]
        assert session_qemu_pid(runtime_dir, name) == pids[name]
    server = client.session("server")
    assert server["State"] == "failed"
    assert server["StateReason"] == "its hypervisor process ended while the manager was away"
    client.wait_state("xubuntu", {"running"})
    assert "flavour=xubuntu" in ask(client.session("xubuntu")["Console"]["serial"], "PING xubuntu")
    if cut_short:  # the half-fed guest was discarded and the restore done again
        assert "restoring again" in second.log_text()
    assert len(qemu_pids_under(runtime_dir)) == 3

    # SIGTERM too leaves the guests running, and a third daemon finds them
    assert second.terminate() == 0
    assert all(Path(f"/proc/{pid}").exists() for pid in pids.values())
    xsessiond()
    assert client.states() == {"kubuntu": "running", "ubuntu": "running", "xubuntu": "running",
                               "server": "failed"}
    # an adopted guest that dies: not our child, so no status, but a reason that says so
    os.kill(pids["ubuntu"], signal.SIGKILL)
    client.wait_state("ubuntu", {"failed"}, timeout=30)
    reason = client.session("ubuntu")["StateReason"]
    assert "adopted" in reason and "exit status is unknown" in reason, reason


def test_xsessionctl(private_bus, xsessiond, client):
    xsessiond("xenubuntu.restore=off xenubuntu.flavour=kubuntu")
    watch = subprocess.Popen([sys.executable, "-m", "xsession.ctl", "--address", private_bus, "watch",
                              "--timeout", "60"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert watch.stdout is not None
        watch.stdout.readline()  # the states as they were when it subscribed: it is listening
        listed = ctl(private_bus, "list")
        assert listed.returncode == 0
        assert re.search(r"^ubuntu\s+available\s+0%\s+256 MiB", listed.stdout, re.M), listed.stdout

        activated = ctl(private_bus, "activate", "ubuntu")
        assert activated.returncode == 0, activated.stderr
        assert "ubuntu: restoring" in activated.stdout and "ubuntu: running" in activated.stdout
        assert re.search(r"ubuntu: \[#+-*\]", activated.stdout), activated.stdout
        assert "vnc+unix://" in activated.stdout

        as_json = json.loads(ctl(private_bus, "--json", "list").stdout)
        assert [s["Name"] for s in as_json] == ["kubuntu", "ubuntu", "xubuntu", "server"]
        assert as_json[1]["State"] == "running" and as_json[1]["Progress"] == 1.0
        status = json.loads(ctl(private_bus, "status", "ubuntu", "--json").stdout)
        assert status["State"] == "running" and status["Console"]["vnc"].startswith("unix:")
        manager = json.loads(ctl(private_bus, "--json", "status").stdout)
        assert manager["DefaultFlavour"] == "kubuntu" and manager["RestorePolicy"] == "off"
        console = ctl(private_bus, "console", "ubuntu")
        assert console.returncode == 0 and console.stdout.startswith("vnc     unix:")
        assert json.loads(ctl(private_bus, "console", "ubuntu", "--json").stdout)["serial"].endswith("serial.sock")

        assert ctl(private_bus, "pause", "ubuntu").returncode == 0 and client.state("ubuntu") == "paused"
        again = ctl(private_bus, "pause", "ubuntu")
        assert again.returncode == 1
        assert again.stderr.strip() == ("xsessionctl: pause ubuntu: not possible in the session's state: "
                                        "cannot pause ubuntu while it is paused (allowed from: running)")
        assert ctl(private_bus, "resume", "ubuntu").returncode == 0 and client.state("ubuntu") == "running"
        assert ctl(private_bus, "set-default", "ubuntu").returncode == 0
        assert client.prop(MANAGER_PATH, MANAGER_IFACE, "DefaultFlavour") == "ubuntu"
        reset = ctl(private_bus, "reset", "ubuntu", "--quiet")
        assert reset.returncode == 0, reset.stderr
        assert client.state("ubuntu") == "running"
        assert ctl(private_bus, "stop", "ubuntu").returncode == 0 and client.state("ubuntu") == "stopped"
        gone = ctl(private_bus, "console", "ubuntu")
        assert gone.returncode == 1 and "not running" in gone.stdout

        unknown = ctl(private_bus, "activate", "debian")
        assert unknown.returncode == 1 and unknown.stdout == ""
        assert unknown.stderr.startswith("xsessionctl: activate debian: no such flavour: no flavour named 'debian'")
        assert len(unknown.stderr.strip().splitlines()) == 1
        assert ctl(private_bus, "bogus").returncode == 2
        time.sleep(0.5)
    finally:
        watch.terminate()
        out, _ = watch.communicate(timeout=10)
    assert re.search(r"ubuntu\s+restoring", out) and re.search(r"ubuntu\s+running", out), out
    assert re.search(r"ubuntu\s+paused", out) and re.search(r"ubuntu\s+stopped", out), out


def test_get_picture_live_for_the_authorized_and_nothing_live_for_others(polkitd, xsessiond, client):
    import struct
    xsessiond("xenubuntu.restore=off")
    png, kind = client.call(KUBUNTU, SESSION_IFACE, "GetPicture", GLib.Variant("(u)", (0,)))
    assert (bytes(png), kind) == (b"", "")  # not running, and the demo flavours have no still
    client.activate("kubuntu")
    client.wait_state("kubuntu", {"running"})
    png, kind = client.call(KUBUNTU, SESSION_IFACE, "GetPicture", GLib.Variant("(u)", (160,)))
    png = bytes(png)
    assert kind == "live" and png.startswith(b"\x89PNG")
    width, height = struct.unpack(">II", png[16:24])
    assert 0 < width <= 160 and 0 < height < width
    full = bytes(client.call(KUBUNTU, SESSION_IFACE, "GetPicture", GLib.Variant("(u)", (0,)))[0])
    assert struct.unpack(">I", full[16:20])[0] > width
    other = gdbus(polkitd, "call", "--dest", BUS_NAME, "--object-path", KUBUNTU, "--method",
                  f"{SESSION_IFACE}.GetPicture", "uint32 160", user=NOBODY)
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() in ("(@ay [], '')", "(b'', '')"), other.stdout
