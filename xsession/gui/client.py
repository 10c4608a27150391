"""The front-end's view of the session manager: a D-Bus client on Gio, no GTK.

Kept apart from the widgets so that it can be tested and reused alone, and
so that the front-end depends on the D-Bus API only (docs/dbus.md), never on the
engine. Everything it knows arrives by signals:

* ``InterfacesAdded`` / ``InterfacesRemoved`` add and remove sessions;
* ``PropertiesChanged`` updates a session or the manager;
* the bus name's owner appearing or vanishing (the daemon started, crashed or
  restarted) reloads everything with one ``GetManagedObjects``.

There is no polling. Calls are asynchronous: the main loop (and the window)
never waits for the daemon, which may itself wait for polkit or a guest.

GObject signals of :class:`SessionsClient`::

    connected()                      the daemon is on the bus; sessions are loaded
    disconnected()                   the daemon left the bus; sessions are gone
    session-added(name)
    session-removed(name)
    session-changed(name, changed)   changed: list of property names
    manager-changed(changed)         changed: list of property names
    call-failed(CallError)           a method call was refused or failed
    job-added(path)                  an install a guest asked for (:class:`Job`)
    job-changed(path, changed)
    job-removed(path)
    office-changed(changed)          the medium's office (:class:`Office`); changed: property names
    office-activity(activity)        a desktop reported (time, session name, kind, id)

Pictures (:meth:`SessionsClient.get_picture`) are the one thing asked for again
and again, by the chooser while it is shown; a failed picture is not an error
worth telling a person about, so it does not emit ``call-failed``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gi.repository import Gio, GLib, GObject

__all__ = [
    "BUS_NAME", "MANAGER_PATH", "MANAGER_IFACE", "SESSION_IFACE", "ERROR_PREFIX",
    "ACTIONS", "ACTIVE_STATES", "PICTURE_KINDS", "Session", "Manager", "Job", "Office", "CallError",
    "SessionsClient",
    "actions_for", "describe_error",
]

log = logging.getLogger(__name__)

BUS_NAME = "org.xenubuntu.Sessions1"
MANAGER_PATH = "/org/xenubuntu/Sessions1"
MANAGER_IFACE = "org.xenubuntu.Sessions1.Manager"
SESSION_IFACE = "org.xenubuntu.Sessions1.Session"
JOB_IFACE = "org.xenubuntu.Sessions1.Job"
OFFICE_IFACE = "org.xenubuntu.Sessions1.Office"
OFFICE_PATH = MANAGER_PATH + "/office"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
ERROR_PREFIX = "org.xenubuntu.Sessions1.Error."
#: polkit may show a password dialog before the daemon answers
CALL_TIMEOUT_MS = 5 * 60 * 1000

#: which session methods the API accepts in which state (the engine's table, as
#: documented in the introspection data); the chooser offers only these
ACTIONS: dict[str, frozenset[str]] = {
    "Pause": frozenset({"running"}),
    "Resume": frozenset({"paused"}),
    "Stop": frozenset({"queued", "running", "paused"}),
    "Reset": frozenset({"running", "paused", "stopped", "failed", "available"}),
}
#: states in which a session has a display to show
ACTIVE_STATES = frozenset({"running", "paused"})
#: what ``GetPicture`` may say it returned: the screen now, the screen saved at
#: mastering, or nothing (docs/dbus.md)
PICTURE_KINDS = frozenset({"live", "still", ""})
#: a picture takes the daemon a screendump; it answers from a cache within a second
PICTURE_TIMEOUT_MS = 20 * 1000


@dataclass(frozen=True)
class Session:
    """One session as the daemon last described it (a snapshot; the client replaces it on change)."""

    path: str
    name: str
    title: str = ""
    state: str = "available"
    reason: str = ""
    progress: float = 0.0
    bytes_done: int = 0
    bytes_total: int = 0
    priority: int = 0
    memory_mib: int = 0
    console: dict[str, Any] = field(default_factory=dict)
    last_change: float = 0.0
    description: str = ""   # one sentence for the chooser's card
    source: str = ""        # initrd (a demo guest), disk (an installed system), iso (a live ISO)

    @property
    def vnc(self) -> str:
        """Where its display is (``unix:PATH`` or ``HOST:PORT``), or "" while it has none."""
        return str(self.console.get("vnc", "")) if self.state in ACTIVE_STATES else ""


_SESSION_FIELDS = {
    "Name": "name", "Title": "title", "State": "state", "StateReason": "reason", "Progress": "progress",
    "BytesDone": "bytes_done", "BytesTotal": "bytes_total", "Priority": "priority", "MemoryMiB": "memory_mib",
    "Console": "console", "LastChange": "last_change", "Description": "description", "Source": "source",
}


@dataclass(frozen=True)
class Manager:
    """The manager-wide facts the chooser shows (default flavour, memory, warnings)."""

    version: str = ""
    backend: str = ""
    default_flavour: str = ""
    restore_policy: str = ""
    memory: dict[str, Any] = field(default_factory=dict)
    medium: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


_MANAGER_FIELDS = {
    "Version": "version", "Backend": "backend", "DefaultFlavour": "default_flavour",
    "RestorePolicy": "restore_policy", "Memory": "memory", "Medium": "medium", "Warnings": "warnings",
}


@dataclass(frozen=True)
class Job:
    """An install job (docs/dbus.md, "Install jobs"), as the daemon last described it."""

    path: str
    number: int = 0
    session: str = ""
    flavour: str = ""
    state: str = ""
    target: str = ""
    progress: float = 0.0
    bytes_done: int = 0
    bytes_total: int = 0
    rate: int = 0
    expected_end: int = 0
    error: str = ""


_JOB_FIELDS = {
    "Number": "number", "Session": "session", "Flavour": "flavour", "State": "state", "Target": "target",
    "Progress": "progress", "BytesDone": "bytes_done", "BytesTotal": "bytes_total", "Rate": "rate",
    "ExpectedEndTime": "expected_end", "Error": "error",
}


@dataclass(frozen=True)
class Office:
    """The medium's office (docs/dbus.md, "The office"), as the daemon last described it;
    sessions by name."""

    state: str = "absent"
    server: str = ""
    desktops: tuple[str, ...] = ()
    started: float = 0.0
    counters: dict[str, Any] = field(default_factory=dict)
    workers: dict[str, tuple[str, str]] = field(default_factory=dict)


_OFFICE_FIELDS = {"State": "state", "Server": "server", "Desktops": "desktops", "Started": "started",
                  "Counters": "counters", "Workers": "workers"}


def _office_values(props: Mapping[str, Any]) -> dict[str, Any]:
    """Object paths as session names, as the rest of the client has them."""
    out = dict(props)
    if "Server" in out:
        out["Server"] = str(out["Server"]).rsplit("/", 1)[-1] if out["Server"] != "/" else ""
    if "Desktops" in out:
        out["Desktops"] = tuple(str(p).rsplit("/", 1)[-1] for p in out["Desktops"])
    if "Workers" in out:
        out["Workers"] = {k: tuple(v) for k, v in out["Workers"].items()}
    return out


def _apply(obj: Any, fields: Mapping[str, str], props: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """A copy of ``obj`` with the D-Bus properties it knows; the names that changed."""
    changes: dict[str, Any] = {}
    for prop, value in props.items():
        attr = fields.get(prop)
        if attr is None:
            continue
        if isinstance(value, list) and attr == "warnings":
            value = tuple(value)
        if getattr(obj, attr) != value:
            changes[attr] = value
    names = [p for p, a in fields.items() if a in changes]
    return (replace(obj, **changes) if changes else obj), names


def actions_for(state: str) -> list[str]:
    """The session methods that make sense in ``state``, in the order the chooser shows them."""
    return [m for m in ("Pause", "Resume", "Stop", "Reset") if state in ACTIONS[m]]


@dataclass(frozen=True)
class CallError:
    """A refused or failed call: what was asked, the D-Bus error and what it means to a person."""

    method: str
    flavour: str
    name: str        # the D-Bus error name, e.g. org.xenubuntu.Sessions1.Error.NotEnoughMemory
    message: str     # the daemon's own sentence
    meaning: str     # what the front-end shows

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    def __str__(self) -> str:
        return self.meaning


_NEEDS_RE = re.compile(r"needs (\d+) MiB but only (-?\d+) MiB are free")


def describe_error(name: str, message: str, flavour: str, sessions: Mapping[str, Session]) -> str:
    """A sentence for a person: the error's meaning first, the daemon's words after.

    ``NotEnoughMemory`` says how much is needed and which running sessions could be
    stopped; when the daemon did not name any, the sessions this client knows to
    hold memory are suggested, largest first.
    """
    short = name.rsplit(".", 1)[-1]
    title = sessions[flavour].title if flavour in sessions and sessions[flavour].title else flavour
    if short == "NotEnoughMemory":
        m = _NEEDS_RE.search(message)
        text = f"Not enough memory for {title}"
        if m:
            text += f": it needs {m.group(1)} MiB, {m.group(2)} MiB are free"
        if "would make room" in message:
            names = message.rsplit("stopping ", 1)[-1].split(" would make room")[0].split(", ")
            stop = ", ".join(sessions[n].title or n if n in sessions else n for n in names)
            text += f". Stopping {stop} would make room."
        else:
            holders = sorted((s for s in sessions.values() if s.state in ACTIVE_STATES and s.name != flavour),
                             key=lambda s: -s.memory_mib)
            if holders:
                text += ". Stop " + " or ".join(f"{s.title or s.name} ({s.memory_mib} MiB)" for s in holders) \
                        + " to make room."
            else:
                text += "."
        return text
    meanings = {
        "NoSuchFlavour": f"{title} is not on this medium",
        "MediumUnavailable": "The medium cannot be read",
        "StatefileCorrupt": f"The saved state of {title} is damaged",
        "InvalidState": f"{title} cannot do that now",
        "NotAuthorized": "You are not allowed to do that",
        "Failed": f"{title}: the session manager failed",
        "InvalidArgs": "The session manager did not understand the request",
        "ServiceUnknown": "The session manager is not running",
        "NameHasNoOwner": "The session manager is not running",
        "NoReply": "The session manager did not answer",
        "AccessDenied": "The system bus refused the request",
        "TargetIsLiveMedium": "That disk holds the live system",
        "TargetInUse": "That disk is in use",
        "TargetTooSmall": f"That disk is too small for {title}",
        "NoSuchTarget": "That is not a disk",
        "TargetRefused": "That disk cannot be used",
        "NoSuchJob": "That install request is gone",
        "NoOffice": "This medium has no office",
    }
    head = meanings.get(short, f"{title}: {short}")
    return f"{head}: {message}" if message else head


def _remote_error(e: GLib.Error) -> tuple[str, str]:
    """(D-Bus error name, the sender's message) of a failed call."""
    name = Gio.DBusError.get_remote_error(e) or ""
    message = e.message
    prefix = f"GDBus.Error:{name}: "
    if name and message.startswith(prefix):
        message = message[len(prefix):]
    return name or "org.freedesktop.DBus.Error.Failed", message


class SessionsClient(GObject.Object):
    """Follows ``org.xenubuntu.Sessions1`` on one bus connection and offers its methods.

    ``address`` selects a bus by address (a private test bus); by default the
    system bus. Call :meth:`start` once a main loop will run; :meth:`close` at the end.
    """

    __gsignals__ = {
        "connected": (GObject.SignalFlags.RUN_LAST, None, ()),
        "disconnected": (GObject.SignalFlags.RUN_LAST, None, ()),
        "session-added": (GObject.SignalFlags.RUN_LAST, None, (str,)),
        "session-removed": (GObject.SignalFlags.RUN_LAST, None, (str,)),
        "session-changed": (GObject.SignalFlags.RUN_LAST, None, (str, object)),
        "manager-changed": (GObject.SignalFlags.RUN_LAST, None, (object,)),
        "call-failed": (GObject.SignalFlags.RUN_LAST, None, (object,)),
        "job-added": (GObject.SignalFlags.RUN_LAST, None, (str,)),
        "job-changed": (GObject.SignalFlags.RUN_LAST, None, (str, object)),
        "job-removed": (GObject.SignalFlags.RUN_LAST, None, (str,)),
        "office-changed": (GObject.SignalFlags.RUN_LAST, None, (object,)),
        "office-activity": (GObject.SignalFlags.RUN_LAST, None, (object,)),
    }

    def __init__(self, address: str | None = None):
        super().__init__()
        self.address = address
        self.con: Gio.DBusConnection | None = None
        self.owner: str = ""               # the daemon's unique name while it runs
        self.sessions: dict[str, Session] = {}   # name -> snapshot, in restore order
        self.jobs: dict[str, Job] = {}           # path -> install job
        self.manager = Manager()
        #: the medium's office; None when it has none (or the daemon is away)
        self.office: Office | None = None
        #: the office's latest activity, oldest first: (time, session name, kind, id)
        self.activity: list[tuple[float, str, str, str]] = []
        self._watch_id = 0
        self._subscriptions: list[int] = []
        self._load_serial = 0              # a newer owner makes older answers stale

    # -- connecting ----------------------------------------------------------------
    def start(self) -> None:
        """Connect to the bus and watch the daemon's name (its appearing loads everything).

        :raises GLib.Error: the bus itself cannot be reached.
        """
        if self.address:
            self.con = Gio.DBusConnection.new_for_address_sync(
                self.address,
                Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
                None, None)
        else:
            self.con = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
        self.con.set_exit_on_close(False)
        for iface, member, path in ((PROPERTIES_IFACE, "PropertiesChanged", None),
                                    (OBJECT_MANAGER_IFACE, "InterfacesAdded", MANAGER_PATH),
                                    (OBJECT_MANAGER_IFACE, "InterfacesRemoved", MANAGER_PATH),
                                    (OFFICE_IFACE, "Activity", OFFICE_PATH)):
            # sender is the well-known name: the bus daemon delivers what its owner sends
            self._subscriptions.append(self.con.signal_subscribe(
                BUS_NAME, iface, member, path, None, Gio.DBusSignalFlags.NONE, self._on_signal))
        self._watch_id = Gio.bus_watch_name_on_connection(
            self.con, BUS_NAME, Gio.BusNameWatcherFlags.NONE, self._on_appeared, self._on_vanished)

    def close(self) -> None:
        """Stop watching; idempotent."""
        if self._watch_id:
            Gio.bus_unwatch_name(self._watch_id)
            self._watch_id = 0
        if self.con is not None:
            for sub in self._subscriptions:
                self.con.signal_unsubscribe(sub)
            self._subscriptions.clear()
            if self.address:
                self.con.close_sync(None)
            self.con = None

    @property
    def is_connected(self) -> bool:
        return bool(self.owner)

    def _on_appeared(self, con: Gio.DBusConnection, name: str, owner: str) -> None:
        log.info("%s appeared as %s", name, owner)
        self.owner = owner
        self._load_serial += 1
        serial = self._load_serial
        self._call(MANAGER_PATH, OBJECT_MANAGER_IFACE, "GetManagedObjects", None, "(a{oa{sa{sv}}})",
                   lambda reply: self._on_objects(serial, reply[0]), "GetManagedObjects", "")
        self._call(MANAGER_PATH, PROPERTIES_IFACE, "GetAll", GLib.Variant("(s)", (MANAGER_IFACE,)), "(a{sv})",
                   lambda reply: self._on_manager_props(serial, reply[0]), "GetAll", "")

    def _on_vanished(self, con: Gio.DBusConnection | None, name: str) -> None:
        was = self.owner
        self.owner = ""
        self._load_serial += 1
        for n in list(self.sessions):
            del self.sessions[n]
            self.emit("session-removed", n)
        for path in list(self.jobs):
            del self.jobs[path]
            self.emit("job-removed", path)
        if self.office is not None:
            self.office = None
            self.emit("office-changed", list(_OFFICE_FIELDS))
        if was:
            log.info("%s left the bus", name)
            self.emit("disconnected")

    def _on_objects(self, serial: int, objects: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
        if serial != self._load_serial:
            return
        fresh: dict[str, Session] = {}
        for path, ifaces in objects.items():
            if SESSION_IFACE in ifaces:
                s = self._session_from(path, ifaces[SESSION_IFACE])
                fresh[s.name] = s
        for name in [n for n in self.sessions if n not in fresh]:
            del self.sessions[name]
            self.emit("session-removed", name)
        for s in sorted(fresh.values(), key=lambda s: (s.priority, s.name)):
            self._put(s)
        jobs = {path: ifaces[JOB_IFACE] for path, ifaces in objects.items() if JOB_IFACE in ifaces}
        for path in [p for p in self.jobs if p not in jobs]:
            del self.jobs[path]
            self.emit("job-removed", path)
        for path, props in jobs.items():
            self._put_job(path, props)
        office = objects.get(OFFICE_PATH, {}).get(OFFICE_IFACE)
        self._put_office(office)
        self.emit("connected")

    def _put_office(self, props: Mapping[str, Any] | None) -> None:
        """The office as listed (None: the medium has none), or what changed of it."""
        if props is None:
            if self.office is not None:
                self.office = None
                self.emit("office-changed", list(_OFFICE_FIELDS))
            return
        self.office, names = _apply(self.office or Office(), _OFFICE_FIELDS, _office_values(props))
        if props.get("State") == "idle":
            self.activity = []
        if names:
            self.emit("office-changed", names)

    def _put_job(self, path: str, props: Mapping[str, Any]) -> None:
        job, names = _apply(self.jobs.get(path, Job(path)), _JOB_FIELDS, props)
        job = replace(job, session=job.session.rsplit("/", 1)[-1])
        known = path in self.jobs
        self.jobs[path] = job
        if known:
            if names:
                self.emit("job-changed", path, names)
        else:
            self.emit("job-added", path)

    def _put(self, s: Session) -> None:
        if s.name in self.sessions:
            self.sessions[s.name] = s
            self.emit("session-changed", s.name, list(_SESSION_FIELDS))
        else:
            self.sessions[s.name] = s
            self.emit("session-added", s.name)

    def _on_manager_props(self, serial: int, props: Mapping[str, Any]) -> None:
        if serial != self._load_serial:
            return
        self.manager, changed = _apply(self.manager, _MANAGER_FIELDS, props)
        self.emit("manager-changed", changed)

    @staticmethod
    def _session_from(path: str, props: Mapping[str, Any]) -> Session:
        s, _ = _apply(Session(path=path, name=path.rsplit("/", 1)[-1]), _SESSION_FIELDS, props)
        return s

    def _on_signal(self, con: Gio.DBusConnection, sender: str, path: str, iface: str, signal: str,
                   params: GLib.Variant) -> None:
        if self.owner and sender != self.owner:
            return  # an old owner's last words
        if signal == "PropertiesChanged":
            target_iface, changed, _invalidated = params.unpack()
            if target_iface == SESSION_IFACE:
                name = path.rsplit("/", 1)[-1]
                old = self.sessions.get(name)
                if old is None:
                    return
                self.sessions[name], names = _apply(old, _SESSION_FIELDS, changed)
                if names:
                    self.emit("session-changed", name, names)
            elif target_iface == MANAGER_IFACE:
                self.manager, names = _apply(self.manager, _MANAGER_FIELDS, changed)
                if names:
                    self.emit("manager-changed", names)
            elif target_iface == JOB_IFACE and path in self.jobs:
                self._put_job(path, changed)
            elif target_iface == OFFICE_IFACE and self.office is not None:
                self._put_office(changed)
        elif signal == "Activity":
            at, session, kind, item = params.unpack()
            record = (float(at), str(session).rsplit("/", 1)[-1], str(kind), str(item))
            self.activity = (self.activity + [record])[-200:]
            self.emit("office-activity", record)
        elif signal == "InterfacesAdded":
            obj, ifaces = params.unpack()
            if SESSION_IFACE in ifaces:
                self._put(self._session_from(obj, ifaces[SESSION_IFACE]))
            if JOB_IFACE in ifaces:
                self._put_job(obj, ifaces[JOB_IFACE])
            if OFFICE_IFACE in ifaces and obj == OFFICE_PATH:
                self._put_office(ifaces[OFFICE_IFACE])
        elif signal == "InterfacesRemoved":
            obj, ifaces = params.unpack()
            name = obj.rsplit("/", 1)[-1]
            if SESSION_IFACE in ifaces and name in self.sessions:
                del self.sessions[name]
                self.emit("session-removed", name)
            if JOB_IFACE in ifaces and obj in self.jobs:
                del self.jobs[obj]
                self.emit("job-removed", obj)

    # -- methods -----------------------------------------------------------------------
    def activate(self, flavour: str, reset: bool = False,
                 done: Callable[[str], None] | None = None) -> None:
        """Ask for ``flavour`` to run (restored now, resumed, or nothing if it runs)."""
        options = {"reset": GLib.Variant("b", True)} if reset else {}
        self._call(MANAGER_PATH, MANAGER_IFACE, "Activate", GLib.Variant("(sa{sv})", (flavour, options)), "(o)",
                   (lambda reply: done(reply[0])) if done else None, "Activate", flavour)

    def session_call(self, flavour: str, method: str, done: Callable[[], None] | None = None) -> None:
        """One of the Session methods: Activate, Pause, Resume, Stop, Reset."""
        path = self.sessions[flavour].path if flavour in self.sessions else f"{MANAGER_PATH}/session/{flavour}"
        self._call(path, SESSION_IFACE, method, None, "()", (lambda reply: done()) if done else None,
                   method, flavour)

    def install_targets(self, flavour: str, done: Callable[[list[tuple[str, int, str]]], None]) -> None:
        """The disks ``flavour`` may be installed onto: ``done([(device, bytes, model), ...])``."""
        self._call(MANAGER_PATH, MANAGER_IFACE, "ListInstallTargets", GLib.Variant("(s)", (flavour,)), "(a(sts))",
                   lambda reply: done(list(reply[0])), "ListInstallTargets", flavour)

    def job_call(self, path: str, method: str, disk: str = "", done: Callable[[], None] | None = None) -> None:
        """``Confirm`` (onto ``disk``) or ``Cancel`` an install job."""
        job = self.jobs.get(path)
        args = GLib.Variant("(s)", (disk,)) if method == "Confirm" else None
        self._call(path, JOB_IFACE, method, args, "()", (lambda reply: done()) if done else None,
                   f"install {method}", job.flavour if job else "")

    def office_call(self, method: str, done: Callable[[], None] | None = None) -> None:
        """One of the Office methods: Start, Pause, Reset."""
        self._call(OFFICE_PATH, OFFICE_IFACE, method, None, "()", (lambda reply: done()) if done else None,
                   f"office {method}", "")

    def get_picture(self, flavour: str, max_width: int, done: Callable[[bytes, str], None],
                    failed: Callable[[str], None] | None = None) -> None:
        """What ``flavour`` looks like, asynchronously: ``done(png, kind)`` with kind ``live``
        (its screen now, at most ``max_width`` wide), ``still`` (the screen saved at
        mastering, full size) or ``""`` (no picture, no bytes).

        A refused or failed call, or an answer of an unknown kind, calls
        ``failed(reason)`` instead (no ``call-failed``: the chooser just keeps the
        picture it has) and nothing once the daemon has left the bus.
        """
        if self.con is None:
            return
        path = self.sessions[flavour].path if flavour in self.sessions else f"{MANAGER_PATH}/session/{flavour}"

        def finish(con: Gio.DBusConnection, result: Gio.AsyncResult) -> None:
            try:
                reply = con.call_finish(result)
            except GLib.Error as e:
                name, message = _remote_error(e)
                log.debug("GetPicture %s failed: %s (%s)", flavour, message, name)
                if failed is not None:
                    failed(f"{message} ({name})")
                return
            # the bytes as one buffer: unpack() would make a list of ints of them
            png = reply.get_child_value(0).get_data_as_bytes().get_data() or b""
            kind = reply.get_child_value(1).get_string()
            if kind not in PICTURE_KINDS or (kind == "") != (not png):
                log.debug("GetPicture %s: an answer of kind %r with %d bytes", flavour, kind, len(png))
                if failed is not None:
                    failed(f"an answer of kind {kind!r} with {len(png)} bytes")
                return
            done(png, kind)

        width = GLib.Variant("(u)", (min(max(0, max_width), 0xFFFFFFFF),))
        self.con.call(BUS_NAME, path, SESSION_IFACE, "GetPicture", width, GLib.VariantType("(ays)"),
                      Gio.DBusCallFlags.NONE, PICTURE_TIMEOUT_MS, None, finish)

    def _call(self, path: str, iface: str, method: str, args: GLib.Variant | None, reply_type: str,
              done: Callable[[Any], None] | None, what: str, flavour: str) -> None:
        if self.con is None:
            return

        def finish(con: Gio.DBusConnection, result: Gio.AsyncResult) -> None:
            try:
                reply = con.call_finish(result)
            except GLib.Error as e:
                name, message = _remote_error(e)
                err = CallError(what, flavour, name, message, describe_error(name, message, flavour, self.sessions))
                log.warning("%s %s failed: %s (%s)", what, flavour, message, name)
                self.emit("call-failed", err)
                return
            if done is not None:
                done(reply.unpack())

        self.con.call(BUS_NAME, path, iface, method, args, GLib.VariantType(reply_type),
                      Gio.DBusCallFlags.NONE, CALL_TIMEOUT_MS, None, finish)
