"""The daemon under pressure, each case a reproduction of a defect once found: it never
freezes, answers every method with the type it declares, leaves another instance's
guests alone, notices a medium folder that goes and comes back."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from gi.repository import GLib

from xsession.office.dbus import OFFICE_IFACE, OFFICE_PATH
from xsession.bus import introspection_xml
from xsession.install.dbus import JOB_IFACE
from xsession.sdnotify import Notifier

from .buslib import BUS_NAME, MANAGER_IFACE, MANAGER_PATH, SESSION_IFACE, gdbus
from .guestlib import ask, qemu_pids_under


def test_the_notifier_never_blocks_when_nobody_reads(tmp_path: Path):
    """systemd's queue holds a few datagrams; a blocking sender would wait for ever."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))  # bound, never read
    notifier = Notifier(str(tmp_path / "notify.sock"))
    sent: list[bool] = []
    worker = threading.Thread(target=lambda: sent.extend(notifier.notify(f"STATUS={i}") for i in range(500)),
                              daemon=True)
    worker.start()
    worker.join(60)
    try:
        assert not worker.is_alive(), "notify blocked on a socket nobody reads"
        assert sent[0] and not sent[-1] and notifier.dropped > 0
        assert listener.recv(100) == b"STATUS=0"
    finally:
        notifier.close()
        listener.close()
    assert not Notifier("").notify("READY=1")  # no socket: a quiet no-op
    gone = Notifier(str(tmp_path / "nobody-here.sock"))
    assert not gone.notify("READY=1")
    gone.close()


def test_status_messages_nobody_reads_never_freeze_the_daemon(private_bus, xsessiond, client):
    """The test reads the notify socket only until READY=1, as the demo did: every pause
    and resume changes the STATUS line, and the daemon must go on answering."""
    xsessiond("xenubuntu.restore=off")
    client.activate("server")
    client.wait_state("server", {"running"})
    for i in range(15):
        for method, state in (("Pause", "paused"), ("Resume", "running")):
            out = gdbus(private_bus, "call", "--timeout", "15", "--dest", BUS_NAME, "--object-path",
                        f"{MANAGER_PATH}/session/server", "--method", f"{SESSION_IFACE}.{method}", timeout=30)
            assert out.returncode == 0, f"{method} #{i + 1}: {out.stderr}"
            assert client.state("server") == state
    assert len(client.states()) == 4


def _methods() -> list[tuple[str, str, list[str], str]]:
    """(interface, method, in signatures, out signature) for every method of the XML."""
    out = []
    for iface in ET.fromstring(introspection_xml()).iter("interface"):
        for m in iface.iter("method"):
            args = list(m.iter("arg"))
            ins = [a.get("type", "") for a in args if a.get("direction", "in") == "in"]
            outs = "".join(a.get("type", "") for a in args if a.get("direction") == "out")
            out.append((iface.get("name", ""), m.get("name", ""), ins, f"({outs})"))
    return out


#: arguments for each method (as gdbus's GVariant text) and the session state it leaves
CALLS = {
    (MANAGER_IFACE, "ListSessions"): [],
    (MANAGER_IFACE, "GetSession"): ["'kubuntu'"],
    (MANAGER_IFACE, "Activate"): ["'ubuntu'", "@a{sv} {}"],
    (MANAGER_IFACE, "SetDefault"): ["'ubuntu'"],
    ("org.freedesktop.DBus.ObjectManager", "GetManagedObjects"): [],
    (SESSION_IFACE, "Activate"): [],
    (SESSION_IFACE, "Pause"): [],
    (SESSION_IFACE, "Resume"): [],
    (SESSION_IFACE, "Reset"): [],
    (SESSION_IFACE, "GetPicture"): ["uint32 64"],
    (MANAGER_IFACE, "ListInstallTargets"): ["'kubuntu'"],
    (MANAGER_IFACE, "ListJobs"): [],
    # each on a job that kubuntu's guest asked for just before (the target: a loop device)
    (JOB_IFACE, "Cancel"): [],
    (JOB_IFACE, "Confirm"): ["'LOOP'"],
    (SESSION_IFACE, "Stop"): [],
    # the demo medium has no office: its object answers, with the named error where it must
    (OFFICE_IFACE, "ListActivity"): [],
    (OFFICE_IFACE, "Start"): [],
    (OFFICE_IFACE, "Pause"): [],
    (OFFICE_IFACE, "Reset"): [],
}
#: what a method answers on this medium instead of its declared type
REFUSED = {(OFFICE_IFACE, m): "org.xenubuntu.Sessions1.Error.NoOffice" for m in ("Start", "Pause", "Reset")}


