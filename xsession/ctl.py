"""``xsessionctl``: the session manager from a terminal, through its D-Bus API only.

It never imports the engine: what it shows and does is what any front-end
can, so it doubles as the API's first client. Errors are one line naming the
meaning of the D-Bus error; the exit status is 1 for a refused or failed
action, 2 for a wrong command line.

Examples::

    xsessionctl list
    xsessionctl activate ubuntu          # a progress bar until it runs
    xsessionctl console ubuntu           # how to reach its display
    xsessionctl --json status ubuntu
    xsessionctl watch                    # state changes as they happen
    xsessionctl jobs                     # install requests from guests
    xsessionctl install targets kubuntu  # the disks it may go onto
    xsessionctl install confirm 1 /dev/sdb
    xsessionctl install cancel 1
    xsessionctl office                   # the office: its state, sessions, workers, counters
    xsessionctl office start             # also: pause, reset
    xsessionctl office watch --count 5   # documents and events as the desktops report them
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from gi.repository import Gio, GLib

__all__ = ["main", "Client", "CtlError", "ERROR_MEANINGS"]

BUS_NAME = "org.xenubuntu.Sessions1"
MANAGER_PATH = "/org/xenubuntu/Sessions1"
MANAGER_IFACE = "org.xenubuntu.Sessions1.Manager"
SESSION_IFACE = "org.xenubuntu.Sessions1.Session"
JOB_IFACE = "org.xenubuntu.Sessions1.Job"
JOB_PATH = MANAGER_PATH + "/job"
OFFICE_IFACE = "org.xenubuntu.Sessions1.Office"
OFFICE_PATH = MANAGER_PATH + "/office"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
#: a mutating call may wait for a person to answer polkit's password dialog
ACTION_TIMEOUT_MS = 5 * 60 * 1000
READ_TIMEOUT_MS = 25_000
BUSY_STATES = ("queued", "restoring", "booting")
SETTLE_S = 1.0

ERROR_MEANINGS = {
    "org.xenubuntu.Sessions1.Error.NoSuchFlavour": "no such flavour",
    "org.xenubuntu.Sessions1.Error.NotEnoughMemory": "not enough memory",
    "org.xenubuntu.Sessions1.Error.MediumUnavailable": "the medium is unavailable",
    "org.xenubuntu.Sessions1.Error.StatefileCorrupt": "the statefile is damaged",
    "org.xenubuntu.Sessions1.Error.InvalidState": "not possible in the session's state",
    "org.xenubuntu.Sessions1.Error.NotAuthorized": "not authorized",
    "org.xenubuntu.Sessions1.Error.Failed": "failed",
    "org.freedesktop.DBus.Error.InvalidArgs": "invalid arguments",
    "org.freedesktop.DBus.Error.ServiceUnknown": "the session manager is not running",
    "org.freedesktop.DBus.Error.NameHasNoOwner": "the session manager is not running",
    "org.freedesktop.DBus.Error.AccessDenied": "the bus refused the call",
    "org.freedesktop.DBus.Error.NoReply": "the session manager did not answer",
    "org.freedesktop.DBus.Error.UnknownObject": "no such session or job",
    "org.xenubuntu.Sessions1.Error.NoSuchJob": "no such install job",
    "org.xenubuntu.Sessions1.Error.NoSuchTarget": "not a disk",
    "org.xenubuntu.Sessions1.Error.TargetIsLiveMedium": "that disk holds the live medium",
    "org.xenubuntu.Sessions1.Error.TargetInUse": "that disk is in use",
    "org.xenubuntu.Sessions1.Error.TargetTooSmall": "that disk is too small",
    "org.xenubuntu.Sessions1.Error.TargetRefused": "that disk cannot be installed onto",
    "org.xenubuntu.Sessions1.Error.HostUnfit": "this computer cannot run the flavour",
    "org.xenubuntu.Sessions1.Error.InstallFailed": "the install failed",
    "org.xenubuntu.Sessions1.Error.NoOffice": "this medium has no office",
}


class CtlError(Exception):
    """A failed call, as one line: "what: meaning: the daemon's words"."""

    def __init__(self, what: str, meaning: str, detail: str = "", name: str = ""):
        super().__init__(what, meaning, detail, name)
        self.what, self.meaning, self.detail, self.name = what, meaning, detail, name

    def __str__(self) -> str:
        return f"{self.what}: {self.meaning}" + (f": {self.detail}" if self.detail and self.detail != self.meaning
                                                  else "")

    @classmethod
    def from_glib(cls, what: str, e: GLib.Error) -> CtlError:
        name = Gio.DBusError.get_remote_error(e) or ""
        detail = e.message
        prefix = f"GDBus.Error:{name}: "
        if name and detail.startswith(prefix):
            detail = detail[len(prefix):]
        meaning = ERROR_MEANINGS.get(name, name.rsplit(".", 1)[-1] if name else "D-Bus error")
        return cls(what, meaning, detail, name)


def session_path(name: str) -> str:
    return f"{MANAGER_PATH}/session/{name}"


def plain(value: Any) -> Any:
    """Unpacked D-Bus values as JSON can hold them."""
    if isinstance(value, GLib.Variant):
        return plain(value.unpack())
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class Client:
    """A connection to the session manager on the system bus (or ``address``)."""

    def __init__(self, address: str | None = None):
        try:
            if address:
                self.con = Gio.DBusConnection.new_for_address_sync(
                    address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
                    | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
            else:
                self.con = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
        except GLib.Error as e:
            raise CtlError("connect", "cannot reach the system bus", e.message) from None

    def call(self, path: str, iface: str, method: str, args: GLib.Variant | None = None,
             reply: str | None = None, timeout_ms: int = READ_TIMEOUT_MS, what: str = "") -> Any:
        try:
            result = self.con.call_sync(BUS_NAME, path, iface, method, args,
                                        GLib.VariantType(reply) if reply else None,
                                        Gio.DBusCallFlags.NONE, timeout_ms, None)
        except GLib.Error as e:
            raise CtlError.from_glib(what or method, e) from None
        return result.unpack() if result is not None else ()

    def owner(self) -> str:
        """The daemon's unique name, to match its signals exactly."""
        try:
            return str(self.con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                          "GetNameOwner", GLib.Variant("(s)", (BUS_NAME,)),
                                          GLib.VariantType("(s)"), Gio.DBusCallFlags.NONE,
                                          READ_TIMEOUT_MS, None).unpack()[0])
        except GLib.Error as e:
            raise CtlError.from_glib("connect", e) from None

    def manager(self) -> dict[str, Any]:
        return plain(self.call(MANAGER_PATH, PROPERTIES_IFACE, "GetAll", GLib.Variant("(s)", (MANAGER_IFACE,)),
                               "(a{sv})", what="status")[0])

    def sessions(self) -> list[dict[str, Any]]:
        """Every session's properties, in the manager's order."""
        listed = self.call(MANAGER_PATH, MANAGER_IFACE, "ListSessions", reply="(a(ssso))", what="list")[0]
        objects = self.call(MANAGER_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects",
                            reply="(a{oa{sa{sv}}})", what="list")[0]
        return [plain(objects.get(path, {}).get(SESSION_IFACE, {"Name": name, "Title": title, "State": state}))
                for name, title, state, path in listed]

    def session(self, name: str) -> dict[str, Any]:
        path = self.call(MANAGER_PATH, MANAGER_IFACE, "GetSession", GLib.Variant("(s)", (name,)), "(o)",
                         what=f"status {name}")[0]
        return plain(self.call(path, PROPERTIES_IFACE, "GetAll", GLib.Variant("(s)", (SESSION_IFACE,)),
                               "(a{sv})", what=f"status {name}")[0])

    def on_session_changes(self, callback: Callable[[str, dict[str, Any]], None], name: str | None = None) -> int:
        """``callback(session name, changed properties)`` for one session or all (main loop)."""

        def on_signal(con: Gio.DBusConnection, sender: str, path: str, iface: str, signal: str,
                      params: GLib.Variant) -> None:
            interface, changed, _ = params.unpack()
            if interface == SESSION_IFACE:
                callback(path.rsplit("/", 1)[1], plain(changed))

        return self.con.signal_subscribe(self.owner(), PROPERTIES_IFACE, "PropertiesChanged",
                                         session_path(name) if name else None, SESSION_IFACE,
                                         Gio.DBusSignalFlags.NONE, on_signal)


