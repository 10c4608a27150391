"""The office for real: the server and the two desktops of the desktop medium restored
under QEMU (TCG), the manager in a network namespace the test creates, the office
started over D-Bus. The workers in the desktops save documents in the server's Samba
share and add events to its Radicale calendar; each desktop reads the other's.

Checked inside the guests (their own QEMU guest agent), not only in what the workers
report: desktop B's ``~/Office`` holds the file desktop A's worker wrote, and B's
CalDAV request returns A's event. A reset of the server makes the desktops' mounted
connection stale (the server restored from its statefile never knew it): they must
reconnect by themselves. Pause stops the work; Reset brings the mastered office back.

Uses the desktop medium (machine-wide cache, see ``xsession.demomedia``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gi.repository import GLib

from xsession.hypervisor.qga import AgentError, GuestAgent
from xsession.manifest import MANIFEST_RELPATH, load_manifest
from xsession.office.dbus import OFFICE_IFACE, OFFICE_PATH

from .buslib import MANAGER_PATH, SESSION_IFACE, Client
from .conftest import linked_copy
from .netlib import Netns

#: a worker takes a step every two seconds; under emulation, with three guests on
#: two cores, a step and the restores take much longer than on hardware
WORK_S = 420.0




def _in_guest(runtime_dir: Path, name: str, script: str, timeout: float = 60.0) -> str:
    with GuestAgent(runtime_dir / "sessions" / name / "qga.sock", timeout=30.0) as agent:
        status, out, err = agent.run(["/bin/sh", "-c", script], timeout=timeout)
    assert status == 0, f"{name}: {script!r}: {status} {err[-300:]!r}"
    return out.decode(errors="replace")


def _office(client: Client) -> dict[str, Any]:
    return client.call(OFFICE_PATH, "org.freedesktop.DBus.Properties", "GetAll",
                       GLib.Variant("(s)", (OFFICE_IFACE,)))[0]


def _wait(what: str, check: Callable[[], Any], timeout: float = WORK_S, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except AgentError:  # a guest's agent just restored or reset may answer garbage once
            result = None
        if result:
            return result
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def _documents(runtime_dir: Path, desktop: str) -> set[str]:
    """The documents desktop ``desktop`` sees in its own ~/Office (its mount of the share)."""
    out = _in_guest(runtime_dir, desktop, "ls /home/user/Office/ 2>/dev/null || true")
    return {n[:-4] for n in out.split() if n.endswith(".txt")}


def test_documents_and_events_move_between_desktops_and_survive_a_server_reset(
        desktop_medium: Path, dom0: Netns, xsessiond, private_bus: str, runtime_dir: Path, tmp_path: Path):
    manifest = load_manifest(desktop_medium / MANIFEST_RELPATH)
    assert manifest.office is not None
    a, b = manifest.office.desktops[:2]
    server = manifest.office.server
    medium = linked_copy(desktop_medium, tmp_path / "dmedium")
    xsessiond("xenubuntu.restore=off", medium_path=medium, wrap=dom0.wrap)
    client = Client(private_bus)
    assert _office(client)["State"] == "idle"

    client.call(OFFICE_PATH, OFFICE_IFACE, "Start")
    for name in (server, a, b):
        client.wait_state(name, {"running"}, timeout=300)
    assert _office(client)["State"] == "running"
    # each worker hears the start (dom0 repeats it until the worker answers)
    _wait("both workers acknowledge the start", lambda: all(
        _office(client)["Workers"][d][0] == "running" for d in (a, b)))

    # a document saved by A's worker is read by B's, and an event added by A is seen by B
    counters = _wait("a document and an event crossed between the desktops", lambda: (
        c if (c := _office(client)["Counters"])["Read"] >= 2 and c["Seen"] >= 2 else None))
    assert counters["Saved"] >= 1 and counters["Added"] >= 1
    assert 0 < counters["FirstRead"] and 0 < counters["FirstSeen"]
    # the counters add up both desktops' work: A's own first save and event may come a
    # few of its steps later than B's, on a loaded host
    user_a = _in_guest(runtime_dir, a, ". /home/user/.config/xenubuntu/office; echo $OFFICE_USER").strip()
    from_a = _wait(f"{b} sees a document of {user_a} in its share", lambda: {
        d for d in _documents(runtime_dir, b) if d.startswith(user_a + "-")}, every=2.0)
    doc = sorted(from_a)[0]
    text = _in_guest(runtime_dir, b, f"cat /home/user/Office/{doc}.txt")
    assert f"Written by {user_a} on {a}" in text, text
    ics = _wait(f"{b}'s calendar request returns an event of {user_a}", lambda: (
        t if f"UID:{user_a}-" in (t := _in_guest(runtime_dir, b, ". /home/user/.config/xenubuntu/office; "
                                                 "curl -sf -u \"$OFFICE_USER:$OFFICE_PASSWORD\" \"$CALENDAR_URL\""))
        else None), every=2.0)
    assert f"Meeting called by {user_a}" in ics, ics[:400]
    assert "Written by" in _in_guest(runtime_dir, server, f"cat /srv/office/{doc}.txt")

    # the server is reset under the desktops: their mounted connection to it is stale
    # (the restored server never knew it); they reconnect by themselves and go on
    mounted = _in_guest(runtime_dir, a, "grep ' /home/user/Office cifs ' /proc/mounts || true")
    assert "cifs" in mounted, "the share was not mounted before the reset"
    client.call(f"{MANAGER_PATH}/session/{server}", SESSION_IFACE, "Reset")
    client.wait_state(server, {"running"}, timeout=300)
    assert _in_guest(runtime_dir, server, f"test -e /srv/office/{doc}.txt && echo kept || echo gone").strip() == \
        "gone", "the reset server kept what was saved before"
    _wait("both desktops write to the reset server again", lambda: {
        d.split("-")[0] for d in _in_guest(runtime_dir, server, "ls /srv/office").split()} >= {
        user_a, _in_guest(runtime_dir, b, ". /home/user/.config/xenubuntu/office; echo $OFFICE_USER").strip()},
        every=3.0)
    before = _office(client)["Counters"]["Read"]
    _wait("a desktop reads the other's document after the server's reset",
          lambda: _office(client)["Counters"]["Read"] > before)

    # pause: each worker acknowledges, then saves nothing more
    client.call(OFFICE_PATH, OFFICE_IFACE, "Pause")
    assert _office(client)["State"] == "paused"
    _wait("both workers acknowledge the pause", lambda: all(
        _office(client)["Workers"][d][0] == "paused" for d in (a, b)))
    time.sleep(2.0)  # what was reported before the acknowledgement has arrived
    saved = _office(client)["Counters"]["Saved"]
    time.sleep(12.0)  # several of a worker's steps
    assert _office(client)["Counters"]["Saved"] == saved

    # reset: the mastered office again, nothing of this run left on the server
    client.call(OFFICE_PATH, OFFICE_IFACE, "Reset")
    office = _office(client)
    assert office["State"] == "idle" and office["Counters"]["Saved"] == 0
    for name in (server, a, b):
        client.wait_state(name, {"running"}, timeout=300)
    assert not _in_guest(runtime_dir, server, "ls /srv/office").split()  # the workers wait for a start
