"""The install's cost: time and throughput onto a disk image, and the time from a
guest's request to the pending job on the bus.

    .venv/bin/python bench/install_bench.py [--reps 3] [--requests 10] [--record]

Install: each flavour (a demo flavour, the server, the Xfce desktop) is installed
``--reps`` times onto a loop device over a sparse file (as big as the flavour
needs plus 256 MiB); the table gives the median total time, the bytes the install
wrote (the root's files or file system image plus the kernel and initramfs), the
throughput over the whole install and over the copy of the root alone, and the
median time of the steps that are not the copy (partitioning, file systems,
GRUB for BIOS and EFI).

Request: xsessiond on a private bus with the demo medium, Kubuntu restored, and
the chooser (``xsession-gui``) on an Xvfb screen; the benchmark writes ``install``
on the guest's serial console, the guest writes its request on its channel, and
the times are taken when the job's ``InterfacesAdded`` arrives at a client on the
bus and when the chooser says its confirmation dialog is on the screen (its
``install dialog shown`` line, written when the window is mapped). Each job is
then cancelled over the bus, and the next request waits until the guest has shown
the cancel. Median and worst of ``--requests``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gi.repository import Gio, GLib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import machine, record  # noqa: E402
from xsession.demomedia import ensure_demo_medium, ensure_real_flavour  # noqa: E402
from xsession.install import installer  # noqa: E402
from xsession.privatebus import system_like_config  # noqa: E402

BUS = "org.xenubuntu.Sessions1"
MANAGER = "/org/xenubuntu/Sessions1"
MiB = 2**20


def demo_source(medium: Path) -> installer.Source:
    root = medium / "xenubuntu"
    return installer.Source("kubuntu", "Kubuntu", root / "pool" / "vmlinuz",
                            root / "flavours" / "kubuntu" / "initrd.cpio", 256)


def real_source(name: str) -> installer.Source:
    build = ensure_real_flavour(name)
    meta = json.loads((build / "flavour.json").read_text())
    image = build / meta["disk"]
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)], check=True,
                                     capture_output=True, text=True).stdout)
    return installer.Source(name, meta["title"], build / meta["kernel"], build / meta["initrd"], meta["memory_mib"],
                            cmdline=meta["cmdline"], root_image=image, root_image_size=int(info["virtual-size"]))


def install_once(source: installer.Source, work: Path) -> tuple[float, float, int]:
    """(total seconds, seconds copying the root, bytes written)."""
    image = work / "disk.img"
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(installer.needed_bytes(source.size()) + 256 * MiB)
    dev = subprocess.run(["losetup", "--find", "--show", "--partscan", str(image)], check=True,
                         capture_output=True, text=True).stdout.strip()
    marks: list[tuple[str, float]] = []
    try:
        t0 = time.monotonic()
        installer.run(source, dev, installer.new_identity(source.flavour), lambda d, t: None, threading.Event(),
                      step_hook=lambda step: marks.append((step.name, time.monotonic())))
        total = time.monotonic() - t0
    finally:
        subprocess.run(["losetup", "--detach", dev], capture_output=True)
        image.unlink(missing_ok=True)
    ends = [t for _, t in marks[1:]] + [t0 + total]
    copy = sum(end - start for (name, start), end in zip(marks, ends, strict=True) if name.startswith("copy"))
    return total, copy, source.size()


def bench_installs(reps: int) -> str:
    work = Path(tempfile.mkdtemp(prefix="xsib-"))
    rows = ["| flavour | bytes (raw root image or files, kernel, initramfs) | install (median) | throughput, whole install | throughput, root copy "
            "| everything else (partition, mkfs, GRUB BIOS+EFI) |", "|---|---|---|---|---|---|"]
    try:
        sources = [("kubuntu (demo: kernel + initramfs)", demo_source(ensure_demo_medium(report=lambda line: None))),
                   ("server (disk image)", real_source("server")), ("xubuntu, Xfce (disk image)",
                                                                     real_source("xubuntu"))]
        for label, source in sources:
            runs = [install_once(source, work) for _ in range(reps)]
            total = statistics.median(r[0] for r in runs)
            copy = statistics.median(r[1] for r in runs)
            size = runs[0][2]
            rows.append(f"| {label} | {size / MiB:.0f} MiB | {total:.1f} s | {size / MiB / total:.0f} MiB/s | "
                        f"{size / MiB / copy:.0f} MiB/s | {total - copy:.1f} s |")
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return "\n".join(rows)


def start_chooser(address: str, work: Path, shown: list[float]) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Xvfb and the chooser on it; ``shown`` gets the time of each "install dialog shown" line."""
    read, write = os.pipe()
    screen = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                              pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as r:
        display = ":" + r.readline().strip()
    gui = subprocess.Popen([str(Path(sys.executable).parent / "xsession-gui"), "--address", address,
                            "--no-auto-show"], env=dict(os.environ, DISPLAY=display),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def follow() -> None:
        assert gui.stderr is not None
        with open(work / "xsession-gui.log", "ab") as log:
            for line in gui.stderr:
                if b"install dialog shown" in line:
                    shown.append(time.monotonic())
                log.write(line)

    threading.Thread(target=follow, daemon=True).start()
    return screen, gui


def bench_requests(count: int) -> str:
    work = Path(tempfile.mkdtemp(prefix="xsrb-"))
    medium = work / "medium"
    shutil.copytree(ensure_demo_medium(report=lambda line: None), medium, copy_function=os.link)
    bus = subprocess.Popen(["dbus-daemon", f"--config-file={system_like_config(work)}", "--nofork",
                            "--print-address"], stdout=subprocess.PIPE)
    assert bus.stdout is not None
    address = bus.stdout.readline().decode().strip()
    notify_path = work / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address, NOTIFY_SOCKET=str(notify_path))
    daemon = subprocess.Popen([sys.executable, "-m", "xsession.daemon", "--medium", str(medium), "--runtime-dir",
                               str(work / "run"), "--cmdline", "xenubuntu.restore=off", "--stop-guests-on-exit",
                               "--no-udev"], stdout=subprocess.DEVNULL, stderr=open(work / "xsessiond.log", "ab"),
                              env=env)
    screen = gui = None
    shown: list[float] = []
    try:
        screen, gui = start_chooser(address, work, shown)
        notify.settimeout(60)
        while b"READY=1" not in notify.recv(4096):
            pass
        con = Gio.DBusConnection.new_for_address_sync(
            address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
            None, None)
        added: list[tuple[str, float]] = []
        cond = threading.Condition()

        def on_added(_c, _s, _p, _i, _n, params):  # type: ignore[no-untyped-def]
            path, ifaces = params.unpack()
            if "org.xenubuntu.Sessions1.Job" in ifaces:
                with cond:
                    added.append((path, time.monotonic()))
                    cond.notify_all()

        con.signal_subscribe(BUS, "org.freedesktop.DBus.ObjectManager", "InterfacesAdded", MANAGER, None,
                             Gio.DBusSignalFlags.NONE, on_added)
        context = GLib.MainContext.default()
        con.call_sync(BUS, MANAGER, "org.xenubuntu.Sessions1.Manager", "Activate",
                      GLib.Variant("(sa{sv})", ("kubuntu", {})), None, 0, 60_000, None)
        session = f"{MANAGER}/session/kubuntu"
        deadline = time.monotonic() + 120
        while con.call_sync(BUS, session, "org.freedesktop.DBus.Properties", "Get",
                            GLib.Variant("(ss)", ("org.xenubuntu.Sessions1.Session", "State")), None, 0, 10_000,
                            None).unpack()[0] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        serial = work / "run" / "sessions" / "kubuntu" / "serial.sock"
        log = serial.parent / "console.log"
        samples, dialog = [], []
        for i in range(count):
            seen, seen_shown = len(added), len(shown)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(serial))
                t0 = time.monotonic()
                s.sendall(b"install\n")
            deadline = time.monotonic() + 30
            while len(added) == seen:
                context.iteration(False)
                assert time.monotonic() < deadline, "no job appeared"
                time.sleep(0.001)
            path, t1 = added[-1]
            samples.append(t1 - t0)
            while len(shown) == seen_shown:
                assert time.monotonic() < deadline, "the chooser showed no dialog"
                time.sleep(0.001)
            dialog.append(shown[-1] - t0)
            con.call_sync(BUS, path, "org.xenubuntu.Sessions1.Job", "Cancel", None, None, 0, 30_000, None)
            cancelled = i + 1
            deadline = time.monotonic() + 30
            while log.read_bytes().count(b"INSTALL cancelled") < cancelled:
                assert time.monotonic() < deadline, "the guest did not show the cancel"
                time.sleep(0.02)
        lines = [f"| `install` on the guest's console to the job's InterfacesAdded on the bus | {count} | "
                 f"{statistics.median(samples) * 1000:.0f} ms | {max(samples) * 1000:.0f} ms |",
                 f"| `install` on the guest's console to the chooser's confirmation dialog on the screen | "
                 f"{count} | {statistics.median(dialog) * 1000:.0f} ms | {max(dialog) * 1000:.0f} ms |"]
        print("\n".join(lines), flush=True)
        return "| what | requests | median | worst |\n|---|---|---|---|\n" + "\n".join(lines)
    finally:
        for proc in (gui, screen):
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        bus.terminate()
        bus.wait(10)
        notify.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="installs per flavour")
    p.add_argument("--requests", type=int, default=10, help="install requests from the guest")
    p.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    args = p.parse_args()
    head = machine()
    print(head, flush=True)
    installs = bench_installs(args.reps)
    requests = bench_requests(args.requests)
    if args.record:
        cmd = f"`.venv/bin/python bench/install_bench.py --reps {args.reps} --requests {args.requests} --record`"
        record("Install onto a disk image", f"{head}. Command: {cmd}. The disk: a loop device over a sparse "
                                             f"file on this machine's disk.\n\n{installs}\n\n{requests}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