# --- showing ------------------------------------------------------------------------

def _bar(progress: float, width: int = 30) -> str:
    filled = int(max(0.0, min(1.0, progress)) * width)
    return "[" + "#" * filled + "-" * (width - filled) + f"] {progress * 100:5.1f}%"


def _table(sessions: list[dict[str, Any]]) -> str:
    rows = [("SESSION", "STATE", "PROGRESS", "MEMORY", "REASON")]
    for s in sessions:
        progress = f"{s.get('Progress', 0.0) * 100:.0f}%"
        rows.append((s.get("Name", ""), s.get("State", ""), progress, f"{s.get('MemoryMiB', 0)} MiB",
                     s.get("StateReason", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=False)) + "  " + r[4] for r in rows)


def _console_lines(name: str, console: dict[str, Any]) -> list[str]:
    if not console:
        return [f"{name} has no console now (it is not running)"]
    lines = []
    vnc = str(console.get("vnc", ""))
    if vnc.startswith("unix:"):
        lines.append(f"vnc     {vnc}    (remote-viewer vnc+unix://{vnc[5:]})")
    elif vnc:
        lines.append(f"vnc     {vnc}    (remote-viewer vnc://{vnc})")
    for key in sorted(k for k in console if k != "vnc"):
        lines.append(f"{key:<7} {console[key]}")
    return lines


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


