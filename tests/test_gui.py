"""The front-end for real: a real window under Xvfb, xsessiond on a private bus as its own
process, real guests from the demo medium, xdotool clicks and keys, and the guests'
own word on what their consoles show (see tests/guilib.py for how a framebuffer is read).

The window runs in the test process, so that the test can look into its GtkVnc views
(``get_pixbuf()``); the daemon and the other D-Bus clients are other processes.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from gi.repository import GLib

from xsession.manifest import MANIFEST_RELPATH
from xsession.screen import Picture, to_png

from .buslib import Client
from .guestlib import ask, with_office
from .conftest import ARTIFACTS
from .guilib import (COLS, ROWS, CELL_H, CELL_W, MethodCalls, click, distinct_colours, guest_keyboard_interrupts,
                     pump, read_text, screenshot, session_font, settle, xdotool)

SHOTS = ARTIFACTS / "gui"
TITLES = {"kubuntu": "Kubuntu", "ubuntu": "Ubuntu", "xubuntu": "Xubuntu", "server": "Ubuntu Server"}
#: the demo medium's flavours have none: tests that want them edit a private copy
DESCRIPTIONS = {
    "kubuntu": "KDE Plasma: a complete desktop that can be made to look like anything.",
    "ubuntu": "GNOME the Ubuntu way: the desktop most people start with.",
    "xubuntu": "Xfce: light, quick and familiar, for older machines too.",
    "server": "No desktop: a console for services, containers and the network.",
}
#: the demo guests' VGA text screen, as QEMU shows it
GUEST_RATIO = (COLS * CELL_W) / (ROWS * CELL_H)


def describe_medium(medium: Path, stills: dict[str, Picture] | None = None) -> None:
    """Give the medium's flavours their descriptions, and some of them a still (the
    screen as saved, which the demo's mastering does not keep for its tiny guests)."""
    folder = (medium / MANIFEST_RELPATH).parent
    for name, picture in (stills or {}).items():
        (folder / "flavours" / name / "still.png").write_bytes(to_png(picture))
    path = medium / MANIFEST_RELPATH
    data = yaml.safe_load(path.read_text())
    for f in data["flavours"]:
        f["description"] = DESCRIPTIONS[f["name"]]
        if f["name"] in (stills or {}):
            f["still"] = f"flavours/{f['name']}/still.png"
    tmp = path.with_name("manifest.new")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)   # a new file: the copy's hard links to the cached medium stay untouched


