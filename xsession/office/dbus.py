"""The office on D-Bus::

    /org/xenubuntu/Sessions1/office    org.xenubuntu.Sessions1.Office

The object always answers (a caller asking a medium without an office hears
``NoOffice``, and ``State`` says ``absent``), but it is listed by
``GetManagedObjects`` only when the medium has an office: a front-end that
finds it offers the office. ``Start``, ``Pause`` and ``Reset`` are authorized
like a session's ``Activate`` and ``Reset`` (polkit ``manage``) and answered from
a worker thread. Each activity a desktop reports is an ``Activity`` signal, sent
at once from the channel's thread; ``PropertiesChanged`` follows State, Workers
and Started at once and Counters at most every :data:`COUNTERS_INTERVAL_S` (a
busy office must not flood the bus). :class:`SessionsService` passes its object
list here (:meth:`OfficeService.managed_objects`): the office is its own concern.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gi.repository import Gio, GLib

from ..errors import XSessionError
from .ledger import OfficeView, Record
from .manager import OfficeManager

if TYPE_CHECKING:
    from ..bus import Authorizer

__all__ = ["OFFICE_IFACE", "OFFICE_PATH", "office_properties", "OfficeService", "office_service"]

log = logging.getLogger(__name__)

OFFICE_IFACE = "org.xenubuntu.Sessions1.Office"
OFFICE_PATH = "/org/xenubuntu/Sessions1/office"
#: a front-end showing counters needs no more than ten updates a second
COUNTERS_INTERVAL_S = 0.1
_HELD = frozenset({"Counters"})


def office_properties(v: OfficeView) -> dict[str, Any]:
    """The Office interface's properties, as plain values, from one snapshot."""
    from ..bus import session_path
    c = v.counters
    return {
        "State": v.state.value,
        "Server": session_path(v.server) if v.server else "/",
        "Desktops": [session_path(d) for d in v.desktops],
        "Started": float(v.started),
        "Counters": {"Saved": GLib.Variant("u", c.saved), "Added": GLib.Variant("u", c.added),
                     "Read": GLib.Variant("u", c.read), "Seen": GLib.Variant("u", c.seen),
                     "FirstRead": GLib.Variant("d", c.first_read), "FirstSeen": GLib.Variant("d", c.first_seen)},
        "Workers": {d: (w.acknowledged, w.problem) for d, w in v.workers.items()},
    }


def _comparable(props: dict[str, Any]) -> dict[str, Any]:
    """Variants compare by identity: their unpacked values say what changed."""
    return {k: ({n: x.unpack() for n, x in v.items()} if k == "Counters" else v) for k, v in props.items()}


