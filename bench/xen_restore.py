#!/usr/bin/python3
"""Xen restore speed: raw ``xl restore`` against the backend's restore, and restore
against a cold boot, on the same image in the same run.

Run on the host: ``.venv/bin/python bench/xen_restore.py [--rounds N] [--write]``.
It boots the Xen test host (tests/xen/run_scenario.py) with this file as the
scenario; in dom0 the file masters one PV flavour (96 MiB), then alternates:

- ``xl restore`` of the uncompressed image from dom0's tmpfs until xl returns
  (the domain runs), then ``xl destroy``;
- :meth:`XenBackend.restore` of the compressed image (sha256 + zstd feed,
  ``xl restore -p``, checks, unpause) until it returns a running guest;
- :meth:`XenBackend.cold_boot` (``xl create``) until the guest's ready line.

``--write`` puts the figures in bench/RESULTS.md under the "Xen" heading
(that section only).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

IN_DOM0 = Path("/proc/xen/capabilities").exists() and Path("/payload/xsession").is_dir()


def dom0_main() -> int:
    """The measurement, in dom0."""
    from xsession.hypervisor import xl
    from xsession.hypervisor.xen import XenBackend
    from xsession.mastering.xen import XenFlavourSpec, master_medium

    rounds = int(Path("/payload/bench-rounds").read_text()) if Path("/payload/bench-rounds").exists() else 3
    guest = Path("/payload/guest")
    work = Path("/tmp/bench")
    backend = XenBackend(console_log_dir=Path("/var/log/xen/console"))
    spec = XenFlavourSpec(name="alpha", title="Alpha", priority=1, kernel=guest / "vmlinuz",
                          initrd=guest / "guest.cpio.gz", cmdline="console=hvc0 loglevel=4 xsession.ready=XS-READY",
                          ready_line="XS-READY", machine_type="pv", memory_mib=96, settle_s=2.0)
    manifest = master_medium(backend, [spec], work / "medium" / "xenubuntu", work / "mastering")
    flavour = manifest.flavour("alpha")
    assert flavour.statefile is not None
    image = manifest.resolve(flavour.statefile.path)
    raw = work / "alpha.xl"
    subprocess.run(["zstd", "-dqf", str(image), "-o", str(raw)], check=True)
    config = work / "alpha.cfg"
    from xsession.hypervisor.xen import xl_settings
    xl.write_config(config, xl_settings(flavour, manifest))
    figures: dict[str, list[float]] = {"xl_restore_raw_s": [], "backend_restore_s": [], "cold_boot_ready_s": []}
    for _ in range(rounds):
        t0 = time.monotonic()
        xl.restore(raw, config, paused=False)
        figures["xl_restore_raw_s"].append(time.monotonic() - t0)
        xl.destroy("alpha")
        t0 = time.monotonic()
        g = backend.restore(flavour, manifest, work / "run", lambda d, t: None)
        figures["backend_restore_s"].append(time.monotonic() - t0)
        g.stop()
        t0 = time.monotonic()
        g = backend.cold_boot(flavour, manifest, work / "run")
        figures["cold_boot_ready_s"].append(time.monotonic() - t0)
        g.stop()
    info = xl.info()
    print("@@RESULT " + json.dumps({
        "name": "bench", "ok": True, "rounds": rounds, **{k: [round(v, 2) for v in vs] for k, vs in figures.items()},
        "image_size": flavour.statefile.size, "raw_size": flavour.statefile.raw_size,
        "xen_version": info.xen_version, "dom0_kernel": info.fields.get("release", ""),
    }), flush=True)
    return 0


def _section(r: dict, wall: float, rounds: int) -> str:
    def cell(key: str) -> str:
        vs = r[key]
        return f"{statistics.median(vs):.2f} s (min {min(vs):.2f}, max {max(vs):.2f})"

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return f"""## Xen

Machine: {cpu or platform.processor()}, {len(__import__('os').sched_getaffinity(0))} cores, Linux {platform.release()};
{qemu}, TCG (`-cpu max,-smap`, 2048 MiB); Xen {r['xen_version']} with a Debian dom0
(kernel {r['dom0_kernel']}, 640 MiB, 1 vCPU). Guest: PV, 96 MiB, 1 vCPU (Debian kernel +
busybox initramfs). Image: {r['raw_size']:,} bytes raw, {r['image_size']:,} bytes with zstd -1.
{rounds} rounds, alternating; median (min, max). Whole run {wall:.0f} s.

Command: `.venv/bin/python bench/xen_restore.py --rounds {rounds} --write`

| what | time |
|---|---|
| `xl restore` of the raw image (dom0 tmpfs) until xl returns, domain running | {cell('xl_restore_raw_s')} |
| backend restore to running: sha256 + `zstd -dc` feed into `xl restore -p`, checks, unpause | {cell('backend_restore_s')} |
| cold boot: `xl create` until the guest's ready line | {cell('cold_boot_ready_s')} |

The backend's restore costs the decompression and the hashing on top of xl's own
work (under TCG both compete for dom0's single vCPU); it is still well ahead of a
cold boot, whose time here is mostly the emulated kernel's boot. On the DVD the
compressed image also reads {r['raw_size'] / r['image_size']:.1f}x fewer bytes from the medium.
"""


def write_results(section: str, path: Path) -> None:
    """Replace (or append) the "## Xen" section of RESULTS.md, leaving the others alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Xen"), None)
    if start is None:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    path.write_text("".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else ""))


def host_main() -> int:
    ap = argparse.ArgumentParser(description="Xen restore benchmark (boots Xen in QEMU)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md's Xen section")
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "tests" / "xen"))
    from run_scenario import run_scenario

    rounds_file = root / "build" / "bench-rounds"
    rounds_file.parent.mkdir(parents=True, exist_ok=True)
    rounds_file.write_text(str(args.rounds))
    run = run_scenario(Path(__file__).resolve(), {"bench-rounds": rounds_file}, timeout=1200,
                       log=root / "tests" / "artifacts" / "xen-bench.log")
    r = run.result("bench")
    print(json.dumps(r, indent=1))
    section = _section(r, run.wall_s, args.rounds)
    print(section)
    if args.write:
        write_results(section, root / "bench" / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(dom0_main() if IN_DOM0 else host_main())
