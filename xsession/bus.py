"""The session manager on D-Bus: the Manager and Session objects of docs/dbus.md.

Objects (interfaces in ``org.xenubuntu.Sessions1.xml``, next to this module)::

    /org/xenubuntu/Sessions1                 Manager + org.freedesktop.DBus.ObjectManager
    /org/xenubuntu/Sessions1/session/NAME    Session

Published with Gio's own object registration (the GDBus that pydbus wraps)
rather than pydbus's: pydbus answers a call with whatever the Python method
returns, so a method must finish inside the main loop. Here a mutating call
is answered later, from a worker thread, after polkit decided (which can take
as long as a person takes to type a password) and after the engine acted (a
``Stop`` waits for QEMU to quit), while the main loop keeps serving reads and
signals.

Errors: :func:`dbus_error_name` maps an exception to its D-Bus name, the one
place that does: an :class:`~xsession.errors.XSessionError` becomes
``org.xenubuntu.Sessions1.Error.<dbus_name>``, malformed arguments
``org.freedesktop.DBus.Error.InvalidArgs``, anything else ``...Error.Failed``
(the cause is logged with its traceback and named in the message).

Signals: a change of state is announced at once, by the engine thread that
reports it (GDBus sends from any thread, and the engine reports one event at a
time, in order), with no hop through the main loop: one ``PropertiesChanged``
per state change, carrying the values of the event's snapshot that differ from
what was announced last, so a front-end sees every state a session went
through. A change that touches only progress is held back to one signal per
:data:`PROGRESS_INTERVAL_S` per session (a main-loop timeout sends what is
due); it never delays a change of state, which carries the progress too. The
manager's properties (``Memory`` follows the sessions' states) are looked at
again in one idle flush on the main loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from gi.repository import Gio, GLib

from .engine import PROGRESS_INTERVAL_S, Engine, SessionView, State
from .errors import DBUS_ERROR_PREFIX, MediumUnavailable, NotAuthorized, XSessionError

__all__ = [
    "BUS_NAME", "MANAGER_PATH", "SESSION_PATH", "MANAGER_IFACE", "SESSION_IFACE", "OBJECT_MANAGER_IFACE",
    "ACTION_MANAGE", "ACTION_ADMINISTER", "INVALID_ARGS", "API_VERSION", "ACTIVATE_OPTIONS",
    "InvalidArgs", "dbus_error_name", "introspection_xml", "session_path", "to_variant", "vardict",
    "property_variant", "typed_properties", "emit",
    "Facts", "Authorizer", "SessionsService",
]

log = logging.getLogger(__name__)

BUS_NAME = "org.xenubuntu.Sessions1"
MANAGER_PATH = "/org/xenubuntu/Sessions1"
SESSION_PATH = MANAGER_PATH + "/session"
MANAGER_IFACE = "org.xenubuntu.Sessions1.Manager"
SESSION_IFACE = "org.xenubuntu.Sessions1.Session"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
ACTION_MANAGE = "org.xenubuntu.sessions1.manage"
ACTION_ADMINISTER = "org.xenubuntu.sessions1.administer"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
API_VERSION = "1"
#: a front-end showing a progress bar needs no more than this many updates per second
PROGRESS_PROPERTIES = frozenset({"Progress", "BytesDone", "BytesTotal"})
#: Activate's options: name -> D-Bus type
ACTIVATE_OPTIONS = {"reset": "b", "default": "b", "auth.no_user_interaction": "b"}
#: polkit may show a password dialog; a person needs time to answer it
POLKIT_TIMEOUT_MS = 5 * 60 * 1000
_POLKIT_ALLOW_INTERACTION = 1


class InvalidArgs(XSessionError):
    """An argument the method cannot take (an unknown option, a wrong type)."""

    dbus_name = "InvalidArgs"

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what

    def __str__(self) -> str:
        return self.what


def dbus_error_name(exc: BaseException) -> str:
    """The D-Bus error name a caller sees for ``exc``."""
    if isinstance(exc, InvalidArgs):
        return INVALID_ARGS
    if isinstance(exc, XSessionError):
        return DBUS_ERROR_PREFIX + exc.dbus_name
    return DBUS_ERROR_PREFIX + "Failed"


def _return_error(invocation: Gio.DBusMethodInvocation, exc: BaseException) -> None:
    if isinstance(exc, XSessionError):
        message = str(exc)
    else:
        log.error("internal error in %s.%s", invocation.get_interface_name(), invocation.get_method_name(),
                  exc_info=exc)
        message = f"internal error: {exc!r}"
    invocation.return_dbus_error(dbus_error_name(exc), message)


def _return_declared(invocation: Gio.DBusMethodInvocation, result: object) -> None:
    """Answer with ``result`` as the method's declared out arguments: none, or one value."""
    out = [arg.signature for arg in invocation.get_method_info().out_args]
    if not out:
        invocation.return_value(None)
    else:
        invocation.return_value(GLib.Variant("(" + "".join(out) + ")", (result,)))