def banded_still(width: int = 640, height: int = 480) -> Picture:
    """A 4:3 picture of four coloured bands, easy to recognise in a card."""
    bands = [(0xe9, 0x54, 0x20), (0x77, 0x21, 0x6f), (0x2c, 0x00, 0x1e), (0xae, 0xa7, 0x9f)]
    rows = [bytes(bands[min(3, y * 4 // height)]) * width for y in range(height)]
    return Picture(width, height, b"".join(rows))


def card_picture(card):
    """The picture a card shows (its image's pixbuf), or None while it shows the placeholder."""
    if card.picture_stack.get_visible_child_name() != "picture":
        return None
    return card.picture.get_pixbuf()


def live_picture(card):
    """The card's live picture once it is one with something on it (not a blank, one-colour screen)."""
    pixbuf = card_picture(card)
    if card.picture_kind == "live" and pixbuf is not None and distinct_colours(pixbuf, step=1) > 1:
        return pixbuf
    return None


@pytest.fixture
def gui(xdisplay, private_bus, request):
    """Windows of the front-end on the private bus; a screenshot is kept if the test fails."""
    from xsession.gui.client import SessionsClient
    from xsession.gui.window import MainWindow

    made = []

    def make(auto_show: bool = False):
        client = SessionsClient(private_bus)
        client.start()
        window = MainWindow(client, auto_show_default=auto_show)
        window.move(0, 0)
        window.show()
        made.append((client, window))
        pump(lambda: window.get_mapped() and client.is_connected and len(window.chooser.cards) == 4, 30,
             "the window with four cards")
        settle(0.2)
        return window

    yield make
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        screenshot(ARTIFACTS / request.node.name / "screen.png")
    for client, window in made:
        window.destroy()
        client.close()
    settle(0.1)


@pytest.fixture
def other(private_bus):
    """Another D-Bus client (the test's own connection), as a second front-end would be."""
    c = Client(private_bus)
    yield c
    c.close()


def card_state(window, name: str) -> str:
    return window.chooser.cards[name].state_label.get_text()


def serial(runtime_dir: Path, name: str) -> Path:
    return runtime_dir / "sessions" / name / "serial.sock"


def vnc(runtime_dir: Path, name: str) -> str:
    return f"unix:{runtime_dir / 'sessions' / name / 'vnc.sock'}"


def shows(view, font: dict[bytes, str], name: str) -> list[str] | None:
    """The view's text if it shows ``name``'s title and flavour line (None while it does not)."""
    if not view.connected:
        return None
    text = read_text(view.display.get_pixbuf(), font)
    stripped = [r.strip() for r in text]
    if TITLES[name] in stripped and any(f"flavour={name}" in r for r in stripped):
        return text
    return None


def test_chooser_shows_every_flavour_and_its_state(xsessiond, gui, other, medium):
    describe_medium(medium)
    xsessiond("xenubuntu.restore=off xenubuntu.flavour=ubuntu")
    other.activate("server")
    other.wait_state("server", {"running"})
    window = gui()
    chooser = window.chooser

    assert [c.name for c in sorted(chooser.cards.values(), key=lambda c: c.get_parent().get_index())] == \
        ["kubuntu", "ubuntu", "xubuntu", "server"]     # restore order
    for name, card in chooser.cards.items():
        assert card.title_label.get_text() == TITLES[name]
        assert card.default_label.get_visible() == (name == "ubuntu")
        assert card.memory_label.get_text() == f"Memory: {192 if name == 'server' else 256} MiB"
        visible = {m for m, b in card.action_buttons.items() if b.get_visible()}
        if name == "server":
            assert card_state(window, name) == "Running"
            assert visible == {"Pause", "Stop", "Reset"}
            assert card.show_button.get_label() == "Switch to"
        else:
            assert card_state(window, name) == "Not started"
            assert visible == {"Reset"}
            assert card.show_button.get_label() == "Start"
        assert not card.progress.get_visible()
    assert "MiB in use by sessions" in chooser.memory_label.get_text()

    # another client restores xubuntu: the card follows, with a progress bar while it restores
    seen: list[tuple[str, bool]] = []
    card = chooser.cards["xubuntu"]
    window.client.connect("session-changed", lambda _c, n, _ch: n == "xubuntu" and seen.append(
        (card_state(window, "xubuntu"), card.progress.get_visible())))
    other.activate("xubuntu")
    pump(lambda: card_state(window, "xubuntu") == "Running", 60, "xubuntu's card to say Running")
    assert ("Restoring", True) in seen, seen
    assert seen[-1] == ("Running", False)

    # and another pauses the server: its card offers Resume instead of Pause
    other.call(other_path("server"), "org.xenubuntu.Sessions1.Session", "Pause")
    server = chooser.cards["server"]
    pump(lambda: card_state(window, "server") == "Paused", 10, "the server's card to say Paused")
    assert {m for m, b in server.action_buttons.items() if b.get_visible()} == {"Resume", "Stop", "Reset"}

    # what each looks like: the running and the paused one their screens, the others their titles
    for name in ("xubuntu", "server"):
        pump(lambda: live_picture(chooser.cards[name]), 30, f"a live picture on {name}'s card")
    for name in ("kubuntu", "ubuntu"):
        assert chooser.cards[name].picture_kind == "" and chooser.cards[name].placeholder.get_mapped()
        assert chooser.cards[name].description_label.get_text() == DESCRIPTIONS[name]

    settle(0.3)
    shot = screenshot(SHOTS / "chooser.png", window)
    assert distinct_colours(shot) > 20


def other_path(name: str) -> str:
    return f"/org/xenubuntu/Sessions1/session/{name}"


def test_cards_show_live_screens_only_while_the_chooser_is_shown_and_stills_once(
        xsessiond, gui, other, medium, private_bus):
    from xsession.gui.chooser import PICTURE_SIZE, REFRESH_S

    describe_medium(medium, stills={"kubuntu": banded_still(640, 480), "ubuntu": banded_still(640, 480)})
    xsessiond("xenubuntu.restore=off xenubuntu.flavour=kubuntu")
    other.activate("kubuntu")
    other.wait_state("kubuntu", {"running"})
    with MethodCalls(private_bus, "GetPicture") as calls:
        def monitor_sees_a_call() -> int:
            other.call(other_path("server"), "org.xenubuntu.Sessions1.Session", "GetPicture", GLib.Variant("(u)", (0,)))
            settle(0.2)
            return calls.count

        pump(monitor_sees_a_call, 10, "the monitor to see a call of the test's own")
        start = calls.count
        window = gui()
        cards = window.chooser.cards

        # what each flavour is, under its title
        for name, card in cards.items():
            assert card.description_label.get_visible() and card.description_label.get_text() == DESCRIPTIONS[name]
            assert card.source_label.get_text() == "Demo system"

        # the running session: its screen (not its still), scaled to the card, the guest's shape, not one colour
        kubuntu = cards["kubuntu"]
        picture = pump(lambda: live_picture(kubuntu), 30, "a live picture on Kubuntu's card")
        assert picture.get_width() == PICTURE_SIZE[0], picture.get_width()
        assert abs(picture.get_width() / picture.get_height() - GUEST_RATIO) < 0.02, \
            (picture.get_width(), picture.get_height())
        # ... and it follows the guest's screen (a heartbeat counter redrawn every second)
        shown, pixels = kubuntu.pictures_shown, bytes(picture.get_pixels())
        pump(lambda: kubuntu.pictures_shown > shown and live_picture(kubuntu) is not None
             and bytes(kubuntu.picture.get_pixbuf().get_pixels()) != pixels, 30, "a refresh that shows a change")

        # the sessions that do not run: their still (ubuntu's, fitted to 240x180) or the placeholder
        ubuntu = cards["ubuntu"]
        still = pump(lambda: card_picture(ubuntu), 10, "the still on Ubuntu's card")
        assert ubuntu.picture_kind == "still"
        assert (still.get_width(), still.get_height()) == PICTURE_SIZE    # 640x480 is 4:3, as the card's area
        assert distinct_colours(still) == 4
        # an answer that is no picture changes nothing
        assert not ubuntu.show_picture(b"\x89PNG\r\n\x1a\n garbled", "live")
        assert card_picture(ubuntu) is still and ubuntu.picture_kind == "still"
        for name in ("xubuntu", "server"):
            assert cards[name].picture_kind == "" and card_picture(cards[name]) is None
            assert cards[name].placeholder.get_text() == TITLES[name]
            assert cards[name].placeholder.get_mapped()
        settle(REFRESH_S + 1)
        asked = calls.since(start)
        # only the running session is asked again; each of the others once
        for name in ("ubuntu", "xubuntu", "server"):
            assert asked.count(other_path(name)) == 1, (name, asked)
        assert asked.count(other_path("kubuntu")) >= 3, asked

        # a console in front of the chooser: no more calls, until the chooser is back
        window.show_console("kubuntu")
        settle(1)   # a call already on its way is answered
        before = calls.count
        settle(2 * REFRESH_S + 1)
        assert calls.since(before) == []
        window.show_chooser()
        pump(lambda: calls.count > before, 2 * REFRESH_S, "the pictures asked for again")

        # a hidden window: no calls either
        window.hide()
        settle(1)
        before = calls.count
        settle(2 * REFRESH_S + 1)
        assert calls.since(before) == []
        window.show()
        pump(lambda: calls.count > before, 2 * REFRESH_S, "the pictures asked for again")

        # the session stops: its card falls back to its still
        other.call(other_path("kubuntu"), "org.xenubuntu.Sessions1.Session", "Stop")
        pump(lambda: kubuntu.picture_kind == "still", 10, "Kubuntu's still")
        assert (card_picture(kubuntu).get_width(), card_picture(kubuntu).get_height()) == PICTURE_SIZE
        assert distinct_colours(card_picture(kubuntu)) == 4
        before = calls.count
        settle(REFRESH_S + 1)
        assert calls.since(before) == []    # nothing runs: nothing to refresh


def test_a_click_on_switch_shows_that_flavours_console_and_the_host_key_returns(
        xsessiond, gui, runtime_dir, xdisplay):
    xsessiond("xenubuntu.restore=off xenubuntu.flavour=kubuntu")
    window = gui()
    card = window.chooser.cards["xubuntu"]
    assert card.show_button.get_label() == "Start"
    click(xdisplay, card.show_button)           # starts it and shows its console
    pump(lambda: window.page == "console" and window.consoles and window.consoles[0].connected, 60,
         "xubuntu's console to connect")
    view = window.consoles[0]
    assert view.name == "xubuntu" and view.title_label.get_text() == "Xubuntu"

    # what xubuntu itself says its screen holds, read from its own display: the font to read the window with
    font, text = session_font(serial(runtime_dir, "xubuntu"), vnc(runtime_dir, "xubuntu"))
    assert "Xubuntu" in [r.strip() for r in text], text
    seen = pump(lambda: shows(view, font, "xubuntu"), 10, "the window's display to show Xubuntu")
    assert any("eartbeat" in r for r in seen), seen   # "h" and the digits are not in the learned text
    screenshot(SHOTS / "console-xubuntu.png", window)

    # the keyboard is with the guest; the host key still brings the chooser back
    view.take_keyboard()
    pump(lambda: view.has_keyboard(), 5, "the console to take the keyboard")
    xdotool(xdisplay, "key", "--clearmodifiers", "ctrl+alt+Home")
    pump(lambda: window.page == "chooser", 5, "the host key to bring back the chooser")
    assert not window.consoles

    # back to it, and Ctrl+Alt+Del reaches the guest: the demo guest's kernel reboots at
    # once (its init is a shell that does not take Ctrl+Alt+Del over), which the daemon
    # reports, since a restored session that resets itself has failed
    assert card.show_button.get_label() == "Switch to"
    click(xdisplay, card.show_button)
    pump(lambda: window.page == "console" and window.consoles[0].connected, 20, "xubuntu's console again")
    view = window.consoles[0]
    click(xdisplay, view.cad_button)
    pump(lambda: view.state_label.get_text() == "failed", 20, "the guest to reset on Ctrl+Alt+Del")
    assert "reset" in window.client.sessions["xubuntu"].reason, window.client.sessions["xubuntu"].reason
    pump(lambda: "failed" in view.waiting_label.get_text(), 5, "the console to say why it shows nothing")


def test_split_view_shows_two_named_consoles_each_taking_the_keyboard(
        xsessiond, gui, other, runtime_dir, xdisplay):
    xsessiond("xenubuntu.restore=off xenubuntu.flavour=kubuntu")
    for name in ("kubuntu", "xubuntu"):
        other.activate(name)
    for name in ("kubuntu", "xubuntu"):
        other.wait_state(name, {"running"})
    window = gui()
    for name in ("kubuntu", "xubuntu"):
        pump(lambda: card_state(window, name) == "Running", 10, f"{name}'s card")
        click(xdisplay, window.chooser.cards[name].split_check)
    assert window.chooser.picked == {"kubuntu", "xubuntu"}
    click(xdisplay, window.chooser.split_button)
    pump(lambda: window.page == "split" and len(window.consoles) == 2 and all(v.connected for v in window.consoles),
         30, "two consoles side by side")
    views = {v.name: v for v in window.consoles}
    assert set(views) == {"kubuntu", "xubuntu"}
    # both panes scale their guest's whole screen down to half the window (unscaled, two
    # 720-pixel screens would not fit in it side by side)
    width = window.get_allocated_width()
    assert width <= 1280, width
    for name, view in views.items():
        assert view.display.get_scaling(), name
        shown = (view.display.get_allocated_width(), view.display.get_allocated_height())
        guest = (view.display.get_width(), view.display.get_height())
        assert guest == (COLS * CELL_W, ROWS * CELL_H), (name, guest)
        assert shown[0] <= width // 2 < guest[0], (name, shown, guest)

    fonts = {}
    for name, view in views.items():
        fonts[name], _ = session_font(serial(runtime_dir, name), vnc(runtime_dir, name))
        pump(lambda: shows(view, fonts[name], name), 10, f"the {name} pane to show {TITLES[name]}")
    # the reading tells them apart: Xubuntu's font cannot read Kubuntu's K
    assert "Kubuntu" not in [r.strip() for r in read_text(views["kubuntu"].display.get_pixbuf(), fonts["xubuntu"])]
    settle(0.3)
    screenshot(SHOTS / "split.png", window)

    # each pane can take the keyboard: typed keys reach that guest only (its keyboard interrupts)
    for taker, idle in (("xubuntu", "kubuntu"), ("kubuntu", "xubuntu")):
        click(xdisplay, views[taker].keyboard_button)
        pump(lambda: views[taker].has_keyboard() and not views[idle].has_keyboard(), 5, f"{taker} to take the keyboard")
        before = {n: guest_keyboard_interrupts(serial(runtime_dir, n)) for n in views}
        xdotool(xdisplay, "type", "--delay", "20", "hello")
        settle(0.5)
        after = {n: guest_keyboard_interrupts(serial(runtime_dir, n)) for n in views}
        assert after[taker] - before[taker] >= 5, (taker, before, after)
        assert after[idle] == before[idle], (idle, before, after)


def test_a_reset_by_another_client_shows_within_a_second_and_the_console_reconnects(
        xsessiond, gui, other, runtime_dir, private_bus):
    xsessiond("xenubuntu.restore=off xenubuntu.flavour=kubuntu")
    other.activate("ubuntu")
    other.wait_state("ubuntu", {"running"})
    window = gui()
    view = window.show_console("ubuntu")
    pump(lambda: view.connected, 20, "ubuntu's console")
    first = view.connections
    font, _ = session_font(serial(runtime_dir, "ubuntu"), vnc(runtime_dir, "ubuntu"))

    # when each change reached the window, against when the daemon made it (LastChange, same clock)
    delays: list[tuple[str, float]] = []
    window.client.connect("session-changed", lambda c, n, ch: n == "ubuntu" and "State" in ch and delays.append(
        (view.state_label.get_text(), time.time() - c.sessions["ubuntu"].last_change)))
    proc = subprocess.Popen([sys.executable, "-m", "xsession.ctl", "--address", private_bus, "reset", "ubuntu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pump(lambda: proc.poll() is not None, 60, "xsessionctl reset ubuntu")
    assert proc.returncode == 0, proc.stdout.read() if proc.stdout else ""
    pump(lambda: view.connections > first and view.connected, 20, "the console to reconnect after the reset")
    states = [s for s, _ in delays]
    assert states[-1] == "running" and any(s in ("stopped", "queued", "restoring") for s in states), delays
    assert all(d < 1.0 for _, d in delays), delays
    pump(lambda: shows(view, font, "ubuntu"), 10, "the reconnected console to show Ubuntu")


def test_not_enough_memory_is_explained_in_the_info_bar(xsessiond, gui, other, xdisplay):
    total = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal:"))) // 1024
    # room for one 256 MiB session and not two
    xsessiond(f"xenubuntu.restore=off xenubuntu.flavour=kubuntu xenubuntu.reserve={total - 400}M")
    other.activate("kubuntu")
    other.wait_state("kubuntu", {"running"})
    window = gui()
    click(xdisplay, window.chooser.cards["ubuntu"].show_button)
    message = pump(lambda: window.message, 15, "an error in the info bar")
    # how much is needed, how much is free, and what could be stopped
    assert re.fullmatch(r"Not enough memory for Ubuntu: it needs \d+ MiB, \d+ MiB are free\. "
                        r"Stopping Kubuntu would make room\.", message), message
    assert window.info_bar.get_visible()
    assert window.page == "chooser"     # nothing to show: the person stays where the choice is
    settle(0.3)
    screenshot(SHOTS / "not-enough-memory.png", window)
    window.hide_message()
    assert window.message == ""


def test_the_window_survives_the_daemon_restarting(xsessiond, gui, other, runtime_dir):
    daemon = xsessiond("xenubuntu.restore=off xenubuntu.flavour=kubuntu", stop_guests=False)
    other.activate("server")
    other.wait_state("server", {"running"})
    window = gui()
    view = window.show_console("server")
    pump(lambda: view.connected, 20, "server's console")
    connections = view.connections

    assert daemon.terminate() == 0       # the guest keeps running
    pump(lambda: "not running" in window.message, 10, "the info bar to say the manager is gone")
    assert not window.chooser.cards
    assert view.connected                 # its display stays: the guest did not go away

    xsessiond("xenubuntu.restore=off xenubuntu.flavour=kubuntu")   # adopts the running guest
    pump(lambda: len(window.chooser.cards) == 4 and card_state(window, "server") == "Running", 30,
         "the cards to come back with the server running")
    pump(lambda: window.message == "", 5, "the info bar to go")
    assert view.connected and view.connections == connections


def test_xsession_gui_command_opens_its_window(xdisplay, xsessiond, private_bus):
    xsessiond("xenubuntu.restore=off")
    env = dict(os.environ, DISPLAY=xdisplay)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "xsession-gui"), "--address", private_bus,
                             "--no-auto-show"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        found = subprocess.run(["xdotool", "search", "--sync", "--name", "^XenUbuntu$"], env=env,
                               capture_output=True, text=True, timeout=30)
        assert found.returncode == 0 and found.stdout.strip(), found
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0].decode(errors="replace")
    assert "appeared" in out, out


def test_full_screen_without_a_window_manager_covers_the_screen(xdisplay, xsessiond, private_bus):
    """dom0's desktop runs X with the chooser alone: no window manager to honour a full-screen
    request, so the window itself takes the whole screen (Xvfb's 1280x800 here)."""
    xsessiond("xenubuntu.restore=off")
    env = dict(os.environ, DISPLAY=xdisplay)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "xsession-gui"), "--address", private_bus,
                             "--no-auto-show", "--fullscreen"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        found = subprocess.run(["xdotool", "search", "--sync", "--onlyvisible", "--name", "^XenUbuntu$"],
                               env=env, capture_output=True, text=True, timeout=30)
        assert found.returncode == 0 and found.stdout.strip(), found
        wid = found.stdout.split()[0]
        geometry = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            geometry = subprocess.run(["xdotool", "getwindowgeometry", "--shell", wid], env=env,
                                      capture_output=True, text=True, timeout=10).stdout
            if "WIDTH=1280" in geometry and "HEIGHT=800" in geometry:
                break
            time.sleep(0.2)
        assert "X=0" in geometry and "Y=0" in geometry, geometry
        assert "WIDTH=1280" in geometry and "HEIGHT=800" in geometry, geometry
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0].decode(errors="replace")
    assert "window mapped (1280x800)" in out, out


def test_the_default_session_is_shown_at_once_when_it_runs(xsessiond, gui):
    xsessiond("xenubuntu.restore=lazy xenubuntu.flavour=server")
    window = gui(auto_show=True)
    pump(lambda: window.page == "console" and window.consoles[0].connected, 60, "the default session's console")
    assert window.consoles[0].name == "server"


def test_the_client_alone_follows_signals_without_gtk(xsessiond, other, private_bus):
    """The D-Bus part of the front-end imports no GTK and is usable on its own."""
    probe = subprocess.run([sys.executable, "-c", "import sys, xsession.gui.client; "
                            "print(sorted(m for m in sys.modules if m.startswith(('gi.repository.Gtk', "
                            "'gi.repository.Gdk', 'xsession.engine', 'xsession.hypervisor'))))"],
                           capture_output=True, text=True, timeout=30)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr

    from xsession.gui.client import SessionsClient
    xsessiond("xenubuntu.restore=off xenubuntu.flavour=kubuntu")
    client = SessionsClient(private_bus)
    events: list[tuple[str, str]] = []
    client.connect("session-changed", lambda c, n, ch: "State" in ch and events.append((n, c.sessions[n].state)))
    errors: list = []
    client.connect("call-failed", lambda _c, e: errors.append(e))
    client.start()
    try:
        # the sessions and the manager's properties come in two replies, in either order
        pump(lambda: client.is_connected and len(client.sessions) == 4 and client.manager.default_flavour, 20,
             "the sessions and the manager")
        assert client.manager.default_flavour == "kubuntu"
        assert [s.name for s in client.sessions.values()] == ["kubuntu", "ubuntu", "xubuntu", "server"]
        other.activate("ubuntu")
        pump(lambda: ("ubuntu", "running") in events, 60, "ubuntu running, as signalled")
        assert client.sessions["ubuntu"].vnc.startswith("unix:") and client.sessions["ubuntu"].vnc.endswith("vnc.sock")
        assert ("ubuntu", "restoring") in events[:events.index(("ubuntu", "running"))], events
        client.session_call("kubuntu", "Pause")          # not running: refused, with the reason
        err = pump(lambda: errors and errors[0], 10, "the refusal")
        assert err.short_name == "InvalidState" and err.meaning.startswith("Kubuntu cannot do that now: "), err

        # what a card shows: a demo guest without a description; its screen as a PNG
        assert (client.sessions["ubuntu"].description, client.sessions["ubuntu"].source) == ("", "initrd")
        pictures: list[tuple[str, bytes, str]] = []
        failures: list[tuple[str, str]] = []
        for name in ("ubuntu", "kubuntu", "nonesuch"):
            client.get_picture(name, 300, lambda png, kind, n=name: pictures.append((n, png, kind)),
                               lambda why, n=name: failures.append((n, why)))
        pump(lambda: len(pictures) + len(failures) == 3, 20, "three answers")
        got = {n: (png, kind) for n, png, kind in pictures}
        png, kind = got["ubuntu"]
        assert kind == "live" and png.startswith(b"\x89PNG\r\n\x1a\n"), (kind, png[:16])
        assert int.from_bytes(png[16:20], "big") <= 300          # the IHDR's width
        assert got["kubuntu"] == (b"", "")                        # not running, and no still on the demo medium
        assert [n for n, _ in failures] == ["nonesuch"], failures
        assert len(errors) == 1                                   # a picture that fails is no error to show
    finally:
        client.close()


# --- the install's confirmation dialog ---------------------------------------------------

def test_describe_progress_says_rate_and_time_left(xdisplay):
    from xsession.gui.client import Job
    from xsession.gui.install import describe_progress  # GTK: once Xvfb runs
    job = Job("/j/1", state="running", progress=0.37, rate=12 * 2**20, expected_end=int(1020 * 1e6))
    assert describe_progress(job, now=1000.0) == "37 %, 12.0 MiB/s, about 20 s left"
    assert describe_progress(Job("/j/1", state="done", target="/dev/sdb")) == "Installed onto /dev/sdb."
    assert "failed: no space" in describe_progress(Job("/j/1", state="failed", error="no space"))


def test_a_guests_request_opens_the_dialog_and_a_click_installs(xsessiond, gui, other, xdisplay, tmp_path,
                                                               caplog):
    from gi.repository import Gtk
    caplog.set_level(logging.INFO, logger="xsession.gui.install")
    xsessiond("xenubuntu.restore=off")
    other.activate("kubuntu")
    other.wait_state("kubuntu", {"running"})
    window = gui()
    image = tmp_path / "target.img"
    with open(image, "wb") as f:
        f.truncate(300 * 2**20)
    loop = subprocess.run(["losetup", "--find", "--show", "--partscan", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        ask(other.session("kubuntu")["Console"]["serial"], "install", expect=b"INSTALL asked", timeout=30)
        dialog = pump(lambda: next(iter(window.install_dialogs.values()), None), 30, "the confirmation dialog")
        assert dialog.get_title() == "Install Kubuntu?" and "Kubuntu session asks" in dialog.intro.get_text()
        # on the screen, it says so (the install benchmark times a request by this line)
        pump(lambda: "install dialog shown for /org/xenubuntu/Sessions1/job/" in caplog.text, 10, "the dialog's line")
        pump(lambda: loop in dialog.devices, 30, "the loop device offered")
        assert not dialog.install_button.get_sensitive()  # nothing happens before a disk is picked
        # put off: the request waits on the chooser, and comes back from there
        assert window.chooser.install_button.get_visible()
        assert window.chooser.install_button.get_label() == "Install request: Kubuntu"
        dialog.response(Gtk.ResponseType.CLOSE)   # "Not now"
        pump(lambda: not dialog.get_visible(), 10, "the dialog put off")
        click(xdisplay, window.chooser.install_button)
        pump(lambda: dialog.get_visible(), 10, "the dialog shown again")
        settle(0.3)
        dialog.select(loop)
        settle(0.3)
        screenshot(SHOTS / "install-dialog.png", dialog)
        click(xdisplay, dialog.install_button)
        job = pump(lambda: next((j for j in window.client.jobs.values() if j.state in ("done", "failed")), None),
                   120, "the install's end")
        assert job.state == "done", job.error
        pump(lambda: dialog.status.get_text() == f"Installed onto {loop}.", 10, "the outcome in the dialog")
        assert dialog.progress.get_fraction() == 1.0
        assert not window.chooser.install_button.get_visible()  # nothing waits any more
    finally:
        subprocess.run(["losetup", "--detach", loop], capture_output=True)


def test_the_office_view_shows_its_three_consoles_and_its_buttons_drive_it(
        xsessiond, gui, other, runtime_dir, xdisplay, medium):
    xsessiond("xenubuntu.restore=off", medium_path=with_office(medium, "server", ["kubuntu", "ubuntu"]))
    window = gui()
    office = "/org/xenubuntu/Sessions1/office"
    iface = "org.xenubuntu.Sessions1.Office"
    pump(lambda: window.client.office is not None and window.chooser.office_button.get_visible(), 10,
         "the Office button")
    click(xdisplay, window.chooser.office_button)
    pump(lambda: window.page == "office" and len(window.consoles) == 3, 10, "the office view")
    assert [v.name for v in window.consoles] == ["server", "kubuntu", "ubuntu"]
    assert "Not started" in window.office_bar.status_label.get_text()
    assert not window.office_bar.buttons["Pause"].get_sensitive()

    # Start: the daemon starts the office; its three sessions run and are shown at once, each by name
    click(xdisplay, window.office_bar.buttons["Start"])
    pump(lambda: other.prop(office, iface, "State") == "running", 30, "the office to start")
    for name in ("server", "kubuntu", "ubuntu"):
        other.wait_state(name, {"running"})
    pump(lambda: all(v.connected for v in window.consoles), 60, "three live consoles")
    pump(lambda: "Working" in window.office_bar.status_label.get_text(), 10, "the status line")
    views = {v.name: v for v in window.consoles}
    for name, view in views.items():
        font, _ = session_font(serial(runtime_dir, name), vnc(runtime_dir, name))
        pump(lambda: shows(view, font, name), 20, f"the {name} pane to show {TITLES[name]}")
    settle(0.3)
    screenshot(SHOTS / "office.png", window)

    # Pause and Reset go to the daemon too; the line follows what it says
    click(xdisplay, window.office_bar.buttons["Pause"])
    pump(lambda: other.prop(office, iface, "State") == "paused", 30, "the office to pause")
    pump(lambda: "Paused" in window.office_bar.status_label.get_text(), 10, "the status line to say so")
    before = other.session("kubuntu")["LastChange"]
    click(xdisplay, window.office_bar.buttons["Reset"])
    pump(lambda: other.prop(office, iface, "State") == "idle", 60, "the office to reset")
    pump(lambda: "Not started" in window.office_bar.status_label.get_text(), 10, "the status line to say so")
    other.wait_state("kubuntu", {"running"})
    assert other.session("kubuntu")["LastChange"] > before