# --- commands -----------------------------------------------------------------------

def cmd_list(client: Client, args: argparse.Namespace) -> int:
    sessions = client.sessions()
    if args.json:
        _print_json(sessions)
    else:
        print(_table(sessions))
    return 0


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    props = client.session(args.name) if args.name else client.manager()
    if args.json:
        _print_json(props)
        return 0
    for key in sorted(props):
        value = props[key]
        if isinstance(value, dict):
            print(f"{key}:")
            for k in sorted(value):
                print(f"  {k}: {value[k]}")
        elif isinstance(value, list):
            print(f"{key}: {', '.join(map(str, value)) or '-'}")
        else:
            print(f"{key}: {value}")
    return 0


def cmd_console(client: Client, args: argparse.Namespace) -> int:
    console = client.session(args.name).get("Console", {})
    if args.json:
        _print_json(console)
    else:
        print("\n".join(_console_lines(args.name, console)))
    return 0 if console else 1


def cmd_simple(client: Client, args: argparse.Namespace) -> int:
    method = {"pause": "Pause", "resume": "Resume", "stop": "Stop", "reset": "Reset"}[args.command]
    client.call(session_path(args.name), SESSION_IFACE, method, timeout_ms=ACTION_TIMEOUT_MS,
                what=f"{args.command} {args.name}")
    if args.command == "reset" and not args.no_wait:
        return _wait_running(client, args.name, args.timeout, quiet=args.quiet)
    return 0


def cmd_set_default(client: Client, args: argparse.Namespace) -> int:
    client.call(MANAGER_PATH, MANAGER_IFACE, "SetDefault", GLib.Variant("(s)", (args.name,)),
                timeout_ms=ACTION_TIMEOUT_MS, what=f"set-default {args.name}")
    return 0


def cmd_activate(client: Client, args: argparse.Namespace) -> int:
    options: dict[str, GLib.Variant] = {}
    if args.reset:
        options["reset"] = GLib.Variant("b", True)
    if args.default:
        options["default"] = GLib.Variant("b", True)
    if args.no_ask:
        options["auth.no_user_interaction"] = GLib.Variant("b", True)
    if args.no_wait:
        client.call(MANAGER_PATH, MANAGER_IFACE, "Activate", GLib.Variant("(sa{sv})", (args.name, options)),
                    "(o)", ACTION_TIMEOUT_MS, what=f"activate {args.name}")
        return 0
    return _wait_running(client, args.name, args.timeout, quiet=args.quiet, start=lambda: client.call(
        MANAGER_PATH, MANAGER_IFACE, "Activate", GLib.Variant("(sa{sv})", (args.name, options)), "(o)",
        ACTION_TIMEOUT_MS, what=f"activate {args.name}"))