def authorized_call(authorizer: Authorizer, invocation: Gio.DBusMethodInvocation, sender: str, action: str,
                    interactive: bool, act: Callable[[], object], what: str) -> None:
    """Authorize, then act in a worker thread and answer from there (Gio allows it).

    The reply has the type the introspection data declares for the method called
    (``Manager.Activate`` returns the session's path, ``Session.Activate`` nothing):
    a reply of another type is dropped by Gio and the caller waits out its timeout.
    """

    def decided(caller: Caller | None, refusal: XSessionError | None) -> None:
        if refusal is not None:
            log.info("%s refused for %s: %s", what, caller.uid if caller else sender, refusal)
            _return_error(invocation, refusal)
            return
        assert caller is not None
        log.info("%s by uid %d (%s)", what, caller.uid, caller.sender)
        threading.Thread(target=run, name=f"bus-{what}", daemon=True).start()

    def run() -> None:
        try:
            result = act()
        except Exception as e:
            _return_error(invocation, e)
            return
        _return_declared(invocation, result)

    authorizer.check(sender, action, interactive, decided)


# --- values ---------------------------------------------------------------------------

#: a reason or warning longer than this is cut: it quotes other programs' output
MAX_TEXT = 4096


def clean_text(text: str) -> str:
    """A string D-Bus can carry: valid UTF-8 (a lone surrogate from a file name becomes
    U+FFFD instead of an exception), no NUL (which would cut it), of a bounded length."""
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT - 3] + "..."
    if text.isascii() and "\0" not in text:
        return text
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace").replace("\0", "\ufffd")


def to_variant(value: Any) -> GLib.Variant:
    """A plain Python value as the variant a front-end expects inside ``a{sv}``.

    :raises TypeError: a value with no D-Bus form here.
    """
    if isinstance(value, GLib.Variant):
        return value
    if isinstance(value, bool):
        return GLib.Variant("b", value)
    if isinstance(value, int):
        if -(1 << 63) <= value < (1 << 63):
            return GLib.Variant("x", value)
        if 0 <= value < (1 << 64):
            return GLib.Variant("t", value)
        return GLib.Variant("s", str(value))  # beyond every D-Bus integer: shown, not dropped
    if isinstance(value, float):
        return GLib.Variant("d", value)
    if isinstance(value, str):
        return GLib.Variant("s", clean_text(value))
    if isinstance(value, Mapping):
        return GLib.Variant("a{sv}", vardict(value))
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return GLib.Variant("as", [clean_text(v) for v in value])
    raise TypeError(f"no D-Bus form for {value!r}")


def vardict(values: Mapping[str, Any]) -> dict[str, GLib.Variant]:
    return {clean_text(str(k)): to_variant(v) for k, v in values.items()}


def property_variant(info: Gio.DBusInterfaceInfo, prop: str, value: Any) -> GLib.Variant:
    """A property's value as the variant of the type the introspection data gives it."""
    sig = info.lookup_property(prop).signature
    if sig == "a{sv}":
        return GLib.Variant("a{sv}", vardict(value))
    if sig == "s":
        return GLib.Variant("s", clean_text(value))
    if sig == "as":
        return GLib.Variant("as", [clean_text(v) for v in value])
    return GLib.Variant(sig, value)