class OfficeService:
    """The Office object of an :class:`OfficeManager` on a connection (register in the main loop)."""

    def __init__(self, con: Gio.DBusConnection, office: OfficeManager, authorizer: Authorizer,
                 medium_problem: Callable[[], XSessionError | None]):
        from ..bus import _interfaces
        self.con = con
        self.office = office
        self.authorizer = authorizer
        self.medium_problem = medium_problem
        self._iface = _interfaces()[OFFICE_IFACE]
        self._reg = 0
        self._lock = threading.Lock()
        self._published: dict[str, Any] = {}
        self._latest: dict[str, Any] = {}
        self._last_counters = float("-inf")
        self._flush_id = 0

    def publish(self) -> None:
        from ..bus import MANAGER_PATH, OBJECT_MANAGER_IFACE
        self._reg = self.con.register_object(OFFICE_PATH, self._iface, self._on_call, self._get_property, None)
        with self._lock:
            self._published = self._latest = _comparable(office_properties(self.office.view()))
        self.office.subscribe(self._on_office)
        if self.office.present:
            self._emit(MANAGER_PATH, OBJECT_MANAGER_IFACE, "InterfacesAdded",
                       GLib.Variant("(oa{sa{sv}})", (OFFICE_PATH, {OFFICE_IFACE: self._typed(
                           office_properties(self.office.view()))})))

    def close(self) -> None:
        with self._lock:
            reg, self._reg = self._reg, 0
            if self._flush_id:
                GLib.source_remove(self._flush_id)
                self._flush_id = 0
        if reg:
            self.con.unregister_object(reg)

    # -- events (any thread) ------------------------------------------------------------
    def _on_office(self, event: str, payload: Any) -> None:
        if event == "activity":
            from ..bus import session_path
            r: Record = payload
            self._emit(OFFICE_PATH, OFFICE_IFACE, "Activity",
                       GLib.Variant("(doss)", (r.at, session_path(r.session), r.kind, r.item)))
        elif event == "changed":
            with self._lock:
                self._latest = _comparable(office_properties(payload))
                self._publish_due()

    def _publish_due(self) -> None:
        """One PropertiesChanged with what changed, Counters held back to one per interval
        (lock held)."""
        if not self._reg:
            return
        changed = {k: v for k, v in self._latest.items() if self._published.get(k) != v}
        now = time.monotonic()
        if changed.keys() & _HELD and now - self._last_counters < COUNTERS_INTERVAL_S:
            if not self._flush_id:
                left = self._last_counters + COUNTERS_INTERVAL_S - now
                self._flush_id = GLib.timeout_add(max(1, round(left * 1000)), self._flush)
            changed = {k: v for k, v in changed.items() if k not in _HELD}
        if not changed:
            return
        if changed.keys() & _HELD:
            self._last_counters = now
        self._published = {**self._published, **changed}
        plain = office_properties(self.office.view())  # the variants of the values being announced
        typed = self._typed({k: plain[k] for k in changed})
        self._emit(OFFICE_PATH, "org.freedesktop.DBus.Properties", "PropertiesChanged",
                   GLib.Variant("(sa{sv}as)", (OFFICE_IFACE, typed, [])))

    def _flush(self) -> bool:
        with self._lock:
            self._flush_id = 0
            self._publish_due()
        return False  # GLib.SOURCE_REMOVE

    def _emit(self, path: str, iface: str, signal: str, args: GLib.Variant) -> None:
        from ..bus import emit
        emit(self.con, path, iface, signal, args)

    def _typed(self, props: dict[str, Any]) -> dict[str, GLib.Variant]:
        from ..bus import typed_properties
        return typed_properties(self._iface, props)

    def _get_property(self, con: Gio.DBusConnection, sender: str, path: str, iface: str,
                      prop: str) -> GLib.Variant:
        return self._typed({prop: office_properties(self.office.view())[prop]})[prop]

    # -- calls ----------------------------------------------------------------------------
    def _on_call(self, con: Gio.DBusConnection, sender: str, path: str, iface: str, method: str,
                 params: GLib.Variant, invocation: Gio.DBusMethodInvocation) -> None:
        from ..bus import ACTION_MANAGE, InvalidArgs, _return_error, authorized_call, session_path
        from .errors import NoOffice
        try:
            if method == "ListActivity":
                invocation.return_value(GLib.Variant("(a(doss))", ([
                    (r.at, session_path(r.session), r.kind, r.item) for r in self.office.records()],)))
                return
            actions: dict[str, Callable[[], object]] = {
                "Start": self.office.start, "Pause": self.office.pause, "Reset": self.office.reset}
            if method not in actions:
                raise InvalidArgs(f"no method {iface}.{method}")
            if not self.office.present:
                raise NoOffice(method.lower())
            act = actions[method]

            def run() -> None:
                if method != "Pause":
                    self._check_medium(always=method == "Reset")
                act()

            authorized_call(self.authorizer, invocation, sender, ACTION_MANAGE, True, run, f"office {method}")
        except Exception as e:
            _return_error(invocation, e)

    def _check_medium(self, always: bool) -> None:
        """Reset restores every session of the office from the medium, Start those that do not
        run: not while the medium is gone.

        :raises MediumUnavailable: (or the daemon's reason) when it is.
        """
        from ..engine import State
        view = self.office.view()
        engine = self.office.engine
        running = (State.RUNNING, State.PAUSED, State.RESTORING, State.BOOTING)
        if always or any(engine.session(n).state not in running for n in (view.server, *view.desktops)):
            problem = self.medium_problem()
            if problem is not None:
                raise problem

    def managed_objects(self) -> dict[str, dict[str, dict[str, GLib.Variant]]]:
        if not self.office.present:
            return {}
        return {OFFICE_PATH: {OFFICE_IFACE: self._typed(office_properties(self.office.view()))}}


def office_service(con: Gio.DBusConnection, engine: Any, authorizer: Authorizer,
                   medium_problem: Callable[[], XSessionError | None]) -> OfficeService:
    """The office of ``engine``'s medium published on ``con`` (main loop)."""
    service = OfficeService(con, OfficeManager(engine), authorizer, medium_problem)
    service.publish()
    return service
