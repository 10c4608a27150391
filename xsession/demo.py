"""``xsession-demo``: the product's main job on the built-in demo medium.

Builds the demo flavours and masters the demo medium when needed (cached in
``.cache/``), then runs the session manager on it as the boot would (default
``kubuntu``, policy ``lazy``), printing every state change and restore's progress,
and ends with every session running and its console address printed. The guests
are stopped at the end (or on Ctrl-C) unless ``--hold`` keeps them until Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .bootopts import parse_cmdline
from .engine import Engine, SessionView, State
from .errors import XSessionError
from .hypervisor.qemu import QemuBackend
from .manifest import MANIFEST_RELPATH, load_manifest
from .mastering.master import load_spec, master_medium

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "demo"
CACHE = REPO / ".cache"
BOOT_CMDLINE = "xenubuntu.flavour=kubuntu xenubuntu.restore=lazy"


def ensure_demo_medium(cache: Path = CACHE, report=print) -> Path:
    """The demo medium's root, built (once) from Debian's packages and demo/flavours.yaml."""
    guests = cache / "guests"
    medium = cache / "medium"
    subprocess.run([str(DEMO / "build-guests.sh"), str(guests)], check=True)
    manifest = medium / MANIFEST_RELPATH
    inputs = [DEMO / "flavours.yaml", guests / "vmlinuz", *guests.glob("initrd-*.cpio")]
    if not manifest.exists() or any(p.stat().st_mtime > manifest.stat().st_mtime for p in inputs):
        report("mastering the demo medium (each flavour boots once and is saved) ...")
        master_medium(load_spec(DEMO / "flavours.yaml"), guests, medium, report=lambda l: report("  " + l))
    return medium


class _Printer:
    """Prints state changes and one progress line per restore."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.lock = threading.Lock()
        self.shown: dict[str, int] = {}  # last quarter printed per session

    def __call__(self, event: str, view: SessionView | None) -> None:
        if view is None:
            return
        with self.lock:
            stamp = f"[{time.monotonic() - self.t0:6.2f}s]"
            if event == "state-changed":
                self.shown.pop(view.name, None)
                reason = f"  ({view.reason})" if view.reason else ""
                print(f"{stamp} {view.name:<8} {view.state.value:<9}{reason}", flush=True)
            elif event == "progress":
                quarter = int(view.progress * 4)
                if self.shown.get(view.name) == quarter:
                    return
                self.shown[view.name] = quarter
                bar = "#" * int(view.progress * 20)
                print(f"{stamp} {view.name:<8} restoring [{bar:<20}] {view.progress * 100:5.1f}% "
                      f"{view.bytes_done / 1e6:.1f}/{view.bytes_total / 1e6:.1f} MB", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xsession-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cmdline", default=BOOT_CMDLINE, help=f"boot options (default: {BOOT_CMDLINE!r})")
    p.add_argument("--medium", type=Path, help="use this medium instead of building the demo one")
    p.add_argument("--hold", action="store_true", help="keep the sessions running until Ctrl-C")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        medium = args.medium or ensure_demo_medium()
        manifest = load_manifest(medium / MANIFEST_RELPATH)
    except (XSessionError, subprocess.CalledProcessError) as e:
        print(f"xsession-demo: {e}", file=sys.stderr)
        return 1
    options = parse_cmdline(args.cmdline)
    runtime = Path(tempfile.mkdtemp(prefix="xsd-"))  # short: unix socket paths
    engine = Engine(manifest, QemuBackend(), runtime, options)
    for w in engine.warnings:
        print(f"warning: {w}")
    print(f"medium {medium}: {', '.join(manifest.names)}; default {engine.default}, "
          f"policy {options.restore.value}", flush=True)
    t0 = time.monotonic()
    engine.subscribe(_Printer(t0))
    status = 0
    try:
        engine.start()
        deadline = time.monotonic() + args.timeout
        while True:
            engine.wait_idle(max(0.1, deadline - time.monotonic()))
            views = engine.sessions()
            settled = all(v.state in (State.RUNNING, State.PAUSED, State.FAILED, State.STOPPED) for v in views)
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        print(f"\nall sessions settled after {time.monotonic() - t0:.2f} s:")
        print(f"{'session':<9} {'state':<9} {'how':<12} console")
        for v in engine.sessions():
            print(f"{v.name:<9} {v.state.value:<9} {v.origin:<12} {v.console.get('vnc', '-')}"
                  f"  serial {v.console.get('serial', '-')}")
            if v.state is not State.RUNNING:
                status = 1
                print(f"          reason: {v.reason}")
        if args.hold:
            print("\nsessions keep running; Ctrl-C stops them")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("\ninterrupted")
    finally:
        engine.shutdown(stop_guests=True)
        import shutil
        shutil.rmtree(runtime, ignore_errors=True)
        print("all sessions stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