def typed_properties(info: Gio.DBusInterfaceInfo, props: Mapping[str, Any]) -> dict[str, GLib.Variant]:
    """Properties as variants of the types the introspection data gives them."""
    return {k: property_variant(info, k, v) for k, v in props.items()}


def emit(con: Gio.DBusConnection, path: str, iface: str, signal: str, args: GLib.Variant) -> None:
    """Send a signal; a connection closed at shutdown is no error (logged for debugging)."""
    try:
        con.emit_signal(None, path, iface, signal, args)
    except GLib.Error as e:
        log.debug("cannot emit %s on %s: %s", signal, path, e.message)


def introspection_xml() -> str:
    """The API's introspection data, as installed with the package."""
    return resources.files(__package__).joinpath("org.xenubuntu.Sessions1.xml").read_text()


def _interfaces() -> dict[str, Gio.DBusInterfaceInfo]:
    info = Gio.DBusNodeInfo.new_for_xml(introspection_xml())
    return {iface.name: iface for iface in info.interfaces}


def session_path(name: str) -> str:
    """Flavour names are ``[a-z][a-z0-9_]*`` (manifest), valid path elements as they are."""
    return f"{SESSION_PATH}/{name}"


def _session_properties(v: SessionView) -> dict[str, Any]:
    """The Session interface's properties, as plain values, from one engine snapshot."""
    return {
        "Name": v.name,
        "Title": v.title,
        "State": v.state.value,
        "StateReason": v.reason,
        "Progress": float(v.progress),
        "BytesDone": int(v.bytes_done),
        "BytesTotal": int(v.bytes_total),
        "Priority": int(v.priority),
        "MemoryMiB": int(v.memory_mib),
        "Console": dict(v.console),
        "LastChange": float(v.last_change),
        "Description": v.description,
        "Source": v.source,
        "Heartbeat": {"seq": v.heartbeat_seq, "at": float(v.heartbeat_at)},
        "Preloaded": bool(v.preloaded),
    }


# --- what the daemon tells the bus ------------------------------------------------------

class Facts(Protocol):
    """The manager-wide facts that the daemon, not the engine, knows."""

    def manager_properties(self, only: str | None = None) -> dict[str, Any]:
        """Version, Backend, DefaultFlavour, RestorePolicy, Hardware, Memory, Medium, Warnings as plain
        values; with ``only``, costly properties other than that one may be left empty."""
        ...

    def medium_problem(self) -> MediumUnavailable | None:
        """Why nothing can be restored now (no medium, a manifest that failed, an ejected disc), or None."""
        ...


# --- authorization --------------------------------------------------------------------

@dataclass(frozen=True)
class Caller:
    sender: str
    uid: int


