"""The flavour chooser: one card per session, built and updated from the client's signals."""

from __future__ import annotations

from typing import Any

import gi

gi.require_version("Gtk", "3.0")
from gi.repository import GLib, GObject, Gtk  # noqa: E402

from .client import ACTIVE_STATES, Session, SessionsClient, actions_for  # noqa: E402

__all__ = ["SessionCard", "Chooser", "STATE_WORDS"]

#: what a person reads for each state
STATE_WORDS = {
    "available": "Not started",
    "queued": "Waiting to be restored",
    "restoring": "Restoring",
    "booting": "Starting from scratch",
    "running": "Running",
    "paused": "Paused",
    "stopped": "Stopped",
    "failed": "Failed",
}
_BUSY = frozenset({"queued", "restoring", "booting"})


class SessionCard(Gtk.Frame):
    """One flavour: title, default mark, state, progress, memory and the actions its state allows.

    Signals: ``switch()`` show this session (starting it if needed); ``action(method)`` a Session method;
    ``split-toggled(bool)`` picked for the side-by-side view.
    """

    __gsignals__ = {
        "switch": (GObject.SignalFlags.RUN_LAST, None, ()),
        "action": (GObject.SignalFlags.RUN_LAST, None, (str,)),
        "split-toggled": (GObject.SignalFlags.RUN_LAST, None, (bool,)),
    }

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.get_style_context().add_class("session-card")
        self.set_size_request(260, -1)
        box = Gtk.Box(orientation=Gtk.Orientation.VERTICAL, spacing=6, margin=12)
        self.add(box)
        top = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=6)
        self.title_label = Gtk.Label(xalign=0)
        self.title_label.get_style_context().add_class("card-title")
        self.default_label = Gtk.Label(label="default")
        self.default_label.get_style_context().add_class("default-badge")
        self.default_label.set_no_show_all(True)
        top.pack_start(self.title_label, True, True, 0)
        top.pack_end(self.default_label, False, False, 0)
        box.pack_start(top, False, False, 0)
        self.state_label = Gtk.Label(xalign=0)
        self.state_label.get_style_context().add_class("card-state")
        box.pack_start(self.state_label, False, False, 0)
        self.reason_label = Gtk.Label(xalign=0, wrap=True, max_width_chars=34)
        self.reason_label.get_style_context().add_class("dim-label")
        box.pack_start(self.reason_label, False, False, 0)
        self.progress = Gtk.ProgressBar(show_text=True)
        self.progress.set_no_show_all(True)
        box.pack_start(self.progress, False, False, 0)
        self.memory_label = Gtk.Label(xalign=0)
        self.memory_label.get_style_context().add_class("dim-label")
        box.pack_start(self.memory_label, False, False, 0)

        buttons = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=4)
        self.show_button = Gtk.Button(label="Switch to")
        self.show_button.get_style_context().add_class("suggested-action")
        self.show_button.connect("clicked", lambda _b: self.emit("switch"))
        buttons.pack_start(self.show_button, False, False, 0)
        self.action_buttons: dict[str, Gtk.Button] = {}
        for method in ("Pause", "Resume", "Stop", "Reset"):
            b = Gtk.Button(label=method)
            b.connect("clicked", lambda _b, m=method: self.emit("action", m))
            b.set_no_show_all(True)
            self.action_buttons[method] = b
            buttons.pack_start(b, False, False, 0)
        box.pack_start(buttons, False, False, 0)
        self.split_check = Gtk.CheckButton(label="Side by side")
        self.split_check.set_tooltip_text("Show this session next to the others picked (\"Side by side\" above)")
        self.split_check.connect("toggled", lambda b: self.emit("split-toggled", b.get_active()))
        box.pack_start(self.split_check, False, False, 0)

    def update(self, s: Session, is_default: bool) -> None:
        """Show ``s`` as it is now."""
        self.title_label.set_markup(f"<big><b>{GLib.markup_escape_text(s.title or s.name)}</b></big>")
        self.default_label.set_visible(is_default)
        self.state_label.set_markup(f"<b>{GLib.markup_escape_text(STATE_WORDS.get(s.state, s.state))}</b>")
        self.reason_label.set_text(s.reason)
        self.reason_label.set_visible(bool(s.reason))
        busy = s.state in _BUSY
        self.progress.set_visible(busy)
        if busy:
            self.progress.set_fraction(max(0.0, min(1.0, s.progress)))
            self.progress.set_text(f"{s.progress:.0%}" + (f" of {s.bytes_total / 1e6:.0f} MB" if s.bytes_total else ""))
        self.memory_label.set_text(f"Memory: {s.memory_mib} MiB")
        self.show_button.set_label("Switch to" if s.state in ACTIVE_STATES or busy else "Start")
        allowed = set(actions_for(s.state))
        for method, b in self.action_buttons.items():
            b.set_visible(method in allowed)
        self.split_check.set_sensitive(s.state in ACTIVE_STATES or busy)
        self.set_tooltip_text(f"{s.name}: {s.state}")


