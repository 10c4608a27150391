"""Running the D-Bus side for real in tests: a private system-like bus, polkitd on it,
xsessiond as its own process with a readiness socket, and clients as other processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gi.repository import Gio, GLib

from xsession import privatebus
from xsession.privatebus import BUS_NAME, UNITS

REPO = Path(__file__).resolve().parent.parent
MANAGER_PATH = "/org/xenubuntu/Sessions1"
MANAGER_IFACE = "org.xenubuntu.Sessions1.Manager"
SESSION_IFACE = "org.xenubuntu.Sessions1.Session"
ERROR = "org.xenubuntu.Sessions1.Error."
POLKIT_CONF = Path("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf")
#: the unprivileged user that polkit refuses, and the one a test rule lets manage sessions
NOBODY = "nobody"
HELPER_USER = "daemon"
TEST_RULE = f"""\
// test rule: {HELPER_USER} may manage sessions (not administer)
polkit.addRule(function(action, subject) {{
    if (action.id == "org.xenubuntu.sessions1.manage" && subject.user == "{HELPER_USER}") {{
        return polkit.Result.YES;
    }}
}});
"""


def system_like_config(folder: Path) -> Path:
    """The system-like bus, with polkit's policy too (the tests run a real polkitd)."""
    return privatebus.system_like_config(folder, listen="unix:tmpdir=/tmp", includes=(POLKIT_CONF,))


def connect(address: str) -> Gio.DBusConnection:
    return Gio.DBusConnection.new_for_address_sync(
        address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
        None, None)


def wait_for_name(address: str, name: str, timeout: float = 20.0) -> None:
    con = connect(address)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            has = con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                "NameHasOwner", GLib.Variant("(s)", (name,)), None, 0, 5000, None).unpack()[0]
            if has:
                return
            time.sleep(0.05)
    finally:
        con.close_sync(None)
    raise TimeoutError(f"{name} did not appear on {address} within {timeout} s")


def as_user(user: str, *cmd: str) -> list[str]:
    group = "nogroup" if user == NOBODY else user
    return ["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups", *cmd]


