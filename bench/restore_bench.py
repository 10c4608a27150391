"""Restore speed on QEMU, all in one run so ratios are fair on a noisy machine.

For a 256 MiB and a 1 GiB flavour (the demo's kubuntu guest, mastered at both
sizes), REPS times each, interleaved:

* cold boot to ready (the backend's cold boot: QEMU start to the ready line);
* raw QEMU restore: the same command line with ``-incoming "exec:zstd -dc FILE"``,
  QMP ``query-status`` until loaded, ``cont``: to running, and to the first
  answer on the serial console;
* the manager's restore (``QemuBackend.restore``: checks, overlay, verified feed)
  to running, and to the first answer.

Prints a Markdown table; ``--record`` appends it to bench/RESULTS.md.

    .venv/bin/python bench/restore_bench.py [--reps 5] [--record]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.benchlib import cold_boot, publish  # noqa: E402
from tests.guestlib import ask  # noqa: E402
from xsession.demomedia import CACHE, DEMO  # noqa: E402
from xsession.hypervisor.qemu import QemuBackend, QemuGuest, qemu_argv  # noqa: E402
from xsession.manifest import MANIFEST_RELPATH, load_manifest  # noqa: E402
from xsession.mastering.master import FlavourSpec, MediumSpec, load_spec, master_medium  # noqa: E402

SIZES = {"m256": 256, "m1024": 1024}


def bench_medium() -> Path:
    guests = CACHE / "bench-guests"
    subprocess.run([str(DEMO / "build-guests.sh"), str(guests)] + [f"{n}:kubuntu {m} MiB:desktop"
                                                                   for n, m in SIZES.items()], check=True)
    out = CACHE / "bench-medium"
    if not (out / MANIFEST_RELPATH).exists():
        demo = load_spec(DEMO / "flavours.yaml")
        spec = MediumSpec(default="m256", kernel=demo.kernel, cmdline=demo.cmdline, disk_mib=demo.disk_mib,
                          flavours=tuple(FlavourSpec(name=n, title=f"kubuntu {m} MiB", priority=i + 1,
                                                     memory_mib=m, initrd=f"initrd-{n}.cpio")
                                         for i, (n, m) in enumerate(SIZES.items())))
        master_medium(spec, guests, out, jobs=1, report=lambda line: print("  " + line))
    return out


def raw_restore(flavour, manifest, rundir: Path) -> tuple[float, float]:
    """QEMU alone: exec:zstd -dc as the incoming stream; (to running, to first answer)."""
    rundir.mkdir(parents=True, exist_ok=True)
    backend = QemuBackend()
    overlay, backing = backend._prepare(flavour, manifest, rundir)
    path = manifest.resolve(flavour.statefile.path)
    t0 = time.monotonic()
    argv = qemu_argv(flavour.name, flavour.machine, manifest, flavour, rundir, overlay,
                     incoming=f"exec:zstd -dcq {path}", disk_backing=backing)
    with open(rundir / "qemu.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    guest = QemuGuest(flavour.name, rundir, proc, proc.pid)
    try:
        guest.connect(30)
        while guest.status() not in ("paused", "postmigrate"):
            time.sleep(0.005)
        guest.resume()
        t_run = time.monotonic() - t0
        ask(guest.console["serial"], "PING bench")
        return t_run, time.monotonic() - t0
    finally:
        guest.stop()


def manager_restore(flavour, manifest, rundir: Path) -> tuple[float, float]:
    t0 = time.monotonic()
    guest = QemuBackend().restore(flavour, manifest, rundir, lambda d, t: None)
    try:
        t_run = time.monotonic() - t0
        ask(guest.console["serial"], "PING bench")
        return t_run, time.monotonic() - t0
    finally:
        guest.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args()
    manifest = load_manifest(bench_medium() / MANIFEST_RELPATH)
    work = Path(tempfile.mkdtemp(prefix="xsb-"))
    results: dict[str, dict[str, list[float]]] = {n: {} for n in SIZES}
    try:
        for rep in range(args.reps):
            for name in SIZES:
                f = manifest.flavour(name)
                r = results[name]
                rd = work / f"{name}-{rep}"
                r.setdefault("cold", []).append(cold_boot(f, manifest, rd / "cold"))
                raw_run, raw_answer = raw_restore(f, manifest, rd / "raw")
                man_run, man_answer = manager_restore(f, manifest, rd / "man")
                r.setdefault("raw", []).append(raw_run)
                r.setdefault("raw_answer", []).append(raw_answer)
                r.setdefault("manager", []).append(man_run)
                r.setdefault("manager_answer", []).append(man_answer)
                print(f"rep {rep + 1} {name}: cold {r['cold'][-1]:.2f}s raw {raw_run:.3f}s "
                      f"manager {man_run:.3f}s (answer {raw_answer:.3f}s / {man_answer:.3f}s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    lines = [
        f"Machine: {platform.machine()}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} "
        f"CPUs, QEMU TCG, Debian {Path('/etc/debian_version').read_text().strip()}; "
        f"{args.reps} repetitions interleaved, medians; statefiles zstd.",
        f"Command: `.venv/bin/python bench/restore_bench.py --reps {args.reps}`",
        "",
        "| guest | cold boot to ready | raw QEMU restore to running | manager restore to running "
        "| raw to first answer | manager to first answer | restore/cold boot | manager/raw (running) "
        "| manager/raw (answer) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in med.items():
        lines.append(
            f"| {SIZES[name]} MiB | {m['cold']:.2f} s | {m['raw']:.3f} s | {m['manager']:.3f} s "
            f"| {m['raw_answer']:.3f} s | {m['manager_answer']:.3f} s | 1/{m['cold'] / m['manager']:.0f} "
            f"| {m['manager'] / m['raw']:.2f}x | {m['manager_answer'] / m['raw_answer']:.2f}x |")
    publish("QEMU restore", lines, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
