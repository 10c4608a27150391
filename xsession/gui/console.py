"""One session's display: a GtkVnc view that follows the session and reconnects by itself.

A console never asks the daemon anything: it watches the client's
``session-changed`` signal. When the session gets a display (it runs or is
paused) the view connects to the ``vnc`` address of its ``Console`` property;
when the display goes away (reset, stop, a restore again) it shows why and
connects again as soon as the session has a display once more. A dropped
connection while the session still runs (QEMU replaced under the same
address before the signal arrived) is retried with a short back-off.

QEMU's VNC server is a unix socket in the session's run folder; the view
connects the socket itself and hands the fd to GtkVnc, which owns and closes it.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import gi

gi.require_version("Gtk", "3.0")
gi.require_version("Gdk", "3.0")
gi.require_version("GtkVnc", "2.0")
from gi.repository import Gdk, GLib, GObject, Gtk, GtkVnc  # noqa: E402

from .client import ACTIVE_STATES, Session, SessionsClient  # noqa: E402

__all__ = ["ConsoleView", "HOST_KEY", "HOST_KEY_LABEL", "CTRL_ALT_DEL"]

log = logging.getLogger(__name__)

#: the key that always brings the chooser back, whatever the guest holds (docs/gui.md)
HOST_KEY = (Gdk.ModifierType.CONTROL_MASK | Gdk.ModifierType.MOD1_MASK, Gdk.KEY_Home)
HOST_KEY_LABEL = "Ctrl+Alt+Home"
CTRL_ALT_DEL = [Gdk.KEY_Control_L, Gdk.KEY_Alt_L, Gdk.KEY_Delete]
#: a dropped display of a running session is tried again after this, doubling up to the maximum
RETRY_FIRST_MS = 100
RETRY_MAX_MS = 2000

_WAITING = {
    "available": "{title} is not running. Start it from the chooser.",
    "queued": "{title} is waiting for its turn to be restored…",
    "restoring": "{title} is being restored… {percent}",
    "booting": "{title} is starting from scratch (its saved state could not be used)…",
    "stopped": "{title} is stopped.",
    "failed": "{title} failed: {reason}",
}


class ConsoleView(Gtk.Box):
    """A session's display with a small bar: its name, state, keyboard, Ctrl+Alt+Del, full window, back.

    Signals: ``back()`` the person wants the chooser; ``full-window()`` show this one
    alone; ``keyboard-changed(bool)`` this view took or lost the keyboard.
    """

    __gsignals__ = {
        "back": (GObject.SignalFlags.RUN_LAST, None, ()),
        "full-window": (GObject.SignalFlags.RUN_LAST, None, ()),
        "keyboard-changed": (GObject.SignalFlags.RUN_LAST, None, (bool,)),
    }

    def __init__(self, client: SessionsClient, name: str, *, split: bool = False):
        super().__init__(orientation=Gtk.Orientation.VERTICAL, spacing=0)
        self.client = client
        self.name = name
        self.split = split
        self.connections = 0        # how many times a display came up (a reconnect counts)
        self.connected = False
        self._address = ""          # what we are connected or connecting to
        self._state = ""
        self._retry_id = 0
        self._retry_ms = RETRY_FIRST_MS
        self._closed = False
        self.get_style_context().add_class("console")

        bar = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=6)
        bar.get_style_context().add_class("console-bar")
        self.title_label = Gtk.Label(xalign=0)
        self.state_label = Gtk.Label(xalign=0)
        self.state_label.get_style_context().add_class("dim-label")
        bar.pack_start(self.title_label, False, False, 6)
        bar.pack_start(self.state_label, True, True, 0)
        self.keyboard_button = Gtk.Button(label="Keyboard")
        self.keyboard_button.set_tooltip_text("Send the keyboard to this session "
                                              f"({HOST_KEY_LABEL} always returns to the chooser)")
        self.keyboard_button.connect("clicked", lambda _b: self.take_keyboard())
        self.cad_button = Gtk.Button(label="Ctrl+Alt+Del")
        self.cad_button.set_tooltip_text("Send Ctrl+Alt+Del to this session")
        self.cad_button.connect("clicked", lambda _b: self.send_ctrl_alt_del())
        bar.pack_end(Gtk.Label(), False, False, 0)
        if split:
            self.full_button = Gtk.Button(label="Full window")
            self.full_button.connect("clicked", lambda _b: self.emit("full-window"))
            bar.pack_end(self.full_button, False, False, 0)
        self.back_button = Gtk.Button(label="Chooser")
        self.back_button.set_tooltip_text(f"Back to the chooser ({HOST_KEY_LABEL})")
        self.back_button.connect("clicked", lambda _b: self.emit("back"))
        bar.pack_end(self.back_button, False, False, 0)
        bar.pack_end(self.cad_button, False, False, 0)
        bar.pack_end(self.keyboard_button, False, False, 0)
        self.pack_start(bar, False, False, 2)

        self.display = GtkVnc.Display()
        self.display.set_scaling(True)
        self.display.set_keep_aspect_ratio(True)
        self.display.set_keyboard_grab(True)
        self.display.set_pointer_grab(False)     # a relative mouse must never trap the pointer
        self.display.set_shared_flag(True)       # other front-ends may watch the same session
        self.display.set_hexpand(True)
        self.display.set_vexpand(True)
        self.display.connect("vnc-initialized", self._on_initialized)
        self.display.connect("vnc-disconnected", self._on_disconnected)
        self.display.connect("vnc-error", lambda _d, msg: log.warning("%s display: %s", name, msg))
        self.display.connect("focus-in-event", lambda *_: self._keyboard(True))
        self.display.connect("focus-out-event", lambda *_: self._keyboard(False))
        self.waiting_label = Gtk.Label(wrap=True, justify=Gtk.Justification.CENTER)
        self.waiting_label.get_style_context().add_class("console-waiting")
        overlay = Gtk.Overlay()
        overlay.add(self.display)
        overlay.add_overlay(self.waiting_label)
        overlay.set_overlay_pass_through(self.waiting_label, True)
        self.pack_start(overlay, True, True, 0)

        self._changed_id = client.connect("session-changed", self._on_session_changed)
        self._removed_id = client.connect("session-removed", lambda _c, n: n == name and self._follow())
        self._added_id = client.connect("session-added", lambda _c, n: n == name and self._follow())
        self._daemon_ids = [client.connect(sig, lambda _c: self._follow()) for sig in ("connected", "disconnected")]
        self.connect("destroy", lambda _w: self.close())
        self._follow()

    # -- following the session ------------------------------------------------------
    @property
    def session(self) -> Session | None:
        return self.client.sessions.get(self.name)

    def _on_session_changed(self, _client: SessionsClient, name: str, changed: Any) -> None:
        if name != self.name:
            return
        s = self.session
        renewed = s is not None and bool(s.vnc) and (
            "Console" in (changed or ()) or ("State" in (changed or ()) and self._state not in ACTIVE_STATES))
        self._follow(force=renewed)

    def _follow(self, force: bool = False) -> None:
        """Match the view to the session: connect, reconnect, or say why there is nothing to show."""
        if self._closed:
            return
        s = self.session
        if s is None and self.connected:
            # the daemon withdrew the session (it is stopping or restarting, and its guests
            # outlive it): the display itself says whether the guest is still there
            self.state_label.set_text("session manager not running" if not self.client.is_connected
                                      else "no longer managed")
            return
        self._state = s.state if s is not None else ""
        title = s.title if s is not None and s.title else self.name
        self.title_label.set_markup(f"<b>{GLib.markup_escape_text(title)}</b>")
        self.state_label.set_text(self._state or "gone")
        self.cad_button.set_sensitive(self._state == "running")
        self.keyboard_button.set_sensitive(self._state in ACTIVE_STATES)
        want = s.vnc if s is not None else ""
        if want != self._address or force:
            self._disconnect()
            self._address = want
            if want:
                self._connect()
        self._show_waiting()

    def _show_waiting(self) -> None:
        s = self.session
        if s is None:
            text = f"{self.name} is not known to the session manager."
            if not self.client.is_connected:
                text = "The session manager is not running; waiting for it to come back…"
        elif s.state in ACTIVE_STATES:
            text = "" if self.connected else f"Connecting to {s.title or s.name}…"
            if s.state == "paused" and self.connected:
                text = f"{s.title or s.name} is paused."
        else:
            text = _WAITING.get(s.state, "{title}: {state}").format(
                title=s.title or s.name, state=s.state, reason=s.reason,
                percent=f"{s.progress:.0%}" if s.progress else "")
        self.waiting_label.set_text(text)
        self.waiting_label.set_visible(bool(text))

    # -- the connection --------------------------------------------------------------
    def _connect(self) -> bool:
        """Open the display at :attr:`_address`; a socket that is not there yet is tried again."""
        self._retry_id = 0
        if self._closed or not self._address:
            return GLib.SOURCE_REMOVE
        address = self._address
        try:
            if address.startswith("unix:"):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(address[len("unix:"):])
                except OSError:
                    sock.close()
                    raise
                self.display.open_fd(sock.detach())   # GtkVnc owns the fd from here and closes it
            else:
                host, _, port = address.rpartition(":")
                self.display.open_host(host.strip("[]"), port)
        except OSError as e:
            log.info("%s: display at %s not reachable yet: %s", self.name, address, e)
            self._schedule_retry()
        return GLib.SOURCE_REMOVE

    def _schedule_retry(self) -> None:
        if self._retry_id or self._closed or not self._address:
            return
        self._retry_id = GLib.timeout_add(self._retry_ms, self._connect)
        self._retry_ms = min(self._retry_ms * 2, RETRY_MAX_MS)

    def _disconnect(self) -> None:
        if self._retry_id:
            GLib.source_remove(self._retry_id)
            self._retry_id = 0
        self._retry_ms = RETRY_FIRST_MS
        self._address = ""
        if self.display.is_open():
            self.display.close()
        self.connected = False

    def _on_initialized(self, _display: GtkVnc.Display) -> None:
        self.connected = True
        self.connections += 1
        self._retry_ms = RETRY_FIRST_MS
        log.info("%s: display connected (%d)", self.name, self.connections)
        self._show_waiting()

    def _on_disconnected(self, _display: GtkVnc.Display) -> None:
        self.connected = False
        if self._closed:
            return
        log.info("%s: display disconnected", self.name)
        self._show_waiting()
        s = self.session
        if self._address and s is not None and s.vnc == self._address:
            self._schedule_retry()   # the session still has a display: QEMU was replaced or restarted

    # -- keyboard ---------------------------------------------------------------------
    def take_keyboard(self) -> None:
        """Send the keyboard to this session (its display takes the focus)."""
        self.display.grab_focus()

    def has_keyboard(self) -> bool:
        return self.display.has_focus()

    def _keyboard(self, on: bool) -> bool:
        ctx = self.get_style_context()
        (ctx.add_class if on else ctx.remove_class)("has-keyboard")
        self.emit("keyboard-changed", on)
        return False

    def send_ctrl_alt_del(self) -> None:
        """Ctrl+Alt+Del never reaches a guest from a real keyboard (the host takes it): send it."""
        if self.connected:
            self.display.send_keys(CTRL_ALT_DEL)

    def close(self) -> None:
        """Drop the display and stop following the session; idempotent."""
        if self._closed:
            return
        self._disconnect()
        self._closed = True
        for hid in (self._changed_id, self._removed_id, self._added_id, *self._daemon_ids):
            self.client.disconnect(hid)
