"""The front-end's window: the chooser, one console in the full window, or several side by side.

Pages of one :class:`Gtk.Stack`:

* ``chooser``  the cards (:mod:`.chooser`);
* ``console``  one session's display filling the window (:mod:`.console`);
* ``split``    two or more displays side by side, each live, each able to take the keyboard;
* ``office``   the office's server and desktops side by side under its controls (:mod:`.office`).

The host key (:data:`~.console.HOST_KEY`, Ctrl+Alt+Home) is caught by the
window before any display sees it, so it brings the chooser back even while a
guest holds the keyboard. Errors from the daemon appear in an info bar at the
top that hides itself again; a daemon that leaves the bus is shown there
until it is back.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

import gi

gi.require_version("Gtk", "3.0")
gi.require_version("Gdk", "3.0")
from gi.repository import Gdk, GLib, Gtk  # noqa: E402

from .chooser import Chooser  # noqa: E402
from .client import ACTIVE_STATES, CallError, SessionsClient  # noqa: E402
from .install import InstallDialog  # noqa: E402
from .office import OfficeBar  # noqa: E402
from .console import HOST_KEY, HOST_KEY_LABEL, ConsoleView  # noqa: E402

__all__ = ["MainWindow", "main"]

log = logging.getLogger(__name__)

#: an error stays this long in the info bar unless closed earlier
ERROR_SHOWN_S = 15
CSS = b"""
.session-card { border-radius: 6px; padding: 2px; }
.card-title { margin-bottom: 2px; }
.card-picture { background: #2e3436; border-radius: 4px; }
.card-placeholder { color: #d3d7cf; font-size: larger; font-weight: bold; padding: 12px; }
.card-description { margin-bottom: 2px; }
.default-badge { background: #3465a4; color: white; border-radius: 4px; padding: 1px 6px; font-size: smaller; }
.console-bar { padding: 2px; }
.console { border: 2px solid transparent; }
.console.has-keyboard { border-color: #3465a4; }
.console-waiting { background: rgba(0, 0, 0, 0.6); color: white; padding: 12px; border-radius: 6px; }
"""
_BUSY = frozenset({"queued", "restoring", "booting"})


class MainWindow(Gtk.Window):
    """The whole front-end in one window, driven by one :class:`SessionsClient`."""

    def __init__(self, client: SessionsClient, *, auto_show_default: bool = True):
        super().__init__(title="XenUbuntu")
        self.client = client
        self.set_default_size(1200, 760)
        provider = Gtk.CssProvider()
        provider.load_from_data(CSS)
        Gtk.StyleContext.add_provider_for_screen(self.get_screen(), provider,
                                                 Gtk.STYLE_PROVIDER_PRIORITY_APPLICATION)
        #: until the person chooses anything, the default session is shown once it runs
        self._auto_show = auto_show_default
        self._error_timeout = 0
        self.consoles: list[ConsoleView] = []

        outer = Gtk.Box(orientation=Gtk.Orientation.VERTICAL)
        self.add(outer)
        self.info_bar = Gtk.InfoBar(show_close_button=True, revealed=False)
        self.info_bar.set_no_show_all(True)
        self.info_label = Gtk.Label(xalign=0, wrap=True, selectable=True)
        self.info_bar.get_content_area().add(self.info_label)
        self.info_bar.connect("response", lambda *_: self.hide_message())
        outer.pack_start(self.info_bar, False, False, 0)

        self.stack = Gtk.Stack(transition_type=Gtk.StackTransitionType.NONE)
        outer.pack_start(self.stack, True, True, 0)
        self.chooser = Chooser(client)
        self.chooser.connect("switch", lambda _c, name: self.choose(name))
        self.chooser.connect("action", lambda _c, name, method: self._act(name, method))
        self.chooser.connect("split", lambda _c: self.show_split(self._split_names()))
        self.chooser.connect("install", lambda _c, path: self.show_install(path))
        self.stack.add_named(self.chooser, "chooser")
        self.console_page = Gtk.Box(orientation=Gtk.Orientation.VERTICAL)
        self.stack.add_named(self.console_page, "console")
        self.split_page = Gtk.Grid(row_homogeneous=True, column_homogeneous=True, row_spacing=4, column_spacing=4)
        self.stack.add_named(self.split_page, "split")
        self.chooser.connect("office", lambda _c: self.show_office())
        self.office_page = Gtk.Box(orientation=Gtk.Orientation.VERTICAL)
        self.office_bar = OfficeBar(client)
        self.office_bar.connect("back", lambda _b: self.show_chooser())
        self.office_page.pack_start(self.office_bar, False, False, 0)
        self.office_grid = Gtk.Grid(row_homogeneous=True, column_homogeneous=True, row_spacing=4, column_spacing=4)
        self.office_page.pack_start(self.office_grid, True, True, 0)
        self.stack.add_named(self.office_page, "office")

        self.connect("key-press-event", self._on_key)
        client.connect("call-failed", lambda _c, err: self.show_error(err))
        client.connect("disconnected", lambda _c: self._on_daemon(False))
        client.connect("connected", lambda _c: self._on_daemon(True))
        client.connect("connected", lambda _c: self._maybe_auto_show(client.manager.default_flavour))
        client.connect("session-changed", lambda _c, name, _ch: self._maybe_auto_show(name))
        client.connect("manager-changed", lambda _c, _ch: self._maybe_auto_show(client.manager.default_flavour))
        #: install requests from guests: a confirmation dialog each, shown when the request arrives
        self.install_dialogs: dict[str, InstallDialog] = {}
        client.connect("job-added", lambda _c, path: self.show_install(path))
        client.connect("job-removed", lambda _c, path: self.install_dialogs.pop(path, None))
        outer.show_all()

    # -- pages ---------------------------------------------------------------------
    @property
    def page(self) -> str:
        return self.stack.get_visible_child_name() or "chooser"

    def choose(self, name: str) -> None:
        """The person picked a flavour: show its console, making it run first if it does not.

        A session that must be restored is shown once the daemon accepted ``Activate``;
        a refusal (``NotEnoughMemory``, ...) leaves the chooser in place with the reason.
        """
        self._auto_show = False
        s = self.client.sessions.get(name)
        if s is None:
            return
        if s.state == "paused":
            self.client.session_call(name, "Resume")
        if s.state in ACTIVE_STATES or s.state in ("restoring", "booting"):
            self.show_console(name)
        else:
            self.client.activate(name, done=lambda _path: self.show_console(name))

    def show_console(self, name: str) -> ConsoleView:
        """One session's display in the full window; it takes the keyboard."""
        self._auto_show = False
        self._drop_consoles()
        view = ConsoleView(self.client, name)
        view.connect("back", lambda _v: self.show_chooser())
        self.console_page.pack_start(view, True, True, 0)
        self.consoles = [view]
        view.show_all()
        self.stack.set_visible_child_name("console")
        view.take_keyboard()
        return view

    def show_split(self, names: Sequence[str]) -> list[ConsoleView]:
        """Several displays at once, in a grid of up to two rows; the first takes the keyboard."""
        self._auto_show = False
        self._drop_consoles()
        if not names:
            self.show_message("Nothing to show side by side: no session runs yet.", Gtk.MessageType.INFO)
            return []
        self._side_by_side(self.split_page, names)
        self.stack.set_visible_child_name("split")
        self.consoles[0].take_keyboard()
        return list(self.consoles)

    def _side_by_side(self, grid: Gtk.Grid, names: Sequence[str]) -> None:
        """A live display of each session in ``grid``, up to two rows (consoles dropped first)."""
        columns = max(1, math.ceil(len(names) / 2)) if len(names) > 2 else len(names)
        for i, name in enumerate(names):
            view = ConsoleView(self.client, name, split=True)
            view.connect("back", lambda _v: self.show_chooser())
            view.connect("full-window", lambda v: self.show_console(v.name))
            grid.attach(view, i % columns, i // columns, 1, 1)
            self.consoles.append(view)
        grid.show_all()

    def show_office(self) -> list[ConsoleView]:
        """The office: its server's and desktops' displays side by side (each shown once its
        session runs: Start makes them run) under Start, Pause, Reset and its status line."""
        self._auto_show = False
        self._drop_consoles()
        office = self.client.office
        if office is None:
            self.show_message("This medium has no office.", Gtk.MessageType.INFO)
            return []
        self._side_by_side(self.office_grid, [office.server, *office.desktops])
        self.office_bar.update()
        self.office_page.show_all()
        self.stack.set_visible_child_name("office")
        return list(self.consoles)

    def show_chooser(self) -> None:
        """Back to the cards; every display is closed (and the keyboard given back)."""
        self._auto_show = False
        self._drop_consoles()
        self.stack.set_visible_child_name("chooser")
        self.chooser.split_button.grab_focus()

    def _drop_consoles(self) -> None:
        for view in self.consoles:
            view.close()
            view.destroy()
        self.consoles = []

    def _split_names(self) -> list[str]:
        """The picked sessions, or all that run or are on their way when fewer than two are picked."""
        order = [s.name for s in sorted(self.client.sessions.values(), key=lambda s: (s.priority, s.name))]
        picked = [n for n in order if n in self.chooser.picked]
        if len(picked) >= 2:
            return picked
        return [n for n in order if self.client.sessions[n].state in ACTIVE_STATES | _BUSY]

    def _maybe_auto_show(self, name: str) -> None:
        """The default session is shown at once when it first runs, unless the person already chose."""
        if not self._auto_show or self.page != "chooser":
            return
        s = self.client.sessions.get(name)
        if s is not None and s.name == self.client.manager.default_flavour and s.state == "running":
            log.info("showing the default session %s", name)
            self.show_console(name)

    # -- actions and messages ------------------------------------------------------
    def show_install(self, path: str) -> InstallDialog | None:
        """The confirmation dialog of a pending install job (made once, shown again after "Not now")."""
        job = self.client.jobs.get(path)
        if job is None:
            return None
        dialog = self.install_dialogs.get(path)
        if dialog is None:
            if job.state != "pending":
                return None
            dialog = self.install_dialogs[path] = InstallDialog(self, self.client, path)
        dialog.present()
        return dialog

    def _act(self, name: str, method: str) -> None:
        self._auto_show = False
        self.client.session_call(name, method)

    def show_error(self, err: CallError) -> None:
        self.show_message(err.meaning, Gtk.MessageType.ERROR, timeout_s=ERROR_SHOWN_S)

    def show_message(self, text: str, kind: Gtk.MessageType = Gtk.MessageType.INFO,
                     timeout_s: float | None = ERROR_SHOWN_S) -> None:
        """Show ``text`` in the info bar (hidden again after ``timeout_s``; None keeps it)."""
        self.info_label.set_text(text)
        self.info_bar.set_message_type(kind)
        self.info_bar.show()
        self.info_label.show()
        self.info_bar.set_revealed(True)
        if self._error_timeout:
            GLib.source_remove(self._error_timeout)
            self._error_timeout = 0
        if timeout_s is not None:
            self._error_timeout = GLib.timeout_add_seconds(int(timeout_s), self._expire)

    def _expire(self) -> bool:
        self._error_timeout = 0
        self.hide_message()
        return GLib.SOURCE_REMOVE

    def hide_message(self) -> None:
        self.info_bar.set_revealed(False)
        self.info_bar.hide()

    @property
    def message(self) -> str:
        """The info bar's text while it is shown ("" otherwise)."""
        return self.info_label.get_text() if self.info_bar.get_visible() else ""

    def _on_daemon(self, present: bool) -> None:
        if present:
            if self.info_bar.get_message_type() == Gtk.MessageType.WARNING:
                self.hide_message()
        else:
            self.show_message("The session manager is not running; waiting for it to come back. "
                              "Sessions that were running keep running.", Gtk.MessageType.WARNING, timeout_s=None)

    # -- the host key ----------------------------------------------------------------
    def _on_key(self, _w: Gtk.Widget, event: Gdk.EventKey) -> bool:
        mods, key = HOST_KEY
        state = event.state & Gtk.accelerator_get_default_mod_mask()
        if state == mods and Gdk.keyval_to_lower(event.keyval) == key:
            if self.page != "chooser":
                log.info("host key %s: back to the chooser", HOST_KEY_LABEL)
                self.show_chooser()
            return True
        return False


def fill_screen(window: Gtk.Window) -> None:
    """Cover the whole monitor. A window manager honours ``fullscreen()``; dom0's desktop has
    none (X runs the chooser alone), so the window also takes the monitor's place and size."""
    window.fullscreen()
    display = Gdk.Display.get_default()
    monitor = display.get_primary_monitor() or display.get_monitor(0)
    if monitor is None:
        return
    area = monitor.get_geometry()
    window.set_decorated(False)
    window.set_default_size(area.width, area.height)
    window.move(area.x, area.y)


def main(argv: Sequence[str] | None = None) -> int:
    """``xsession-gui``: the chooser on the system bus (or ``--address``)."""
    p = argparse.ArgumentParser(prog="xsession-gui", description="XenUbuntu: choose a flavour, switch consoles")
    p.add_argument("--address", help="a D-Bus address to use instead of the system bus "
                   "(default: $DBUS_SYSTEM_BUS_ADDRESS or the system bus)")
    p.add_argument("--no-auto-show", action="store_true",
                   help="stay on the chooser when the default session starts running")
    p.add_argument("--fullscreen", action="store_true", help="fill the screen (the live desktop does)")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="xsession-gui: %(levelname)s %(name)s: %(message)s")
    ok, _ = Gtk.init_check(sys.argv[:1])
    if not ok:
        print("xsession-gui: cannot open the display (is DISPLAY set?)", file=sys.stderr)
        return 1
    client = SessionsClient(args.address)   # None: the system bus ($DBUS_SYSTEM_BUS_ADDRESS if set)
    try:
        client.start()
    except GLib.Error as e:
        print(f"xsession-gui: cannot reach the system bus: {e.message}", file=sys.stderr)
        return 1
    window = MainWindow(client, auto_show_default=not args.no_auto_show)
    window.connect("destroy", lambda _w: Gtk.main_quit())
    if args.fullscreen:
        fill_screen(window)
    # the line a boot test (and a person reading the journal) looks for
    window.connect("map-event", lambda w, _e: log.info("window mapped (%dx%d)", w.get_allocated_width(),
                                                        w.get_allocated_height()))
    window.show()
    Gtk.main()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