class Authorizer:
    """Decides whether a caller may run a mutating method: root always, others by polkit.

    The subject is the caller's unique bus name (``system-bus-name``), so polkit
    itself finds its process, user and login session. Without polkit
    (``use_polkit=False``, or polkit is not on the bus) only root may.
    """

    def __init__(self, con: Gio.DBusConnection, use_polkit: bool = True):
        self.con = con
        self.use_polkit = use_polkit

    def check(self, sender: str, action: str, interactive: bool,
              done: Callable[[Caller | None, XSessionError | None], None]) -> None:
        """Call ``done(caller, None)`` when allowed, ``done(caller, NotAuthorized)`` when not (main loop)."""

        def on_uid(con: Gio.DBusConnection, result: Gio.AsyncResult) -> None:
            try:
                uid = int(con.call_finish(result).unpack()[0])
            except GLib.Error as e:
                done(None, NotAuthorized(action, f"cannot tell who is calling: {e.message}"))
                return
            caller = Caller(sender, uid)
            if uid == 0:
                done(caller, None)
            elif not self.use_polkit:
                done(caller, NotAuthorized(action, f"uid {uid} may not; only root may while polkit is not used"))
            else:
                self._ask_polkit(caller, action, interactive, done)

        self.con.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                      "GetConnectionUnixUser", GLib.Variant("(s)", (sender,)), GLib.VariantType("(u)"),
                      Gio.DBusCallFlags.NONE, 10_000, None, on_uid)

    def _ask_polkit(self, caller: Caller, action: str, interactive: bool,
                    done: Callable[[Caller | None, XSessionError | None], None]) -> None:
        subject = ("system-bus-name", {"name": GLib.Variant("s", caller.sender)})
        args = GLib.Variant("((sa{sv})sa{ss}us)",
                            (subject, action, {}, _POLKIT_ALLOW_INTERACTION if interactive else 0, ""))

        def on_answer(con: Gio.DBusConnection, result: Gio.AsyncResult) -> None:
            try:
                (authorized, challenge, _details), = con.call_finish(result).unpack()
            except GLib.Error as e:
                remote = Gio.DBusError.get_remote_error(e) or ""
                why = "polkit is not running" if remote.endswith(("ServiceUnknown", "NameHasNoOwner")) else e.message
                done(caller, NotAuthorized(action, f"uid {caller.uid} may not: {why}; only root may"))
                return
            if authorized:
                done(caller, None)
            elif challenge:
                done(caller, NotAuthorized(action, f"uid {caller.uid} needs to authenticate first (polkit)"))
            else:
                done(caller, NotAuthorized(action, f"polkit refused uid {caller.uid}"))

        self.con.call("org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority",
                      "org.freedesktop.PolicyKit1.Authority", "CheckAuthorization", args,
                      GLib.VariantType("((bba{ss}))"), Gio.DBusCallFlags.NONE, POLKIT_TIMEOUT_MS, None, on_answer)


# --- the objects ------------------------------------------------------------------------

