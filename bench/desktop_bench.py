"""Real flavours on QEMU: cold boot, raw restore and the manager's restore, in one run.

For the Xfce desktop (xubuntu, 1 GiB) and the server, REPS times each, interleaved:

* cold boot to ready: the backend's cold boot, QEMU start to the guest agent's
  ``xenubuntu1 ready`` on the guest channel (the desktop session runs);
* raw QEMU restore: the same command line with ``-incoming "exec:zstd -dc FILE"``,
  QMP until loaded, ``cont``: to running, and to the first heartbeat on the channel;
* the manager's restore (``QemuBackend.restore``: checks, overlay, verified feed,
  then the clock set and the network renewed through the guest agent): to
  running, and to the first heartbeat.

Also the statefiles' raw and compressed sizes. Prints a Markdown table;
``--record`` appends it to bench/RESULTS.md.

    .venv/bin/python bench/desktop_bench.py [--reps 3] [--record]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.benchlib import cold_boot, machine, publish  # noqa: E402
from xsession.demomedia import ensure_desktop_medium  # noqa: E402
from xsession.guestchannel import ChannelReader  # noqa: E402
from xsession.hypervisor.qemu import QemuBackend, QemuGuest, qemu_argv  # noqa: E402
from xsession.manifest import MANIFEST_RELPATH, load_manifest  # noqa: E402

FLAVOURS = ("xubuntu", "server")
HEARTBEAT_TIMEOUT_S = 120.0


def _heartbeat(guest: QemuGuest, t0: float) -> float:
    assert guest.channel is not None
    if guest.channel.wait_heartbeat(0, HEARTBEAT_TIMEOUT_S, guest.is_alive) is None:
        raise RuntimeError(f"{guest.name}: no heartbeat within {HEARTBEAT_TIMEOUT_S:.0f} s")
    return time.monotonic() - t0


def raw_restore(flavour, manifest, rundir: Path) -> tuple[float, float]:
    """QEMU alone: exec:zstd -dc as the incoming stream; (to running, to first heartbeat)."""
    rundir.mkdir(parents=True, exist_ok=True)
    backend = QemuBackend()
    overlay, backing = backend._prepare(flavour, manifest, rundir) if flavour.disk else (None, None)
    path = manifest.resolve(flavour.statefile.path)
    t0 = time.monotonic()
    argv = qemu_argv(flavour.name, flavour.machine, manifest, flavour, rundir, overlay,
                     incoming=f"exec:zstd -dcq {path}", disk_backing=backing)
    with open(rundir / "qemu.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    guest = QemuGuest(flavour.name, rundir, proc, proc.pid)
    guest.channel = ChannelReader(flavour.name, rundir / "guest.sock", flavour.name)
    try:
        guest.connect(30)
        while guest.status() not in ("paused", "postmigrate"):
            time.sleep(0.005)
        guest.resume()
        t_run = time.monotonic() - t0
        return t_run, _heartbeat(guest, t0)
    finally:
        guest.stop()
        guest.channel.close()


def manager_restore(flavour, manifest, rundir: Path) -> tuple[float, float]:
    t0 = time.monotonic()
    guest = QemuBackend().restore(flavour, manifest, rundir, lambda d, t: None)
    try:
        t_run = time.monotonic() - t0
        return t_run, _heartbeat(guest, t0)
    finally:
        guest.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args()
    medium = ensure_desktop_medium()
    manifest = load_manifest(medium / MANIFEST_RELPATH)
    work = Path(tempfile.mkdtemp(prefix="xsd-"))
    results: dict[str, dict[str, list[float]]] = {n: {} for n in FLAVOURS}
    try:
        for rep in range(args.reps):
            for name in FLAVOURS:
                f = manifest.flavour(name)
                r = results[name]
                rd = work / f"{name}-{rep}"
                r.setdefault("cold", []).append(cold_boot(f, manifest, rd / "cold"))
                raw_run, raw_hb = raw_restore(f, manifest, rd / "raw")
                man_run, man_hb = manager_restore(f, manifest, rd / "man")
                for k, v in (("raw", raw_run), ("raw_hb", raw_hb), ("manager", man_run), ("manager_hb", man_hb)):
                    r.setdefault(k, []).append(v)
                print(f"rep {rep + 1} {name}: cold {r['cold'][-1]:.1f}s raw {raw_run:.2f}s/{raw_hb:.2f}s "
                      f"manager {man_run:.2f}s/{man_hb:.2f}s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    lines = [
        f"{machine()}; {args.reps} repetitions interleaved, medians.",
        f"Command: `.venv/bin/python bench/desktop_bench.py --reps {args.reps}`",
        "",
        "| flavour | memory | statefile raw / zstd | cold boot to ready | raw restore: running / heartbeat "
        "| manager restore: running / heartbeat | restore/cold boot | manager/raw (running) "
        "| manager/raw (heartbeat) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in med.items():
        f = manifest.flavour(name)
        sf = f.statefile
        lines.append(
            f"| {name} | {f.memory_mib} MiB | {sf.raw_size / 1e6:.0f} / {sf.size / 1e6:.0f} MB | {m['cold']:.1f} s "
            f"| {m['raw']:.2f} / {m['raw_hb']:.2f} s | {m['manager']:.2f} / {m['manager_hb']:.2f} s "
            f"| 1/{m['cold'] / m['manager_hb']:.0f} | {m['manager'] / m['raw']:.2f}x "
            f"| {m['manager_hb'] / m['raw_hb']:.2f}x |")
    publish("Real flavours: cold boot and restore", lines, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
