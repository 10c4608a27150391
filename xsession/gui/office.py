"""The office view's controls: Start, Pause and Reset of the medium's office, and a line
with its state, its counters and the latest activity a desktop reported.

The consoles beside it are the window's side-by-side machinery
(:meth:`~.window.MainWindow.show_office`); this bar only speaks to the client, so
what it shows is what the daemon says (``Office`` properties and ``Activity``
signals), never what a click hoped for.
"""

from __future__ import annotations

import time
from typing import Any

import gi

gi.require_version("Gtk", "3.0")
gi.require_version("Pango", "1.0")
from gi.repository import GObject, Gtk, Pango  # noqa: E402

from .client import Office, SessionsClient  # noqa: E402

__all__ = ["OfficeBar", "STATE_WORDS", "describe_office"]

STATE_WORDS = {"absent": "No office on this medium", "idle": "Not started", "running": "Working",
               "paused": "Paused"}
#: which buttons each state offers
_BUTTONS = {"idle": {"Start", "Reset"}, "running": {"Pause", "Reset"}, "paused": {"Start", "Reset"}}


def describe_office(office: Office | None, latest: tuple[float, str, str, str] | None = None) -> str:
    """One line for a person: the state, the counters, the latest activity."""
    if office is None:
        return STATE_WORDS["absent"]
    c: dict[str, Any] = office.counters
    text = (f"Office: {STATE_WORDS.get(office.state, office.state)} · documents {c.get('Saved', 0)} saved, "
            f"{c.get('Read', 0)} read · events {c.get('Added', 0)} added, {c.get('Seen', 0)} seen")
    first = c.get("FirstRead", -1.0)
    if isinstance(first, float) and first >= 0:
        text += f" · first shared document after {first:.1f} s"
    problems = [f"{d}: no {p}" for d, (_, p) in sorted(office.workers.items()) if p]
    if problems:
        text += " · " + ", ".join(problems)
    if latest is not None:
        at, session, kind, item = latest
        text += f" · latest: {time.strftime('%H:%M:%S', time.localtime(at))} {session} {kind} {item}"
    return text


class OfficeBar(Gtk.Box):
    """The office's buttons and status line. Signal: ``back()`` the person wants the chooser."""

    __gsignals__ = {"back": (GObject.SignalFlags.RUN_LAST, None, ())}

    def __init__(self, client: SessionsClient):
        super().__init__(orientation=Gtk.Orientation.HORIZONTAL, spacing=6, margin=4)
        self.client = client
        self.get_style_context().add_class("console-bar")
        back = Gtk.Button(label="Back")
        back.connect("clicked", lambda _b: self.emit("back"))
        self.pack_start(back, False, False, 0)
        self.buttons: dict[str, Gtk.Button] = {}
        for method in ("Start", "Pause", "Reset"):
            b = Gtk.Button(label=method)
            b.connect("clicked", lambda _b, m=method: self.client.office_call(m))
            self.buttons[method] = b
            self.pack_start(b, False, False, 0)
        self.buttons["Start"].get_style_context().add_class("suggested-action")
        self.status_label = Gtk.Label(xalign=0, ellipsize=Pango.EllipsizeMode.END)
        self.pack_start(self.status_label, True, True, 6)
        self._handlers = [client.connect("office-changed", lambda _c, _ch: self.update()),
                          client.connect("office-activity", lambda _c, _a: self.update())]
        self.connect("destroy", lambda _w: [client.disconnect(h) for h in self._handlers])
        self.update()

    def update(self) -> None:
        office = self.client.office
        latest = self.client.activity[-1] if self.client.activity else None
        self.status_label.set_text(describe_office(office, latest))
        offered = _BUTTONS.get(office.state, set()) if office is not None else set()
        for method, b in self.buttons.items():
            b.set_sensitive(method in offered)