def _new_job(client, serial: str) -> str:
    """The guest asks for an install (its serial console's ``install``); the new job's path."""
    before = {j[0] for j in client.call(MANAGER_PATH, MANAGER_IFACE, "ListJobs")[0]}
    ask(serial, "install", expect=b"INSTALL asked", timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = [j for j in client.call(MANAGER_PATH, MANAGER_IFACE, "ListJobs")[0] if j[0] not in before]
        if new:
            return str(new[0][4])
        time.sleep(0.05)
    raise TimeoutError("no new install job")


def test_every_method_answers_with_the_type_it_declares(private_bus, xsessiond, client, loops):
    """Each method of the introspection XML, called by gdbus; the reply parses as the
    declared out type (a reply of another type is dropped: the caller times out)."""
    xsessiond("xenubuntu.restore=off")
    loop, _ = loops(300)
    _call_every_method(private_bus, client, loop)


def _call_every_method(private_bus, client, loop: str) -> None:
    methods = {(i, m): (ins, out) for i, m, ins, out in _methods()}
    assert set(methods) == set(CALLS), "a method of the XML has no call here"
    job = ""
    for (iface, method), (ins, out_sig) in sorted(methods.items(), key=lambda kv: list(CALLS).index(kv[0])):
        path = f"{MANAGER_PATH}/session/kubuntu" if iface == SESSION_IFACE else MANAGER_PATH
        if iface == JOB_IFACE:
            path = job = _new_job(client, client.session("kubuntu")["Console"]["serial"])
        if iface == OFFICE_IFACE:
            path = OFFICE_PATH
        args = [a.replace("LOOP", loop) for a in CALLS[(iface, method)]]
        assert len(args) == len(ins)
        reply = gdbus(private_bus, "call", "--timeout", "20", "--dest", BUS_NAME, "--object-path", path,
                      "--method", f"{iface}.{method}", *args, timeout=60)
        if (iface, method) in REFUSED:
            assert reply.returncode != 0 and REFUSED[(iface, method)] in reply.stderr, reply.stderr
            continue
        assert reply.returncode == 0, f"{iface}.{method}: {reply.stderr}"
        value = GLib.Variant.parse(GLib.VariantType(out_sig), reply.stdout.strip(), None, None)
        assert value.get_type_string() == out_sig
        if method in ("Activate", "Resume", "Reset") and iface == SESSION_IFACE:
            client.wait_state("kubuntu", {"running"})
        if iface == MANAGER_IFACE and method == "Activate":
            assert value.unpack() == (f"{MANAGER_PATH}/session/ubuntu",)
        if iface == MANAGER_IFACE and method == "ListInstallTargets":
            assert loop in [d for d, _, _ in value.unpack()[0]]
        if method == "Confirm":  # the install ends before the guest that asked stops
            deadline = time.monotonic() + 120
            while client.prop(job, JOB_IFACE, "State") == "running":
                assert time.monotonic() < deadline, "the install did not end"
                time.sleep(0.2)
            assert client.prop(job, JOB_IFACE, "State") == "done", client.prop(job, JOB_IFACE, "Error")
    assert client.state("kubuntu") == "stopped"


def _slow_zstd(folder: Path) -> Path:
    """A zstd that waits before it decompresses: restores stay in flight long enough."""
    bin_dir = folder / "slow-bin"
    bin_dir.mkdir()
    script = bin_dir / "zstd"
    real = subprocess.check_output(["which", "zstd"], text=True).strip()
    script.write_text(f"#!/bin/sh\nsleep 4\nexec {real} \"$@\"\n")
    script.chmod(0o755)
    return bin_dir


def test_a_second_instance_touches_nothing_and_exits_with_one_line(private_bus, xsessiond, client, runtime_dir,
                                                                  tmp_path):
    slow = _slow_zstd(tmp_path)
    env = {"PATH": f"{slow}:{os.environ['PATH']}"}
    xsessiond("xenubuntu.restore=lazy xenubuntu.flavour=kubuntu", env=env)
    client.wait_state("kubuntu", {"restoring"}, timeout=30)
    before = sorted(p.name for p in (runtime_dir / "sessions").iterdir())
    second = xsessiond("xenubuntu.restore=lazy", wait=False, env=env)
    status = second.proc.wait(30)
    assert status == 1
    lines = [line for line in second.log_text().splitlines() if line.strip()]
    assert len(lines) == 1 and "another xsessiond" in lines[0], lines
    assert re.search(r"pid \d+", lines[0])
    assert sorted(p.name for p in (runtime_dir / "sessions").iterdir()) == before
    assert client.wait_state("kubuntu", {"running", "failed"}, timeout=120) == "running"
    assert "restored from its statefile" in client.session("kubuntu")["StateReason"]


def test_the_medium_folder_going_and_coming_back_is_seen_without_udev(private_bus, xsessiond, client, medium):
    xsessiond("xenubuntu.restore=off", extra=("--no-udev",))
    assert client.prop(MANAGER_PATH, MANAGER_IFACE, "Medium")["available"] is True
    away = medium.with_name("medium-away")
    os.rename(medium, away)
    try:
        assert client.prop(MANAGER_PATH, MANAGER_IFACE, "Medium")["available"] is False
        deadline = time.monotonic() + 20
        while not any("gone" in w for w in client.prop(MANAGER_PATH, MANAGER_IFACE, "Warnings")):
            assert time.monotonic() < deadline, "the daemon did not notice the medium going"
            time.sleep(0.1)
        assert client.error(MANAGER_PATH, MANAGER_IFACE, "Activate",
                            GLib.Variant("(sa{sv})", ("server", {}))).endswith("MediumUnavailable")
    finally:
        os.rename(away, medium)
    deadline = time.monotonic() + 20
    while not client.prop(MANAGER_PATH, MANAGER_IFACE, "Medium")["available"]:
        assert time.monotonic() < deadline, "the daemon did not notice the medium coming back"
        time.sleep(0.1)
    deadline = time.monotonic() + 20
    while any("gone" in w for w in client.prop(MANAGER_PATH, MANAGER_IFACE, "Warnings")):
        assert time.monotonic() < deadline, "the warning stayed after the medium came back"
        time.sleep(0.1)
    client.activate("server")
    assert client.wait_state("server", {"running", "failed"}) == "running"


def test_sigterm_during_a_cold_boot_ends_it_and_leaves_nothing(private_bus, xsessiond, client, runtime_dir, medium):
    """A cold boot in flight (the statefile is gone) is cancelled, not waited for."""
    (medium / "xenubuntu/flavours/server/state.zst").unlink()
    daemon = xsessiond("xenubuntu.restore=off")
    client.activate("server")
    client.wait_state("server", {"booting"}, timeout=30)
    assert daemon.terminate(timeout=30) == 0
    assert "cancelled" in daemon.log_text() or "running" in daemon.log_text()
    assert qemu_pids_under(runtime_dir) == []


def test_the_demo_ends_cleanly_on_ctrl_c(demo_medium, tmp_path):
    """The demo, held, then SIGINT as Ctrl-C sends it: it ends and leaves no guest."""
    proc = subprocess.Popen([sys.executable, "-m", "xsession.demo", "--hold", "--medium", str(demo_medium)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "Ctrl-C stops everything" in line:
                break
        assert any("xsessiond ready" in line for line in seen), "".join(seen)
        work = next(Path(m.group(1)).parent for line in seen if (m := re.search(r"\(log: (\S+)\)", line)))
        pids = qemu_pids_under(work)
        assert len(pids) == 4
        proc.send_signal(2)
        rest = proc.communicate(timeout=300)[0]  # four guests stopped on a loaded host
    finally:
        if proc.poll() is None:
            # the demo's daemon stops its guests on SIGTERM; a SIGKILL of the demo alone would orphan them
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert "stopped" in rest, rest
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_any_text_or_number_is_publishable():
    """Reasons quote QEMU's output and paths come from the command line: whatever they
    hold, the property is sent (never an exception that drops the reply or signal)."""
    from hypothesis import given, settings, strategies as st

    from xsession.bus import MAX_TEXT, clean_text, to_variant

    @settings(max_examples=300, deadline=None)
    @given(value=st.one_of(st.text(), st.integers(), st.lists(st.text(), max_size=3),
                           st.dictionaries(st.text(max_size=5), st.one_of(st.text(), st.integers()), max_size=3)))
    def check(value):
        variant = to_variant(value)
        GLib.Variant("a{sv}", {"k": variant}).get_data_as_bytes()  # serialises
    check()
    assert clean_text("a\x00b") == "a\ufffdb"
    assert "\udcff" not in clean_text("bad \udcff name") and clean_text("bad \udcff name").endswith(" name")
    assert len(clean_text("x" * 100_000)) == MAX_TEXT
