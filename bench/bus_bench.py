"""The D-Bus layer's cost: start to READY, memory, call latency, Activate overhead.

Runs a private system-like dbus-daemon and xsessiond on the demo medium (real
QEMU guests), clients as separate processes::

    .venv/bin/python bench/bus_bench.py [--rounds 3] [--calls 300]

Measures
* daemon start to READY=1 (restore=off, median of 5 starts);
* the daemon's RSS with four sessions running;
* Properties.Get (State) and ListSessions latency, median and p99, with 1 and
  20 concurrent client processes, each on its own connection;
* Activate over D-Bus until PropertiesChanged says running, against
  Engine.activate until the engine says running, interleaved in one run, as a
  ratio of the medians and as the median of each back-to-back pair's ratio;
* meanwhile, how long each change of state takes from the engine's event to a
  client: a listener process (one client, its own connection) takes the time a
  PropertiesChanged carrying State arrives minus the LastChange it carries (the
  engine's wall-clock time of the change), median and p99, and counts the changes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gi.repository import Gio, GLib

from xsession.bootopts import parse_cmdline
from xsession.engine import Engine, SessionView, State
from xsession.demomedia import ensure_demo_medium
from xsession.privatebus import system_like_config
from xsession.hypervisor.qemu import QemuBackend
from xsession.manifest import MANIFEST_RELPATH, load_manifest

BUS = "org.xenubuntu.Sessions1"
MANAGER = "/org/xenubuntu/Sessions1"
MIFACE = "org.xenubuntu.Sessions1.Manager"
SIFACE = "org.xenubuntu.Sessions1.Session"
NAMES = ("kubuntu", "ubuntu", "xubuntu", "server")


def connect(address: str) -> Gio.DBusConnection:
    return Gio.DBusConnection.new_for_address_sync(
        address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
        None, None)


def call(con: Gio.DBusConnection, path: str, iface: str, method: str, args: GLib.Variant | None = None):
    return con.call_sync(BUS, path, iface, method, args, None, 0, 60_000, None)


def start_daemon(address: str, work: Path, medium: Path, runtime: Path) -> tuple[subprocess.Popen, float]:
    sock_path = work / f"notify-{time.monotonic_ns()}.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address, NOTIFY_SOCKET=str(sock_path))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "xsession.daemon", "--medium", str(medium), "--runtime-dir",
                             str(runtime), "--cmdline", "xenubuntu.restore=off", "--stop-guests-on-exit",
                             "--no-udev"], stdout=subprocess.DEVNULL, stderr=open(work / "xsessiond.log", "ab"),
                            env=env)
    notify.settimeout(60)
    while b"READY=1" not in notify.recv(4096):
        pass
    elapsed = time.monotonic() - t0
    notify.close()
    return proc, elapsed


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def _client(args: tuple[str, str, int, mp.synchronize.Barrier]) -> list[float]:
    address, what, calls, barrier = args
    con = connect(address)
    barrier.wait()
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        if what == "get":
            call(con, f"{MANAGER}/session/kubuntu", "org.freedesktop.DBus.Properties", "Get",
                 GLib.Variant("(ss)", (SIFACE, "State")))
        else:
            call(con, MANAGER, MIFACE, "ListSessions")
        out.append(time.perf_counter() - t)
    return out


def latency(address: str, what: str, clients: int, calls: int) -> tuple[float, float]:
    ctx = mp.get_context("spawn")  # GDBus threads do not survive a fork
    with ctx.Manager() as m:
        barrier = m.Barrier(clients)
        with ctx.Pool(clients) as pool:
            results = pool.map(_client, [(address, what, calls, barrier)] * clients)
    samples = sorted(x for r in results for x in r)
    return statistics.median(samples) * 1000, samples[int(len(samples) * 0.99) - 1] * 1000


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _listener(address: str, pipe: mp.connection.Connection) -> None:
    """A client that only listens: per PropertiesChanged carrying State, arrival minus LastChange."""
    con = connect(address)
    loop = GLib.MainLoop()
    samples: list[tuple[str, str, float]] = []

    def on_signal(_c, _s, path, _i, _n, params):
        arrived = time.time()
        changed = params.unpack()[1]
        if "State" in changed and "LastChange" in changed:
            samples.append((path.rsplit("/", 1)[1], changed["State"], arrived - changed["LastChange"]))

    con.signal_subscribe(BUS, "org.freedesktop.DBus.Properties", "PropertiesChanged", None, SIFACE,
                         Gio.DBusSignalFlags.NONE, on_signal)
    con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetId", None, None,
                  0, 10_000, None)  # the match rule is in place once this returns
    pipe.send("ready")
    GLib.io_add_watch(pipe.fileno(), GLib.PRIORITY_DEFAULT, GLib.IO_IN | GLib.IO_HUP, lambda *_: loop.quit())
    loop.run()
    pipe.recv()
    pipe.send(samples)


class Listener:
    """The listener process: started before the changes, asked for its samples after."""

    def __init__(self, address: str):
        ctx = mp.get_context("spawn")  # GDBus threads do not survive a fork
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=_listener, args=(address, child), daemon=True)
        self._proc.start()
        if not self._pipe.poll(60) or self._pipe.recv() != "ready":
            raise RuntimeError("the listener did not start")

    def samples(self) -> list[tuple[str, str, float]]:
        """(session, state, seconds from the engine's change to its arrival) per change, in order."""
        time.sleep(0.2)  # the last signals on their way
        self._pipe.send("stop")
        samples = self._pipe.recv()
        self._proc.join(10)
        return samples


#: per activation, seconds from the call to the engine's change into each state, and to the end
Phases = dict[str, float]


def activate_over_bus(con: Gio.DBusConnection, name: str, timeout: float = 120,
                      phases: list[Phases] | None = None) -> float:
    """Call to the PropertiesChanged that says running."""
    loop = GLib.MainLoop()
    path = f"{MANAGER}/session/{name}"
    seen: Phases = {}

    def on_signal(_c, _s, _p, _i, _n, params):
        changed = params.unpack()[1]
        if "State" in changed and "LastChange" in changed:
            seen[changed["State"]] = changed["LastChange"]
        if changed.get("State") in ("running", "failed"):
            seen["end"] = time.time()
            loop.quit()

    sub = con.signal_subscribe(None, "org.freedesktop.DBus.Properties", "PropertiesChanged", path, SIFACE,
                               Gio.DBusSignalFlags.NONE, on_signal)
    watchdog = GLib.timeout_add(int(timeout * 1000), loop.quit)
    t, wall = time.perf_counter(), time.time()
    call(con, MANAGER, MIFACE, "Activate", GLib.Variant("(sa{sv})", (name, {})))
    loop.run()
    elapsed = time.perf_counter() - t
    if phases is not None:
        phases.append({k: v - wall for k, v in seen.items()})
    GLib.source_remove(watchdog)
    con.signal_unsubscribe(sub)
    state = call(con, path, "org.freedesktop.DBus.Properties", "Get", GLib.Variant("(ss)", (SIFACE, "State")))
    assert state.unpack()[0] == "running", state
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="activations per flavour and way")
    p.add_argument("--calls", type=int, default=300, help="calls per client in the latency runs")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="xsb-"))
    # a private hard-linked copy: a medium mastered again meanwhile does not change under us
    medium = work / "medium"
    shutil.copytree(ensure_demo_medium(report=lambda line: None), medium, copy_function=os.link)
    bus = subprocess.Popen(["dbus-daemon", f"--config-file={system_like_config(work)}", "--nofork",
                            "--print-address"], stdout=subprocess.PIPE)
    address = bus.stdout.readline().decode().strip()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, QEMU TCG; python {platform.python_version()}")
    try:
        starts = []
        for i in range(5):
            proc, elapsed = start_daemon(address, work, medium, work / f"r{i}")
            starts.append(elapsed)
            stop(proc)
        print(f"start to READY=1: median {statistics.median(starts) * 1000:.0f} ms "
              f"(min {min(starts) * 1000:.0f}, max {max(starts) * 1000:.0f})")

        proc, _ = start_daemon(address, work, medium, work / "run")
        con = connect(address)
        try:
            idle = rss_mib(proc.pid)
            for name in NAMES:
                activate_over_bus(con, name)
            print(f"daemon RSS: {idle:.1f} MiB idle, {rss_mib(proc.pid):.1f} MiB with four sessions running")
            for what, label in (("get", "Properties.Get(State)"), ("list", "ListSessions()")):
                for clients in (1, 20):
                    med, p99 = latency(address, what, clients, args.calls)
                    print(f"{label:<22} {clients:>2} client(s): median {med:.2f} ms, p99 {p99:.2f} ms")
            for name in NAMES:
                call(con, f"{MANAGER}/session/{name}", SIFACE, "Stop")

            # Activate over D-Bus vs the engine in this process, interleaved on the same medium
            manifest = load_manifest(medium / MANIFEST_RELPATH)
            engine = Engine(manifest, QemuBackend(), work / "direct", parse_cmdline("xenubuntu.restore=off"))
            bus_t, direct_t = [], []
            bus_phases: list[Phases] = []
            direct_phases: list[Phases] = []
            changes_of: dict[str, Phases] = {n: {} for n in NAMES}

            def on_engine_event(event: str, view: SessionView | None) -> None:
                if view is not None and event != "progress":
                    changes_of[view.name].setdefault(view.state.value, view.last_change)

            engine.subscribe(on_engine_event)
            listener = Listener(address)
            try:
                for _ in range(args.rounds):
                    for name in NAMES:
                        bus_t.append(activate_over_bus(con, name, phases=bus_phases))
                        call(con, f"{MANAGER}/session/{name}", SIFACE, "Stop")
                        seen: Phases = {}
                        t, wall = time.perf_counter(), time.time()
                        engine.activate(name)
                        engine.wait_state(name, {State.RUNNING}, 120)
                        direct_t.append(time.perf_counter() - t)
                        seen["end"] = time.time()
                        direct_phases.append({k: v - wall for k, v in {**changes_of[name], **seen}.items()})
                        changes_of[name] = {}
                        engine.stop(name)
            finally:
                engine.shutdown(stop_guests=True)
            changes = listener.samples()
            b, d = statistics.median(bus_t), statistics.median(direct_t)
            # each pair ran back to back on the same flavour: its ratio is little moved by the machine's
            # load drifting over the run, which moves the two medians apart
            paired = statistics.median(x / y for x, y in zip(bus_t, direct_t, strict=True))
            print(f"activate to running: over D-Bus median {b * 1000:.0f} ms, Engine.activate median "
                  f"{d * 1000:.0f} ms, ratio {b / d:.2f}x ({len(bus_t)} each, interleaved); "
                  f"median of the {len(bus_t)} paired ratios {paired:.2f}x")
            for label, ph in (("over D-Bus", bus_phases), ("in process", direct_phases)):
                print(f"  {label}, medians from the call: " + ", ".join(
                    f"{st} {statistics.median(x[st] for x in ph if st in x) * 1000:.1f} ms"
                    for st in ("queued", "restoring", "running", "end") if any(st in x for x in ph)))
            delays = sorted(x for _, _, x in changes)
            states = [st for _, st, _ in changes]
            slowest = max(changes, key=lambda c: c[2])
            expected = len(bus_t) * 4  # queued, restoring, running, stopped
            print(f"state change to PropertiesChanged at a client: median {statistics.median(delays) * 1000:.2f} ms, "
                  f"p99 {delays[max(0, int(len(delays) * 0.99) - 1)] * 1000:.2f} ms, max {delays[-1] * 1000:.2f} ms "
                  f"({slowest[0]} {slowest[1]}) "
                  f"({len(delays)} changes seen of {expected}: " + ", ".join(
                      f"{st} {states.count(st)}" for st in dict.fromkeys(states)) + ")")
        finally:
            stop(proc)
    finally:
        bus.terminate()
        bus.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