class SessionsService:
    """Publishes an engine (or, with no usable medium, none) on a bus connection.

    Call :meth:`publish` from the main loop before owning the name, :meth:`close`
    when done. Everything but :meth:`_on_engine_event` (and the session signals it
    sends) and :meth:`manager_changed` runs in the main loop.
    """

    def __init__(self, con: Gio.DBusConnection, engine: Engine | None, facts: Facts,
                 authorizer: Authorizer):
        self.con = con
        self.engine = engine
        self.facts = facts
        self.authorizer = authorizer
        self._ifaces = _interfaces()
        self._registrations: list[int] = []
        self._session_regs: dict[str, int] = {}
        self._published: dict[str, dict[str, Any]] = {}   # path -> properties last announced
        self._latest: dict[str, dict[str, Any]] = {}      # session path -> its latest event's properties
        self._held: dict[str, None] = {}    # session paths whose progress is held back (ordered)
        self._progress_id = 0               # timeout: held-back progress is due
        self._manager_id = 0                # idle: the manager's properties are looked at again
        self._last_progress: dict[str, float] = {}
        self._signals = threading.Lock()    # the session signals' bookkeeping (engine threads, main loop)
        self._closed = False
        #: the install jobs (``xsession.install.dbus.InstallService``): its Manager methods and objects
        self.install: Any = None
        #: the office (``xsession.office.dbus.OfficeService``): its object, when the medium has one
        self.office: Any = None

    # -- publishing ------------------------------------------------------------------
    def publish(self) -> None:
        """Register the manager and every session object; subscribe to the engine."""
        for name in (MANAGER_IFACE, OBJECT_MANAGER_IFACE):
            self._registrations.append(self.con.register_object(
                MANAGER_PATH, self._ifaces[name], self._on_manager_call, self._get_manager_property, None))
        self._published[MANAGER_PATH] = self.facts.manager_properties()
        if self.engine is not None:
            for view in self.engine.sessions():
                self._add_session(view.name)
            self.engine.subscribe(self._on_engine_event)

    def _add_session(self, name: str) -> None:
        path = session_path(name)
        self._session_regs[name] = self.con.register_object(
            path, self._ifaces[SESSION_IFACE], self._on_session_call, self._get_session_property, None)
        props = self._session_props(name)
        self._published[path] = self._latest[path] = props
        self._emit(MANAGER_PATH, OBJECT_MANAGER_IFACE, "InterfacesAdded",
                   GLib.Variant("(oa{sa{sv}})", (path, {SESSION_IFACE: self._typed(SESSION_IFACE, props)})))

    def close(self) -> None:
        """Withdraw every object (InterfacesRemoved for the sessions); idempotent."""
        with self._signals:
            if self._closed:
                return
            self._closed = True
            for source in (self._progress_id, self._manager_id):
                if source:
                    GLib.source_remove(source)
            self._progress_id = self._manager_id = 0
            regs = dict(self._session_regs)
            self._session_regs.clear()
        for name, reg in regs.items():
            self.con.unregister_object(reg)
            self._emit(MANAGER_PATH, OBJECT_MANAGER_IFACE, "InterfacesRemoved",
                       GLib.Variant("(oas)", (session_path(name), [SESSION_IFACE])))
        for reg in self._registrations:
            self.con.unregister_object(reg)
        self._registrations.clear()

    def _emit(self, path: str, iface: str, signal: str, args: GLib.Variant) -> None:
        emit(self.con, path, iface, signal, args)

    # -- properties ----------------------------------------------------------------
    def _session_props(self, name: str) -> dict[str, Any]:
        assert self.engine is not None
        return _session_properties(self.engine.session(name))

    def _variant(self, iface: str, prop: str, value: Any) -> GLib.Variant:
        return property_variant(self._ifaces[iface], prop, value)

    def _typed(self, iface: str, props: Mapping[str, Any]) -> dict[str, GLib.Variant]:
        return typed_properties(self._ifaces[iface], props)

    def _get_manager_property(self, con: Gio.DBusConnection, sender: str, path: str, iface: str,
                              prop: str) -> GLib.Variant:
        return self._variant(iface, prop, self.facts.manager_properties(only=prop)[prop])

    def _get_session_property(self, con: Gio.DBusConnection, sender: str, path: str, iface: str,
                              prop: str) -> GLib.Variant:
        return self._variant(iface, prop, self._session_props(path.rsplit("/", 1)[1])[prop])

    # -- change signals ----------------------------------------------------------------
    def _on_engine_event(self, event: str, view: SessionView | None) -> None:
        """Engine thread (the engine reports one event at a time, in order): a change of
        state is announced from here at once, GDBus sends from any thread; a change of
        progress alone at most every :data:`PROGRESS_INTERVAL_S` per session."""
        if view is None:  # the manager's warnings
            self.manager_changed()
            return
        path = session_path(view.name)
        with self._signals:
            if self._closed or view.name not in self._session_regs:
                return
            self._latest[path] = _session_properties(view)
            if event != "progress":
                self._publish_session(path)
            else:
                left = self._last_progress.get(path, float("-inf")) + PROGRESS_INTERVAL_S - time.monotonic()
                if left <= 0:
                    self._publish_session(path)
                else:
                    self._held[path] = None
                    if not self._progress_id:
                        self._progress_id = GLib.timeout_add(max(1, round(left * 1000)), self._release_progress)
        if event != "progress":
            self.manager_changed()  # Memory and Warnings follow the sessions' states

    def manager_changed(self) -> None:
        """Any thread: the manager's facts (medium, warnings, ...) changed."""
        GLib.idle_add(self._manager_dirty, priority=GLib.PRIORITY_DEFAULT)

    def _publish_session(self, path: str) -> None:
        """One PropertiesChanged with what the latest event changed since the last one, if
        anything (signals lock held)."""
        self._held.pop(path, None)
        props, old = self._latest[path], self._published[path]
        changed = {k: v for k, v in props.items() if old.get(k) != v}
        if not changed:
            return
        body = GLib.Variant("(sa{sv}as)", (SESSION_IFACE, self._typed(SESSION_IFACE, changed), []))
        if not changed.keys().isdisjoint(PROGRESS_PROPERTIES):
            self._last_progress[path] = time.monotonic()
        self._published[path] = props
        self._emit(path, PROPERTIES_IFACE, "PropertiesChanged", body)

    def _release_progress(self) -> bool:
        """Main loop: announce the held-back progress that is due; wait again for the rest."""
        with self._signals:
            self._progress_id = 0
            now = time.monotonic()
            waits = []
            for path in list(self._held):
                left = self._last_progress.get(path, float("-inf")) + PROGRESS_INTERVAL_S - now
                if left <= 0:
                    self._publish_session(path)
                else:
                    waits.append(left)
            if waits and not self._closed:
                self._progress_id = GLib.timeout_add(max(1, round(min(waits) * 1000)), self._release_progress)
        return GLib.SOURCE_REMOVE

    def _manager_dirty(self) -> bool:
        """Main loop: look at the manager's properties again once this turn's events are in."""
        if not self._manager_id and not self._closed:
            self._manager_id = GLib.idle_add(self._publish_manager, priority=GLib.PRIORITY_DEFAULT_IDLE)
        return GLib.SOURCE_REMOVE

    def _publish_manager(self) -> bool:
        self._manager_id = 0
        props, old = self.facts.manager_properties(), self._published.get(MANAGER_PATH, {})
        changed = {k: v for k, v in props.items() if old.get(k) != v}
        if changed:
            self._published[MANAGER_PATH] = props
            self._emit(MANAGER_PATH, PROPERTIES_IFACE, "PropertiesChanged",
                       GLib.Variant("(sa{sv}as)", (MANAGER_IFACE, self._typed(MANAGER_IFACE, changed), [])))
        return GLib.SOURCE_REMOVE

    # -- methods ---------------------------------------------------------------------
    def _on_manager_call(self, con: Gio.DBusConnection, sender: str, path: str, iface: str, method: str,
                         params: GLib.Variant, invocation: Gio.DBusMethodInvocation) -> None:
        try:
            args = params.unpack()
            if iface == OBJECT_MANAGER_IFACE and method == "GetManagedObjects":
                invocation.return_value(GLib.Variant("(a{oa{sa{sv}}})", (self._managed_objects(),)))
            elif method == "ListSessions":
                invocation.return_value(GLib.Variant("(a(ssso))", (self._list_sessions(),)))
            elif method == "GetSession":
                invocation.return_value(GLib.Variant("(o)", (session_path(self._known(args[0])),)))
            elif method == "Activate":
                options = _activate_options(params.get_child_value(1))
                self._activate(invocation, sender, self._known(args[0]), options)
            elif method == "SetDefault":
                name = self._known(args[0])
                self._mutate(invocation, sender, ACTION_ADMINISTER, True,
                             lambda: self._set_default(name), f"SetDefault {name}")
            elif self.install is None or not self.install.manager_call(method, params, invocation):
                raise InvalidArgs(f"no method {iface}.{method}")
        except Exception as e:
            _return_error(invocation, e)

    def _on_session_call(self, con: Gio.DBusConnection, sender: str, path: str, iface: str, method: str,
                         params: GLib.Variant, invocation: Gio.DBusMethodInvocation) -> None:
        try:
            name = self._known(path.rsplit("/", 1)[1])
            engine = self._engine()
            if method == "Activate":
                self._activate(invocation, sender, name, {})
                return
            if method == "GetPicture":
                self._picture(invocation, sender, name, int(params.unpack()[0]))
                return
            actions: dict[str, Callable[[], object]] = {
                "Pause": lambda: engine.pause(name),
                "Resume": lambda: engine.resume(name),
                "Stop": lambda: engine.stop(name),
                "Reset": lambda: engine.reset(name),
            }
            if method not in actions:
                raise InvalidArgs(f"no method {iface}.{method}")
            if method == "Reset":
                self._check_medium(name)
            self._mutate(invocation, sender, ACTION_MANAGE, True, actions[method], f"{method} {name}")
        except Exception as e:
            _return_error(invocation, e)

    def _engine(self) -> Engine:
        if self.engine is None:
            problem = self.facts.medium_problem()
            raise problem or MediumUnavailable("", "no medium was read")
        return self.engine

    def _known(self, name: str) -> str:
        """:raises NoSuchFlavour: from the engine. :raises MediumUnavailable: no engine."""
        return self._engine().session(name).name

    def _check_medium(self, name: str) -> None:
        """A session that must be read from the medium cannot start while it is gone."""
        view = self._engine().session(name)
        if view.state in (State.RUNNING, State.PAUSED, State.RESTORING, State.BOOTING):
            return
        problem = self.facts.medium_problem()
        if problem is not None:
            raise problem

    def _activate(self, invocation: Gio.DBusMethodInvocation, sender: str, name: str,
                  options: dict[str, Any]) -> None:
        engine = self._engine()
        reset = bool(options.get("reset"))
        make_default = bool(options.get("default"))
        self._check_medium(name)  # also when resetting: the pristine statefile is on the medium

        def act() -> str:
            if reset:
                engine.reset(name)
            else:
                engine.activate(name)
            if make_default:  # only once the activation was accepted: a refusal changes nothing
                self._set_default(name)
            return session_path(name)

        self._mutate(invocation, sender, ACTION_ADMINISTER if make_default else ACTION_MANAGE,
                     not options.get("auth.no_user_interaction", False), act, f"Activate {name}")

    def _picture(self, invocation: Gio.DBusMethodInvocation, sender: str, name: str, max_width: int) -> None:
        """A live screen is the person's own business: authorized like Pause, never
        interactive (a chooser asks every few seconds); the still is the medium's."""
        engine = self._engine()

        def run(allowed: bool) -> None:
            try:
                png, kind = engine.picture(name, max_width, live=allowed)
                invocation.return_value(GLib.Variant("(ays)", (png, kind)))
            except Exception as e:
                _return_error(invocation, e)

        def decided(caller: Caller | None, refusal: XSessionError | None) -> None:
            threading.Thread(target=run, args=(refusal is None,), name=f"bus-picture-{name}", daemon=True).start()

        self.authorizer.check(sender, ACTION_MANAGE, False, decided)

    def _set_default(self, name: str) -> None:
        self._engine().set_default(name)
        self.manager_changed()

    def _mutate(self, invocation: Gio.DBusMethodInvocation, sender: str, action: str, interactive: bool,
                act: Callable[[], object], what: str) -> None:
        authorized_call(self.authorizer, invocation, sender, action, interactive, act, what)

    def _list_sessions(self) -> list[tuple[str, str, str, str]]:
        if self.engine is None:
            return []
        return [(v.name, v.title, v.state.value, session_path(v.name)) for v in self.engine.sessions()]

    def _managed_objects(self) -> dict[str, dict[str, dict[str, GLib.Variant]]]:
        if self.engine is None:
            return {}
        objects = {session_path(v.name): {SESSION_IFACE: self._typed(SESSION_IFACE, _session_properties(v))}
                   for v in self.engine.sessions()}
        for part in (self.install, self.office):
            if part is not None:
                objects.update(part.managed_objects())
        return objects


def _activate_options(options: GLib.Variant) -> dict[str, Any]:
    """Activate's ``a{sv}``, checked: every name known, every value of its type.

    :raises InvalidArgs: names the option and what it should be.
    """
    out: dict[str, Any] = {}
    for i in range(options.n_children()):
        entry = options.get_child_value(i)
        key = entry.get_child_value(0).get_string()
        value = entry.get_child_value(1).get_variant()
        want = ACTIVATE_OPTIONS.get(key)
        if want is None:
            raise InvalidArgs(f"unknown option {key!r} (known: {', '.join(sorted(ACTIVATE_OPTIONS))})")
        if value.get_type_string() != want:
            raise InvalidArgs(f"option {key!r} must be of type {want}, not {value.get_type_string()} "
                              f"({value.print_(False)})")
        out[key] = value.unpack()
    return out