def _wait_running(client: Client, name: str, timeout: float, quiet: bool = False,
                  start: Callable[[], object] | None = None) -> int:
    """Show the session's progress until it runs (0) or fails (1); subscribed before ``start``."""
    loop = GLib.MainLoop()
    tty = sys.stdout.isatty() and not quiet
    state: dict[str, Any] = {"result": None, "shown": -1, "last": ""}

    def show(props: dict[str, Any]) -> None:
        st = props.get("State", state["last"])
        if st != state["last"]:
            if tty:
                print()
            if not quiet:
                print(f"{name}: {st}" + (f" ({props['StateReason']})" if props.get("StateReason") else ""),
                      flush=True)
            state["last"] = st
        if "Progress" in props and st == "restoring" and not quiet:
            p = float(props["Progress"])
            if tty:
                print(f"\r{name}: {_bar(p)}", end="", flush=True)
            elif int(p * 4) != state["shown"]:
                state["shown"] = int(p * 4)
                print(f"{name}: {_bar(p)}", flush=True)
        if st == "running":
            state["result"] = 0
            loop.quit()
        elif st in ("failed", "stopped"):
            state["result"] = CtlError(f"activate {name}", f"the session is {st}", props.get("StateReason", ""))
            loop.quit()

    def on_change(session: str, changed: dict[str, Any]) -> None:
        if state["result"] is None:
            show(changed)

    def on_timeout() -> bool:
        state["result"] = CtlError(f"activate {name}", f"not running after {timeout:.0f} s",
                                   f"it is {state['last']}")
        loop.quit()
        return GLib.SOURCE_REMOVE

    sub = client.on_session_changes(on_change, name)
    try:
        if start is not None:
            start()
        show(client.session(name))
        if state["result"] is None:
            GLib.timeout_add(int(timeout * 1000), on_timeout)
            loop.run()
    finally:
        client.con.signal_unsubscribe(sub)
    if isinstance(state["result"], CtlError):
        raise state["result"]
    if not quiet:
        console = client.session(name).get("Console", {})
        print("\n".join(f"{name}: {line}" for line in _console_lines(name, console)))
    return 0


def cmd_watch(client: Client, args: argparse.Namespace) -> int:
    """State changes as they happen; ``--until-settled`` ends when nothing is queued or restoring."""
    t0 = time.monotonic()
    states = {s["Name"]: s.get("State", "") for s in client.sessions()}
    shown: dict[str, int] = {}
    loop = GLib.MainLoop()

    def emit(record: dict[str, Any], line: str) -> None:
        if args.json:
            print(json.dumps(record, sort_keys=True), flush=True)
        else:
            print(f"[{time.monotonic() - t0:6.2f}s] {line}", flush=True)

    def settled() -> bool:
        return all(st not in BUSY_STATES for st in states.values())

    # the manager may queue the next restore just after one ends: settled means
    # nothing busy for SETTLE_S
    pending = {"id": 0}

    def check_settled() -> bool:
        pending["id"] = 0
        if settled():
            loop.quit()
        return GLib.SOURCE_REMOVE

    def arm() -> None:
        if pending["id"]:
            GLib.source_remove(pending["id"])
        pending["id"] = GLib.timeout_add(int(SETTLE_S * 1000), check_settled)

    def on_change(name: str, changed: dict[str, Any]) -> None:
        if "State" in changed:
            states[name] = changed["State"]
            shown.pop(name, None)
            reason = changed.get("StateReason", "")
            emit({"session": name, "state": changed["State"], "reason": reason},
                 f"{name:<8} {changed['State']:<9}" + (f"  ({reason})" if reason else ""))
        elif "Progress" in changed and states.get(name) == "restoring":
            quarter = int(float(changed["Progress"]) * 4)
            if shown.get(name) != quarter:
                shown[name] = quarter
                emit({"session": name, "progress": changed["Progress"]},
                     f"{name:<8} restoring {_bar(float(changed['Progress']), 20)}")
        if args.until_settled and "State" in changed:
            arm()

    client.on_session_changes(on_change)
    if not args.json:
        print("  ".join(f"{n} {s}" for n, s in states.items()), flush=True)
    if args.until_settled:
        arm()
    def on_timeout() -> bool:
        loop.quit()
        return GLib.SOURCE_REMOVE

    if args.timeout:
        GLib.timeout_add(int(args.timeout * 1000), on_timeout)
    client.con.connect("closed", lambda *_: loop.quit())
    loop.run()
    return 0 if not args.until_settled or settled() else 1


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def cmd_jobs(client: Client, args: argparse.Namespace) -> int:
    jobs = []
    for number, _session, _flavour, _state, path in client.call(MANAGER_PATH, MANAGER_IFACE, "ListJobs",
                                                                  reply="(a(ussso))")[0]:
        props = plain(client.call(path, PROPERTIES_IFACE, "GetAll", GLib.Variant("(s)", (JOB_IFACE,)),
                                  "(a{sv})", what=f"job {number}")[0])
        jobs.append(props)
    if args.json:
        _print_json(jobs)
        return 0
    for j in jobs:
        line = f"{j['Number']:>3}  {j['Flavour']:<12} {j['State']:<10} {j['Target'] or '-':<14}"
        if j["State"] == "running":
            line += f" {_bar(j['Progress'])} {_mib(j['Rate'])}/s"
        if j["Error"]:
            line += f"  {j['Error']}"
        print(line)
    return 0