class Chooser(Gtk.Box):
    """All the sessions as cards, in restore order, with the manager's memory and warnings.

    Signals: ``switch(name)``, ``action(name, method)``, ``split()`` the side-by-side
    view of the picked sessions.
    """

    __gsignals__ = {
        "switch": (GObject.SignalFlags.RUN_LAST, None, (str,)),
        "action": (GObject.SignalFlags.RUN_LAST, None, (str, str)),
        "split": (GObject.SignalFlags.RUN_LAST, None, ()),
    }

    def __init__(self, client: SessionsClient):
        super().__init__(orientation=Gtk.Orientation.VERTICAL, spacing=8, margin=16)
        self.client = client
        self.cards: dict[str, SessionCard] = {}
        self.picked: set[str] = set()
        head = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=8)
        heading = Gtk.Label(xalign=0)
        heading.set_markup("<big><b>Choose a flavour</b></big>")
        head.pack_start(heading, False, False, 0)
        self.memory_label = Gtk.Label(xalign=0)
        self.memory_label.get_style_context().add_class("dim-label")
        head.pack_start(self.memory_label, True, True, 12)
        self.split_button = Gtk.Button(label="Side by side")
        self.split_button.set_tooltip_text("Show the picked sessions (or all that run) next to each other")
        self.split_button.connect("clicked", lambda _b: self.emit("split"))
        head.pack_end(self.split_button, False, False, 0)
        self.pack_start(head, False, False, 0)
        self.flow = Gtk.FlowBox(selection_mode=Gtk.SelectionMode.NONE, homogeneous=True,
                                column_spacing=12, row_spacing=12, max_children_per_line=4,
                                valign=Gtk.Align.START)
        scroller = Gtk.ScrolledWindow(hscrollbar_policy=Gtk.PolicyType.NEVER)
        scroller.add(self.flow)
        self.pack_start(scroller, True, True, 0)
        self.empty_label = Gtk.Label(wrap=True)
        self.pack_start(self.empty_label, False, False, 0)
        self.warnings_label = Gtk.Label(xalign=0, wrap=True)
        self.warnings_label.get_style_context().add_class("dim-label")
        self.pack_end(self.warnings_label, False, False, 0)

        client.connect("session-added", lambda _c, n: self._add(n))
        client.connect("session-removed", lambda _c, n: self._remove(n))
        client.connect("session-changed", lambda _c, n, _ch: self._update(n))
        client.connect("manager-changed", lambda _c, _ch: self._update_manager())
        client.connect("connected", lambda _c: self._update_manager())
        client.connect("disconnected", lambda _c: self._update_manager())
        for n in client.sessions:
            self._add(n)
        self._update_manager()

    def _add(self, name: str) -> None:
        if name in self.cards:
            self._update(name)
            return
        card = SessionCard(name)
        card.connect("switch", lambda _c: self.emit("switch", name))
        card.connect("action", lambda _c, m: self.emit("action", name, m))
        card.connect("split-toggled", lambda _c, on: (self.picked.add if on else self.picked.discard)(name))
        self.cards[name] = card
        self.flow.add(card)
        card.show_all()
        self._reorder()
        self._update(name)

    def _reorder(self) -> None:
        """Cards in the daemon's restore order (priority)."""
        order = {s.name: i for i, s in enumerate(sorted(self.client.sessions.values(),
                                                        key=lambda s: (s.priority, s.name)))}
        index = {n: order.get(n, 99) for n in self.cards}
        self.flow.set_sort_func(lambda a, b: index.get(a.get_child().name, 99) - index.get(b.get_child().name, 99))
        self.flow.invalidate_sort()

    def _remove(self, name: str) -> None:
        card = self.cards.pop(name, None)
        self.picked.discard(name)
        if card is not None:
            self.flow.remove(card.get_parent())
            card.destroy()
        self._update_manager()

    def _update(self, name: str) -> None:
        s = self.client.sessions.get(name)
        card = self.cards.get(name)
        if s is None or card is None:
            return
        card.update(s, s.name == self.client.manager.default_flavour)

    def _update_manager(self) -> None:
        m = self.client.manager
        for name in self.cards:
            self._update(name)
        mem: dict[str, Any] = m.memory
        if self.client.is_connected and "available_mib" in mem:
            self.memory_label.set_text(f"Memory: {mem.get('committed_mib', 0)} MiB in use by sessions, "
                                       f"{mem.get('available_mib', 0)} MiB free for more")
        else:
            self.memory_label.set_text("")
        if not self.client.is_connected:
            self.empty_label.set_text("The session manager is not running. Waiting for it…")
        elif not self.cards:
            why = m.medium.get("error") if m.medium else ""
            self.empty_label.set_text(f"No flavours to choose from. {why}".strip())
        else:
            self.empty_label.set_text("")
        self.empty_label.set_visible(bool(self.empty_label.get_text()))
        self.warnings_label.set_text("\n".join(m.warnings) if self.client.is_connected else "")
