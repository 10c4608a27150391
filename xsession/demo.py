"""``xsession-demo``: the product's main job on the built-in demo medium, as a person sees it.

Builds the demo flavours and masters the demo medium when needed (cached in
``.cache/``). Then it starts a private ``dbus-daemon`` whose policy is the
system bus's (with the project's own bus policy included), runs ``xsessiond``
on it as its own process, as the boot would (default ``kubuntu``, policy
``lazy``), and follows it with ``xsessionctl watch`` and ``xsessionctl list``
until every session runs, ending with their console addresses. Everything it
started (the guests too) is stopped at the end or on Ctrl-C; ``--hold`` keeps
the sessions until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .demomedia import ensure_demo_medium, ensure_desktop_medium
from .errors import XSessionError
from .privatebus import system_like_config

__all__ = ["main"]

BOOT_CMDLINE = "xenubuntu.flavour=kubuntu xenubuntu.restore=lazy"
DESKTOPS_CMDLINE = "xenubuntu.flavour=xubuntu xenubuntu.restore=lazy"


def _ctl(address: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "xsession.ctl", "--address", address, *args]


def _wait_ready(notify: socket.socket, daemon: subprocess.Popen[bytes], timeout: float) -> str:
    """The daemon's STATUS once it sent READY=1 (systemd's notify protocol, as the unit uses it).

    :raises RuntimeError: it exited or was not ready in time.
    """
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"xsessiond exited with status {daemon.returncode}")
        notify.settimeout(0.2)
        try:
            lines = notify.recv(4096).decode().splitlines()
        except TimeoutError:
            continue
        status = next((line[7:] for line in lines if line.startswith("STATUS=")), status)
        if "READY=1" in lines:
            return status
    raise RuntimeError(f"xsessiond was not ready within {timeout:.0f} s")


def _end(proc: subprocess.Popen | None, timeout: float = 15.0) -> bool:
    """SIGTERM, then SIGKILL if it does not go in time; idempotent. False if it had to be killed."""
    if proc is None or proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return False


def _end_leftover_guests(runtime: Path) -> list[str]:
    """Guests the demo's daemon started but could not stop (it was killed): each session's
    record names its QEMU's pid; only a QEMU of that session is ended."""
    ended = []
    for record in runtime.glob("sessions/*/guest.json"):
        try:
            info = json.loads(record.read_text())
            pid, name = int(info["pid"]), str(info["name"])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if f"process=xsession-{name}".encode() in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
                ended.append(name)
            except ProcessLookupError:
                pass
    return ended


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xsession-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cmdline", default=BOOT_CMDLINE, help=f"boot options (default: {BOOT_CMDLINE!r})")
    p.add_argument("--medium", type=Path, help="use this medium instead of building the demo one")
    p.add_argument("--hold", action="store_true", help="keep the sessions running until Ctrl-C")
    p.add_argument("--desktops", action="store_true",
                   help="the real flavours (Xfce, LXQt as a live ISO, a server) instead of the small demo guests")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    args = p.parse_args(argv)
    if args.desktops and args.cmdline == BOOT_CMDLINE:
        args.cmdline = DESKTOPS_CMDLINE

    try:
        if args.medium:
            medium = args.medium.resolve()
        elif args.desktops:
            print("the real flavours and their medium (built once per machine; the first time takes a while)",
                  flush=True)
            medium = ensure_desktop_medium(report=lambda line: print(line, flush=True)).resolve()
        else:
            medium = ensure_demo_medium().resolve()
    except (subprocess.CalledProcessError, XSessionError) as e:
        print(f"xsession-demo: {e}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="xsd-"))  # short: unix socket paths
    runtime = work / "run"
    bus: subprocess.Popen[bytes] | None = None
    daemon: subprocess.Popen[bytes] | None = None
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # closed in finally
    status = 1
    try:
        # the bus: its own log; the address it prints is all a client needs
        with open(work / "dbus-daemon.log", "wb") as bus_log:
            bus = subprocess.Popen(["dbus-daemon", f"--config-file={system_like_config(work)}", "--nofork",
                                    "--print-address"], stdout=subprocess.PIPE, stderr=bus_log)
        assert bus.stdout is not None
        address = bus.stdout.readline().decode().strip()
        if not address:
            raise RuntimeError("dbus-daemon did not start; see " + str(work / "dbus-daemon.log"))
        print(f"private system bus: {address}")

        notify.bind(str(work / "notify.sock"))
        env = {k: v for k, v in os.environ.items() if k not in ("XENUBUNTU_OPTIONS", "XENUBUNTU_MEDIUM")}
        env.update(DBUS_SYSTEM_BUS_ADDRESS=address, NOTIFY_SOCKET=str(work / "notify.sock"))
        argv_d = [sys.executable, "-m", "xsession.daemon", "--medium", str(medium), "--runtime-dir", str(runtime),
                  "--cmdline", args.cmdline, "--stop-guests-on-exit"]
        print("$ xsessiond " + " ".join(argv_d[3:]) + f"    (log: {work / 'xsessiond.log'})")
        t0 = time.monotonic()
        with open(work / "xsessiond.log", "wb") as log:
            daemon = subprocess.Popen(argv_d, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                      start_new_session=True)  # Ctrl-C is ours to hand on
        ready = _wait_ready(notify, daemon, 60.0)
        print(f"xsessiond ready after {time.monotonic() - t0:.2f} s: {ready}\n", flush=True)

        print("$ xsessionctl watch --until-settled", flush=True)
        watch = subprocess.run(_ctl(address, "watch", "--until-settled", "--timeout", str(args.timeout)))
        print("\n$ xsessionctl list", flush=True)
        subprocess.run(_ctl(address, "list"))
        listed = subprocess.run(_ctl(address, "--json", "list"), capture_output=True, text=True)
        sessions = json.loads(listed.stdout or "[]")
        print("\nconsoles:")
        for s in sessions:
            vnc = s.get("Console", {}).get("vnc", "-")
            print(f"  {s['Name']:<8} {s['State']:<8} {vnc}")
        status = 0 if watch.returncode == 0 and sessions and all(s["State"] == "running" for s in sessions) else 1
        if args.hold:
            print(f"\nsessions keep running; try: .venv/bin/xsessionctl --address '{address}' list\n"
                  "Ctrl-C stops everything", flush=True)
            while daemon.poll() is None:
                time.sleep(1)
    except KeyboardInterrupt:
        print("\ninterrupted")
    except (RuntimeError, OSError) as e:
        print(f"xsession-demo: {e}", file=sys.stderr)
    finally:
        # Ctrl-C again while cleaning up must not leave guests behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if not _end(daemon):  # --stop-guests-on-exit: it stops its guests before it exits
            left = _end_leftover_guests(runtime)
            if left:
                print(f"xsessiond did not end in time; ended its guests {', '.join(left)}", file=sys.stderr)
        _end(bus)
        notify.close()
        shutil.rmtree(work, ignore_errors=True)
        if daemon is not None:
            print("xsessiond, its guests and the bus are stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