def cmd_install(client: Client, args: argparse.Namespace) -> int:
    if args.action == "targets":
        disks = client.call(MANAGER_PATH, MANAGER_IFACE, "ListInstallTargets", GLib.Variant("(s)", (args.what,)),
                            "(a(sts))", what=f"targets for {args.what}")[0]
        if args.json:
            _print_json([{"device": d, "size": size, "model": m} for d, size, m in disks])
        else:
            for d, size, m in disks:
                print(f"{d:<16} {_mib(size):>10}  {m}")
        return 0 if disks else 1
    path = f"{JOB_PATH}/{int(args.what)}"
    if args.action == "confirm":
        if not args.disk:
            raise CtlError("install confirm", "invalid arguments", "name the target disk")
        client.call(path, JOB_IFACE, "Confirm", GLib.Variant("(s)", (args.disk,)), timeout_ms=ACTION_TIMEOUT_MS,
                    what=f"install confirm {args.what}")
        if args.no_wait:
            return 0
        while True:  # until it ends: its progress on one line
            props = plain(client.call(path, PROPERTIES_IFACE, "GetAll", GLib.Variant("(s)", (JOB_IFACE,)),
                                      "(a{sv})")[0])
            if not args.quiet:
                print(f"\r{_bar(props['Progress'])} {_mib(props['BytesDone'])} of {_mib(props['BytesTotal'])}",
                      end="", file=sys.stderr, flush=True)
            if props["State"] not in ("pending", "running"):
                if not args.quiet:
                    print(file=sys.stderr)
                print(f"job {args.what}: {props['State']}" + (f": {props['Error']}" if props["Error"] else ""))
                return 0 if props["State"] == "done" else 1
            time.sleep(0.2)
    client.call(path, JOB_IFACE, "Cancel", timeout_ms=ACTION_TIMEOUT_MS, what=f"install cancel {args.what}")
    return 0


def _office_status(client: Client, args: argparse.Namespace) -> int:
    props = plain(client.call(OFFICE_PATH, PROPERTIES_IFACE, "GetAll", GLib.Variant("(s)", (OFFICE_IFACE,)),
                              "(a{sv})", what="office")[0])
    if args.json:
        _print_json(props)
        return 0 if props["State"] != "absent" else 1
    if props["State"] == "absent":
        print("office: absent (this medium has no office)")
        return 1
    c = props["Counters"]
    name = lambda path: str(path).rsplit("/", 1)[-1]  # noqa: E731
    started = time.strftime("%H:%M:%S", time.localtime(props["Started"])) if props["Started"] else "never"
    print(f"office: {props['State']} (started {started})")
    print(f"server: {name(props['Server'])}")
    for path in props["Desktops"]:
        acknowledged, problem = props["Workers"].get(name(path), ("", ""))
        print(f"desktop: {name(path):<12} worker {acknowledged or 'unknown':<8}"
              + (f"  problem: {problem}" if problem else ""))

    def first(seconds: float) -> str:
        return f"{seconds:.1f} s after start" if seconds >= 0 else "not yet"

    print(f"documents: {c['Saved']} saved, {c['Read']} read by another desktop (first {first(c['FirstRead'])})")
    print(f"events: {c['Added']} added, {c['Seen']} seen by another desktop (first {first(c['FirstSeen'])})")
    return 0


def _office_watch(client: Client, args: argparse.Namespace) -> int:
    """One line per Activity signal until interrupted, ``--count`` lines or ``--timeout``."""
    loop = GLib.MainLoop()
    seen = {"n": 0}

    def on_signal(con: Gio.DBusConnection, sender: str, path: str, iface: str, signal: str,
                  params: GLib.Variant) -> None:
        at, session, kind, item = params.unpack()
        name = str(session).rsplit("/", 1)[-1]
        if args.json:
            print(json.dumps({"time": at, "session": name, "kind": kind, "id": item}, sort_keys=True), flush=True)
        else:
            print(f"{time.strftime('%H:%M:%S', time.localtime(at))} {name:<12} {kind:<5} {item}", flush=True)
        seen["n"] += 1
        if args.count and seen["n"] >= args.count:
            loop.quit()

    client.con.signal_subscribe(client.owner(), OFFICE_IFACE, "Activity", OFFICE_PATH, None,
                                Gio.DBusSignalFlags.NONE, on_signal)
    # the match rule is in place once a call made after it returns; an absent office says so now
    state = client.call(OFFICE_PATH, PROPERTIES_IFACE, "Get", GLib.Variant("(ss)", (OFFICE_IFACE, "State")),
                        "(v)", what="office watch")[0]
    if state == "absent":
        raise CtlError("office watch", ERROR_MEANINGS["org.xenubuntu.Sessions1.Error.NoOffice"])
    print("watching the office's activity", file=sys.stderr, flush=True)
    if args.timeout:
        GLib.timeout_add(int(args.timeout * 1000), lambda: loop.quit() or GLib.SOURCE_REMOVE)
    client.con.connect("closed", lambda *_: loop.quit())
    loop.run()
    return 0 if not args.count or seen["n"] >= args.count else 1


