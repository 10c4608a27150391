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
import fcntl
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

from .mastering.master import load_spec, master_medium
from .manifest import MANIFEST_RELPATH
from .privatebus import system_like_config

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "demo"
CACHE = REPO / ".cache"
BOOT_CMDLINE = "xenubuntu.flavour=kubuntu xenubuntu.restore=lazy"


def ensure_demo_medium(cache: Path = CACHE, report=print) -> Path:
    """The demo medium's root, built (once) from Debian's packages and demo/flavours.yaml.

    Several processes may ask at once (parallel test runs): a lock file makes one
    of them build while the others wait.
    """
    guests = cache / "guests"
    medium = cache / "medium"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "medium.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        subprocess.run([str(DEMO / "build-guests.sh"), str(guests)], check=True)
        manifest = medium / MANIFEST_RELPATH
        inputs = [DEMO / "flavours.yaml", guests / "vmlinuz", *guests.glob("initrd-*.cpio")]
        if not manifest.exists() or any(p.stat().st_mtime > manifest.stat().st_mtime for p in inputs):
            report("mastering the demo medium (each flavour boots once and is saved) ...")
            master_medium(load_spec(DEMO / "flavours.yaml"), guests, medium, report=lambda l: report("  " + l))
    return medium


REAL_FLAVOURS = ("xubuntu", "lubuntu", "server")


def ensure_real_flavour(name: str, report=None) -> Path:
    """The folder of a real flavour built from Debian's packages (``demo/build-flavour.sh``).

    Builds it when the machine-wide cache has no valid build of the current
    recipe; the cache serialises concurrent builders. ``report`` gets the
    build's progress lines (default: they go to stderr).

    :raises subprocess.CalledProcessError: the build failed.
    """
    if name not in REAL_FLAVOURS:
        raise ValueError(f"no real flavour {name!r}; there are {', '.join(REAL_FLAVOURS)}")
    cmd = [str(DEMO / "build-flavour.sh"), name]
    if report is None:
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        return Path(done.stdout.strip().splitlines()[-1])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None and proc.stdout is not None
    for line in proc.stderr:
        report(line.rstrip("\n"))
    out = proc.stdout.read()
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, out)
    return Path(out.strip().splitlines()[-1])


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


def _end(proc: subprocess.Popen | None, timeout: float = 60.0) -> None:
    """SIGTERM, then SIGKILL if it does not go in time; idempotent."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xsession-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cmdline", default=BOOT_CMDLINE, help=f"boot options (default: {BOOT_CMDLINE!r})")
    p.add_argument("--medium", type=Path, help="use this medium instead of building the demo one")
    p.add_argument("--hold", action="store_true", help="keep the sessions running until Ctrl-C")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    args = p.parse_args(argv)

    try:
        medium = (args.medium or ensure_demo_medium()).resolve()
    except subprocess.CalledProcessError as e:
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
        _end(daemon)  # --stop-guests-on-exit: it stops its guests before it exits
        _end(bus)
        notify.close()
        shutil.rmtree(work, ignore_errors=True)
        if daemon is not None:
            print("xsessiond, its guests and the bus are stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
