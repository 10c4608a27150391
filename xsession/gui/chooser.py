"""The flavour chooser: one card per session, built and updated from the client's signals.

Each card shows what its flavour looks like (``GetPicture``): the screen of a
running or paused session, asked for again every :data:`REFRESH_S` seconds
while the chooser is shown; the still saved at mastering for a session that does
not run, asked for once (when its card appears or the session stops); a neutral
placeholder with the title when there is neither. Calls are asynchronous, one
at a time per card, and PNGs are decoded in a worker thread, so the main loop
never waits; an answer that comes back after the session started or stopped is
dropped; a failed call keeps the picture the card has.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import gi

gi.require_version("Gtk", "3.0")
gi.require_version("Gdk", "3.0")
gi.require_version("GdkPixbuf", "2.0")
from gi.repository import Gdk, GdkPixbuf, GLib, GObject, Gtk  # noqa: E402

from .client import ACTIVE_STATES, Session, SessionsClient, actions_for  # noqa: E402

__all__ = ["SessionCard", "Chooser", "STATE_WORDS", "SOURCE_WORDS", "PICTURE_SIZE", "REFRESH_S", "picture_from_png"]

log = logging.getLogger(__name__)

#: the picture area of a card; a picture is scaled into it, keeping its aspect ratio
PICTURE_SIZE = (240, 180)
#: the daemon makes a live picture smaller by picking pixels (no filter), which
#: garbles text; asking for twice the width and scaling it down here with a
#: filter keeps a screen's text legible
PICTURE_OVERSAMPLE = 2
#: how often the live pictures are asked for while the chooser is shown
#: (the daemon takes a new one at most once a second)
REFRESH_S = 3

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
#: what kind of system a flavour is (the Session's ``Source``)
SOURCE_WORDS = {"initrd": "Demo system", "disk": "Installed system", "iso": "Live ISO"}


def picture_from_png(png: bytes, width: int, height: int) -> GdkPixbuf.Pixbuf:
    """The PNG scaled down to fit ``width`` x ``height`` (never up), its aspect ratio kept.

    :raises GLib.Error: not a PNG that GdkPixbuf can read.
    """
    def fit(loader: GdkPixbuf.PixbufLoader, w: int, h: int) -> None:
        scale = min(1.0, width / max(1, w), height / max(1, h))
        loader.set_size(max(1, round(w * scale)), max(1, round(h * scale)))

    loader = GdkPixbuf.PixbufLoader.new_with_type("png")
    loader.connect("size-prepared", fit)
    try:
        loader.write(png)
    finally:
        loader.close()   # raises too if the data ended early
    pixbuf = loader.get_pixbuf()
    if pixbuf is None:
        raise GLib.Error("no picture in the PNG")
    return pixbuf


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

        # what it looks like: a picture, or a placeholder with the title
        width, height = PICTURE_SIZE
        self.picture = Gtk.Image()
        self.placeholder = Gtk.Label(wrap=True, justify=Gtk.Justification.CENTER, max_width_chars=20)
        self.placeholder.get_style_context().add_class("card-placeholder")
        self.picture_stack = Gtk.Stack(transition_type=Gtk.StackTransitionType.NONE)
        self.picture_stack.get_style_context().add_class("card-picture")
        self.picture_stack.set_size_request(width, height)
        self.picture_stack.set_halign(Gtk.Align.CENTER)
        self.picture_stack.add_named(self.placeholder, "placeholder")
        self.picture_stack.add_named(self.picture, "picture")
        #: what the card shows: "live", "still", or "" (the placeholder)
        self.picture_kind = ""
        #: pictures shown so far (each refresh that brought one counts)
        self.pictures_shown = 0
        box.pack_start(self.picture_stack, False, False, 0)
        box.pack_start(top, False, False, 0)
        # what it is
        self.description_label = Gtk.Label(xalign=0, wrap=True, max_width_chars=30)
        self.description_label.set_no_show_all(True)
        self.description_label.get_style_context().add_class("card-description")
        box.pack_start(self.description_label, False, False, 0)
        self.state_label = Gtk.Label(xalign=0)
        self.state_label.get_style_context().add_class("card-state")
        box.pack_start(self.state_label, False, False, 0)
        self.reason_label = Gtk.Label(xalign=0, wrap=True, max_width_chars=30)
        self.reason_label.get_style_context().add_class("dim-label")
        box.pack_start(self.reason_label, False, False, 0)
        self.progress = Gtk.ProgressBar(show_text=True)
        self.progress.set_no_show_all(True)
        box.pack_start(self.progress, False, False, 0)
        self.memory_label = Gtk.Label(xalign=0)
        self.memory_label.get_style_context().add_class("dim-label")
        self.source_label = Gtk.Label(xalign=1)
        self.source_label.get_style_context().add_class("dim-label")
        self.source_label.set_no_show_all(True)
        facts = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=6)
        facts.pack_start(self.memory_label, True, True, 0)
        facts.pack_end(self.source_label, False, False, 0)
        box.pack_start(facts, False, False, 0)

        # two rows, so that four cards fit side by side in a 1200-pixel window
        main = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=6)
        self.show_button = Gtk.Button(label="Switch to")
        self.show_button.get_style_context().add_class("suggested-action")
        self.show_button.connect("clicked", lambda _b: self.emit("switch"))
        main.pack_start(self.show_button, False, False, 0)
        self.split_check = Gtk.CheckButton(label="Side by side")
        self.split_check.set_tooltip_text("Show this session next to the others picked (\"Side by side\" above)")
        self.split_check.connect("toggled", lambda b: self.emit("split-toggled", b.get_active()))
        main.pack_end(self.split_check, False, False, 0)
        box.pack_start(main, False, False, 0)
        actions = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=4)
        self.action_buttons: dict[str, Gtk.Button] = {}
        for method in ("Pause", "Resume", "Stop", "Reset"):
            b = Gtk.Button(label=method)
            b.connect("clicked", lambda _b, m=method: self.emit("action", m))
            b.set_no_show_all(True)
            self.action_buttons[method] = b
            actions.pack_start(b, False, False, 0)
        box.pack_start(actions, False, False, 0)

    def update(self, s: Session, is_default: bool) -> None:
        """Show ``s`` as it is now."""
        self.title_label.set_markup(f"<big><b>{GLib.markup_escape_text(s.title or s.name)}</b></big>")
        self.placeholder.set_text(s.title or s.name)
        self.description_label.set_text(s.description)
        self.description_label.set_visible(bool(s.description))
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
        self.source_label.set_text(SOURCE_WORDS.get(s.source, s.source))
        self.source_label.set_visible(bool(s.source))
        self.show_button.set_label("Switch to" if s.state in ACTIVE_STATES or busy else "Start")
        allowed = set(actions_for(s.state))
        for method, b in self.action_buttons.items():
            b.set_visible(method in allowed)
        self.split_check.set_sensitive(s.state in ACTIVE_STATES or busy)
        self.set_tooltip_text(f"{s.name}: {s.state}")

    def show_picture(self, png: bytes, kind: str) -> bool:
        """Show a ``GetPicture`` answer: the picture fitted to the card, or the placeholder
        when there is none. A PNG that cannot be read keeps what the card shows (False).

        This decodes in the calling thread; the chooser decodes in its worker and
        calls :meth:`show_pixbuf`.
        """
        if not png:
            self.show_pixbuf(None, "")
            return True
        try:
            pixbuf = picture_from_png(png, *PICTURE_SIZE)
        except GLib.Error as e:
            log.warning("%s: a %s picture that cannot be read: %s", self.name, kind, e.message)
            return False
        self.show_pixbuf(pixbuf, kind)
        return True

    def show_pixbuf(self, pixbuf: GdkPixbuf.Pixbuf | None, kind: str) -> None:
        """Show a picture already fitted to the card, or the placeholder (None)."""
        if pixbuf is None:
            self.picture.clear()
            self.picture_stack.set_visible_child_name("placeholder")
            self.picture_kind = ""
            return
        self.picture.set_from_pixbuf(pixbuf)
        self.picture_stack.set_visible_child_name("picture")
        self.picture_kind = kind
        self.pictures_shown += 1


class Chooser(Gtk.Box):
    """All the sessions as cards, in restore order, with the manager's memory and warnings.

    Signals: ``switch(name)``, ``action(name, method)``, ``split()`` the side-by-side
    view of the picked sessions, ``install(path)`` show a pending install request,
    ``office()`` the office view (offered when the medium has an office).
    """

    __gsignals__ = {
        "switch": (GObject.SignalFlags.RUN_LAST, None, (str,)),
        "action": (GObject.SignalFlags.RUN_LAST, None, (str, str)),
        "split": (GObject.SignalFlags.RUN_LAST, None, ()),
        "install": (GObject.SignalFlags.RUN_LAST, None, (str,)),
        "office": (GObject.SignalFlags.RUN_LAST, None, ()),
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
        self.office_button = Gtk.Button(label="Office")
        self.office_button.set_tooltip_text("The office: its server and desktops side by side, started together")
        self.office_button.set_no_show_all(True)
        self.office_button.connect("clicked", lambda _b: self.emit("office"))
        head.pack_end(self.office_button, False, False, 0)
        # a guest's install request that waits (its dialog was put off with "Not now")
        self.install_button = Gtk.Button()
        self.install_button.get_style_context().add_class("suggested-action")
        self.install_button.set_no_show_all(True)
        self.install_button.connect("clicked", lambda _b: self._pending and self.emit("install", self._pending[0]))
        head.pack_end(self.install_button, False, False, 0)
        self._pending: list[str] = []
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

        # pictures: name -> "live" or "still" (which kind the card should show), the
        # generation of that choice (an answer to an older one is dropped), the
        # generation of the call in flight, and the cards whose still is due
        self._picture_mode: dict[str, str] = {}
        self._picture_gen: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        self._still_due: set[str] = set()
        self._refresh_id = 0
        # PNGs are decoded here, one at a time, off the main loop (GdkPixbuf lets go of
        # Python's lock while it decodes); the results come back with idle_add
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chooser-pictures")
        self.connect("map", lambda _w: self._start_refresh())
        self.connect("unmap", lambda _w: self._stop_refresh())
        self.connect("destroy", lambda _w: self._decoder.shutdown(wait=False, cancel_futures=True))

        client.connect("session-added", lambda _c, n: self._add(n))
        client.connect("session-removed", lambda _c, n: self._remove(n))
        client.connect("session-changed", lambda _c, n, _ch: self._update(n))
        client.connect("manager-changed", lambda _c, _ch: self._update_manager())
        client.connect("connected", lambda _c: self._update_manager())
        client.connect("disconnected", lambda _c: self._update_manager())
        for signal in ("job-added", "job-removed"):
            client.connect(signal, lambda _c, _p: self._update_jobs())
        client.connect("job-changed", lambda _c, _p, _ch: self._update_jobs())
        client.connect("office-changed", lambda _c, _ch: self.office_button.set_visible(client.office is not None))
        for n in client.sessions:
            self._add(n)
        self._update_manager()

    def _update_jobs(self) -> None:
        """The install requests that wait for a person, oldest first, on one button."""
        jobs = sorted((j for j in self.client.jobs.values() if j.state == "pending"), key=lambda j: j.number)
        self._pending = [j.path for j in jobs]
        if jobs:
            first = self.client.sessions.get(jobs[0].session)
            title = first.title if first is not None and first.title else jobs[0].flavour
            more = f" (+{len(jobs) - 1})" if len(jobs) > 1 else ""
            self.install_button.set_label(f"Install request: {title}{more}")
        self.install_button.set_visible(bool(jobs))

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
        # the generation stays: an answer still on its way for this card is then dropped
        self._picture_mode.pop(name, None)
        self._in_flight.pop(name, None)
        self._still_due.discard(name)
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
        mode = "live" if s.state in ACTIVE_STATES else "still"
        if self._picture_mode.get(name) != mode:
            # it appeared, started or stopped: what the card shows comes from a new call
            self._picture_mode[name] = mode
            self._picture_gen[name] = self._picture_gen.get(name, 0) + 1
            if mode == "still":
                self._still_due.add(name)
            else:
                self._still_due.discard(name)
            if self.shown:
                self._ask_picture(name)

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

    # -- pictures ------------------------------------------------------------------------
    @property
    def shown(self) -> bool:
        """Whether a person can see the chooser: mapped (not behind a console, its window
        shown) and the window neither minimized nor withdrawn."""
        if not self.get_mapped():
            return False
        window = self.get_toplevel().get_window()
        hidden = Gdk.WindowState.ICONIFIED | Gdk.WindowState.WITHDRAWN
        return window is not None and not window.get_state() & hidden

    def _start_refresh(self) -> None:
        """The chooser came into view: pictures now, and the live ones again every REFRESH_S."""
        if not self._refresh_id:
            self._refresh_id = GLib.timeout_add_seconds(REFRESH_S, self._refresh)
        self._refresh()

    def _stop_refresh(self) -> None:
        """Out of view (a console is shown, the window hidden): no more calls."""
        if self._refresh_id:
            GLib.source_remove(self._refresh_id)
            self._refresh_id = 0

    def _refresh(self) -> bool:
        if self.shown:
            for name in list(self.cards):
                if self._picture_mode.get(name) == "live" or name in self._still_due:
                    self._ask_picture(name)
        return GLib.SOURCE_CONTINUE

    def _ask_picture(self, name: str) -> None:
        """One ``GetPicture`` for ``name``, unless one for the same generation is on its way."""
        gen = self._picture_gen.get(name, 0)
        if self._in_flight.get(name) == gen or not self.client.is_connected:
            return
        self._in_flight[name] = gen
        self._still_due.discard(name)
        width = PICTURE_SIZE[0] * PICTURE_OVERSAMPLE * max(1, self.get_scale_factor())
        self.client.get_picture(name, width,
                                lambda png, kind: self._got_picture(name, gen, png, kind),
                                lambda why: self._no_picture(name, gen, why))

    def _got_picture(self, name: str, gen: int, png: bytes, kind: str) -> None:
        if self._in_flight.get(name) == gen:
            del self._in_flight[name]
        card = self.cards.get(name)
        if card is None or self._picture_gen.get(name) != gen:
            return   # the session started or stopped since: a newer call tells
        if not png:
            if self._picture_mode.get(name) == "live" and card.picture_kind:
                return   # no screen this time (a screendump failed): keep the one shown
            card.show_pixbuf(None, "")
            return

        def decode() -> None:   # in the worker: a large still takes a while to read
            try:
                pixbuf: GdkPixbuf.Pixbuf | None = picture_from_png(png, *PICTURE_SIZE)
            except GLib.Error as e:
                log.warning("%s: a %s picture that cannot be read: %s", name, kind, e.message)
                pixbuf = None
            GLib.idle_add(self._decoded, name, gen, pixbuf, kind)

        self._decoder.submit(decode)

    def _decoded(self, name: str, gen: int, pixbuf: GdkPixbuf.Pixbuf | None, kind: str) -> bool:
        card = self.cards.get(name)
        if pixbuf is not None and card is not None and self._picture_gen.get(name) == gen:
            card.show_pixbuf(pixbuf, kind)
        return GLib.SOURCE_REMOVE

    def _no_picture(self, name: str, gen: int, why: str) -> None:
        if self._in_flight.get(name) == gen:
            del self._in_flight[name]
        log.debug("%s: no new picture (%s); the card keeps its own", name, why)