def cmd_office(client: Client, args: argparse.Namespace) -> int:
    if args.action == "status":
        return _office_status(client, args)
    if args.action == "watch":
        return _office_watch(client, args)
    client.call(OFFICE_PATH, OFFICE_IFACE, args.action.capitalize(), timeout_ms=ACTION_TIMEOUT_MS,
                what=f"office {args.action}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xsessionctl", description=__doc__.split("\n\n")[0],
                                epilog="Talks to org.xenubuntu.Sessions1 on the system bus "
                                       "($DBUS_SYSTEM_BUS_ADDRESS, or --address).")
    p.add_argument("--address", help="a D-Bus address instead of the system bus")
    p.add_argument("--json", action="store_true", help="machine-readable output (read commands)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[Client, argparse.Namespace], int], help: str,
            with_name: bool | None = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
        if with_name:
            sp.add_argument("name", metavar="NAME", help="the flavour")
        elif with_name is None:
            sp.add_argument("name", metavar="NAME", nargs="?", help="the flavour (none: the manager)")
        sp.set_defaults(func=func)
        return sp

    add("list", cmd_list, "every session, its state and progress", with_name=False)
    add("status", cmd_status, "all properties of a session, or of the manager", with_name=None)
    a = add("activate", cmd_activate, "make a session run, with a progress bar until it does")
    a.add_argument("--reset", action="store_true", help="start from the pristine statefile")
    a.add_argument("--default", action="store_true", help="also make it the default flavour")
    for sp in (a, add("reset", cmd_simple, "discard a session and restore it from the pristine statefile")):
        sp.add_argument("--no-wait", action="store_true", help="return once the manager accepted")
        sp.add_argument("--timeout", type=float, default=300.0, help="give up waiting after this many seconds")
        sp.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    a.add_argument("--no-ask", action="store_true", help="fail rather than ask for a password")
    add("pause", cmd_simple, "pause a running session")
    add("resume", cmd_simple, "resume a paused session")
    add("stop", cmd_simple, "stop a session (its changes are lost)")
    add("set-default", cmd_set_default, "make a flavour the default")
    add("console", cmd_console, "how to reach a session's display")
    w = add("watch", cmd_watch, "print state changes as they happen (Ctrl-C ends)", with_name=False)
    w.add_argument("--until-settled", action="store_true",
                   help=f"end when no session was queued, restoring or booting for {SETTLE_S:.0f} s")
    w.add_argument("--timeout", type=float, default=0.0, help="end after this many seconds")
    add("jobs", cmd_jobs, "install requests from guests and installs", with_name=False)
    i = add("install", cmd_install, "the disks a flavour may be installed onto; confirm or cancel a job",
            with_name=False)
    i.add_argument("action", choices=("targets", "confirm", "cancel"))
    i.add_argument("what", metavar="FLAVOUR|JOB", help="targets: the flavour; confirm, cancel: the job number")
    i.add_argument("disk", nargs="?", help="confirm: the target disk (see targets)")
    i.add_argument("--no-wait", action="store_true", help="confirm: return once the install started")
    i.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    o = add("office", cmd_office, "the office: its status; start, pause or reset it; watch its activity",
            with_name=False)
    o.add_argument("action", nargs="?", default="status", choices=("status", "start", "pause", "reset", "watch"))
    o.add_argument("--count", type=int, default=0, help="watch: end after this many lines")
    o.add_argument("--timeout", type=float, default=0.0, help="watch: end after this many seconds")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    try:
        client = Client(args.address)
        return int(args.func(client, args))
    except CtlError as e:
        print(f"xsessionctl: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