def busctl(address: str, *args: str, user: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    cmd = ["busctl", f"--address={address}", "--timeout=20", *args]
    return subprocess.run(as_user(user, *cmd) if user else cmd, capture_output=True, text=True, timeout=timeout)


def gdbus(address: str, *args: str, user: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    cmd = ["gdbus", *args[:1], "--address", address, *args[1:]]
    return subprocess.run(as_user(user, *cmd) if user else cmd, capture_output=True, text=True, timeout=timeout)


def ctl(address: str, *args: str, user: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``xsessionctl`` as its own process (as another user: Debian's python, the source tree on its path)."""
    python = "/usr/bin/python3" if user else sys.executable
    cmd = [python, "-m", "xsession.ctl", "--address", address, *args]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(as_user(user, *cmd) if user else cmd, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd="/")


class Client:
    """A D-Bus client in the test process (the daemon is another process)."""

    def __init__(self, address: str):
        self.con = connect(address)

    def close(self) -> None:
        self.con.close_sync(None)

    def call(self, path: str, iface: str, method: str, args: GLib.Variant | None = None) -> Any:
        reply = self.con.call_sync(BUS_NAME, path, iface, method, args, None, 0, 60_000, None)
        return reply.unpack() if reply is not None else ()

    def error(self, path: str, iface: str, method: str, args: GLib.Variant | None = None) -> str:
        """The D-Bus error name a call returns (fails the test if it succeeds)."""
        try:
            self.call(path, iface, method, args)
        except GLib.Error as e:
            return Gio.DBusError.get_remote_error(e) or e.message
        raise AssertionError(f"{method} on {path} succeeded")

    def prop(self, path: str, iface: str, name: str) -> Any:
        return self.call(path, "org.freedesktop.DBus.Properties", "Get", GLib.Variant("(ss)", (iface, name)))[0]

    def state(self, name: str) -> str:
        return str(self.prop(f"{MANAGER_PATH}/session/{name}", SESSION_IFACE, "State"))

    def states(self) -> dict[str, str]:
        return {n: st for n, _, st, _ in self.call(MANAGER_PATH, MANAGER_IFACE, "ListSessions")[0]}

    def session(self, name: str) -> dict[str, Any]:
        return self.call(f"{MANAGER_PATH}/session/{name}", "org.freedesktop.DBus.Properties", "GetAll",
                         GLib.Variant("(s)", (SESSION_IFACE,)))[0]

    def activate(self, name: str, **options: GLib.Variant) -> str:
        return str(self.call(MANAGER_PATH, MANAGER_IFACE, "Activate",
                             GLib.Variant("(sa{sv})", (name, options)))[0])

    def wait_state(self, name: str, states: set[str], timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state(name)
            if st in states:
                return st
            time.sleep(0.05)
        raise TimeoutError(f"{name} is {self.state(name)}, not {sorted(states)}, after {timeout} s")


class Signals:
    """Every PropertiesChanged on the bus, in the order it arrived, received by a thread
    of its own on its own connection (the test's calls do not hold it up)."""

    def __init__(self, address: str):
        self.received: list[tuple[str, str, dict[str, Any]]] = []   # (path, interface, changed)
        self._cond = threading.Condition()
        self._context = GLib.MainContext()
        self._loop = GLib.MainLoop(self._context)
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(address, ready), daemon=True)
        self._thread.start()
        assert ready.wait(20), "the signal listener did not start"

    def _run(self, address: str, ready: threading.Event) -> None:
        self._context.push_thread_default()
        con = connect(address)
        con.signal_subscribe(BUS_NAME, "org.freedesktop.DBus.Properties", "PropertiesChanged", None, None,
                             Gio.DBusSignalFlags.NONE, self._on_signal)
        # the match rule is in place once a call made after it returns
        con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetId", None, None,
                      0, 10_000, None)
        ready.set()
        self._loop.run()
        con.close_sync(None)
        self._context.pop_thread_default()

    def _on_signal(self, _con, _sender, path, _iface, _name, params) -> None:
        iface, changed, _invalidated = params.unpack()
        with self._cond:
            self.received.append((path, iface, changed))
            self._cond.notify_all()

    def of(self, path: str) -> list[dict[str, Any]]:
        """The changed properties of each signal of one object, in order."""
        with self._cond:
            return [changed for p, _, changed in self.received if p == path]

    def wait_for(self, path: str, prop: str, value: Any, timeout: float = 120.0) -> None:
        """Until a signal of ``path`` says ``prop`` is ``value`` (or, if callable, that ``value(prop)``)."""
        ok = value if callable(value) else lambda v: v == value
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(p == path and prop in changed and ok(changed[prop]) for p, _, changed in self.received):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no PropertiesChanged of {path} with {prop}={value!r} in {timeout} s")
                self._cond.wait(left)

    def close(self) -> None:
        self._context.invoke_full(GLib.PRIORITY_DEFAULT, self._loop.quit)
        self._thread.join(10)


@dataclass
class Daemon:
    """One xsessiond process, started with a NOTIFY_SOCKET the test listens on."""

    proc: subprocess.Popen[bytes]
    notify: socket.socket
    log: Path
    notes: list[str] = field(default_factory=list)

    def wait_ready(self, timeout: float = 60.0) -> list[str]:
        """Until READY=1 arrives; returns every notify line received so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"xsessiond exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            self.notify.settimeout(max(0.05, min(0.5, deadline - time.monotonic())))
            try:
                data = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            self.notes.extend(data.splitlines())
            if "READY=1" in data.splitlines():
                return self.notes
        raise TimeoutError(f"no READY=1 within {timeout} s: {self.log_text()[-2000:]}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.notify.close()

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.notify.close()
        return self.proc.returncode


def start_daemon(address: str, runtime_dir: Path, medium: Path, cmdline: str, *, stop_guests: bool = True,
                 extra: tuple[str, ...] = (), env_extra: dict[str, str] | None = None,
                 wrap: tuple[str, ...] = ()) -> Daemon:
    """xsessiond as the unit would run it, but on the private bus; not yet ready when it returns.

    ``wrap``: a command the daemon runs under (``ip netns exec NS``: its own network).
    Same-page merging is a machine-wide setting, and the suite runs many daemons side by
    side: each runs with ``xenubuntu.share=off`` unless its command line says otherwise."""
    if "xenubuntu.share=" not in cmdline:
        cmdline += " xenubuntu.share=off"
    index = len(list(runtime_dir.glob("xsessiond-*.log")))
    log = runtime_dir / f"xsessiond-{index}.log"
    sock_path = runtime_dir / f"notify-{index}.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    env = {k: v for k, v in os.environ.items() if k not in ("XENUBUNTU_OPTIONS", "XENUBUNTU_MEDIUM", "JOURNAL_STREAM")}
    env.update(DBUS_SYSTEM_BUS_ADDRESS=address, NOTIFY_SOCKET=str(sock_path), **(env_extra or {}))
    argv = [*wrap, sys.executable, "-m", "xsession.daemon", "--medium", str(medium), "--runtime-dir", str(runtime_dir),
            "--cmdline", cmdline, *(["--stop-guests-on-exit"] if stop_guests else []), *extra]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
    return Daemon(proc, notify, log)


def polkit_command(folder: Path) -> list[str]:
    """polkitd in a mount namespace where polkit's action and rule folders hold only
    our actions and the test rule: the host's configuration stays untouched."""
    actions = folder / "polkit-actions"
    rules = folder / "polkit-rules"
    actions.mkdir()
    rules.mkdir()
    shutil.copy(UNITS / "org.xenubuntu.sessions1.policy", actions)
    (rules / "50-xsession-test.rules").write_text(TEST_RULE)
    script = (f"mount --bind {actions} /usr/share/polkit-1/actions && "
              f"mount -t tmpfs none /usr/share/polkit-1/rules.d && "
              f"mount --bind {rules} /etc/polkit-1/rules.d && "
              f"exec /usr/lib/polkit-1/polkitd --no-debug")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]


def interface_members(xml: str) -> dict[str, set[str]]:
    """interface -> its methods, properties and signals, from introspection data."""
    import xml.etree.ElementTree as ET

    out: dict[str, set[str]] = {}
    for iface in ET.fromstring(xml).iter("interface"):
        out[iface.get("name", "")] = {f"{m.tag}:{m.get('name')}" for m in iface
                                      if m.tag in ("method", "property", "signal")}
    return out
