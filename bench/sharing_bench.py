"""Host memory with every real flavour running at once, without and with same-page merging.

Restores each flavour of the desktop medium (``QemuBackend.restore``, as the
manager does) and waits for its heartbeat, so every desktop runs. Then, in one
run:

* without merging: the QEMU processes' proportional set size (PSS, from
  ``/proc/PID/smaps_rollup``) and RSS, summed: what the flavours take today
  (taken twice, a minute apart, to show memory does not move by itself);
* with merging (:class:`xsession.sharing.Ksm` with the manager's settings),
  once KSM has scanned everything a few times: the same sums, KSM's own
  counters, and each guest's merged pages.

``--lazy`` restores lazily (:mod:`xsession.hypervisor.lazyram`, the backported QEMU):
a guest's decoded RAM image then counts whole, wherever the guest has not mapped it,
since it stays in memory (tmpfs) as long as the guest runs; KSM merges only the pages
guests wrote, which are their own.

Prints a Markdown table; ``--record`` appends it to bench/RESULTS.md.

    .venv/bin/python bench/sharing_bench.py [--scans 3] [--lazy] [--record]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.benchlib import machine, publish  # noqa: E402
from xsession.demomedia import ensure_desktop_medium, lazy_qemu  # noqa: E402
from xsession.hypervisor.qemu import QemuBackend, QemuGuest  # noqa: E402
from xsession.manifest import MANIFEST_RELPATH, load_manifest  # noqa: E402
from xsession.sharing import KSM_DIR, SCAN, Ksm, process_merged_bytes  # noqa: E402

HEARTBEAT_TIMEOUT_S = 180.0
SETTLE_S = 20.0
CONTROL_S = 60.0
MiB = 1 << 20


def rollup(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of a process in bytes."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0]) * 1024
    return fields["Pss"], fields["Rss"]


def image_pss(pid: int) -> int:
    """PSS of a lazy guest's mapping of its decoded RAM image (0 for a guest restored from the stream)."""
    total, in_image = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
            in_image = line.endswith("ram.img (deleted)")
        elif in_image and head and head[0] == "Pss:":
            total += int(head[1]) * 1024
    return total


def totals(guests: list[QemuGuest], held: dict[str, int]) -> tuple[int, int]:
    """(PSS, RSS) summed; a lazy guest's image counted whole (``held``, bytes by name)."""
    pss = rss = 0
    for g in guests:
        assert g.pid is not None
        p, r = rollup(g.pid)
        image = held.get(g.name, 0)
        if image:
            mapped = image_pss(g.pid)
            p, r = p - mapped + image, r - mapped + image
        pss, rss = pss + p, rss + r
    return pss, rss


def knob(name: str) -> int:
    return int((KSM_DIR / name).read_text())


def wait_scans(n: int, timeout: float) -> int:
    """Until KSM has made ``n`` more full scans; returns how many it made."""
    start = knob("full_scans")
    deadline = time.monotonic() + timeout
    while knob("full_scans") < start + n and time.monotonic() < deadline:
        time.sleep(1)
    return knob("full_scans") - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scans", type=int, default=3, help="full KSM scans to wait for before measuring")
    p.add_argument("--set", action="append", default=[], metavar="KNOB=N",
                   help="a KSM setting other than the manager's (e.g. use_zero_pages=0)")
    p.add_argument("--lazy", action="store_true", help="restore lazily, with the backported QEMU")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args()
    settings = {**SCAN, **{k: int(v) for k, _, v in (s.partition("=") for s in args.set)}}
    medium = ensure_desktop_medium()
    manifest = load_manifest(medium / MANIFEST_RELPATH)
    work = Path(tempfile.mkdtemp(prefix="xsd-share-", dir="/dev/shm"))  # tmpfs, as the manager's /run
    ksm = Ksm()
    guests: list[QemuGuest] = []
    before_run = knob("run")
    try:
        (KSM_DIR / "run").write_text("2")  # start from nothing merged (2: unmerge all)
        (KSM_DIR / "run").write_text("0")
        backend = QemuBackend(binary=lazy_qemu()) if args.lazy else QemuBackend()
        held: dict[str, int] = {}
        for f in manifest.flavours:
            t0 = time.monotonic()
            g = backend.restore(f, manifest, work / f.name, lambda d, t: None)
            guests.append(g)
            if g.restored_lazily:
                assert f.statefile is not None and f.statefile.lazy is not None
                held[f.name] = f.statefile.lazy.held_mib * MiB
            elif args.lazy:
                raise RuntimeError(f"{f.name}: not restored lazily: {g.note}")
            assert g.channel is not None
            if g.channel.wait_heartbeat(0, HEARTBEAT_TIMEOUT_S, g.is_alive) is None:
                raise RuntimeError(f"{f.name}: no heartbeat within {HEARTBEAT_TIMEOUT_S:.0f} s")
            print(f"{f.name}: running, heartbeat after {time.monotonic() - t0:.1f} s", flush=True)
        time.sleep(SETTLE_S)
        early, _ = totals(guests, held)
        time.sleep(CONTROL_S)  # the same wait as merging takes, without it: does memory move by itself?
        pss0, rss0 = totals(guests, held)
        print(f"without merging: PSS {early / MiB:.0f} MiB, {CONTROL_S:.0f} s later {pss0 / MiB:.0f} MiB, "
              f"RSS {rss0 / MiB:.0f} MiB", flush=True)
        t0 = time.monotonic()
        ksm.enable(settings)
        scans = wait_scans(args.scans, 900)
        took = time.monotonic() - t0
        pss1, rss1 = totals(guests, held)
        stats = ksm.stats()
        merged = {g.name: process_merged_bytes(g.pid or 0) for g in guests}
        print(f"with merging ({scans} scans, {took:.0f} s): PSS {pss1 / MiB:.0f} MiB; KSM saves "
              f"{stats.saved_mib} MiB", flush=True)
    finally:
        ksm.restore()
        for g in guests:
            g.stop()
        (KSM_DIR / "run").write_text(str(before_run))
        shutil.rmtree(work, ignore_errors=True)

    sizes = ", ".join(f"{f.name} {f.memory_mib} MiB" for f in manifest.flavours)
    lines = [
        f"{machine()}. Flavours: {sizes} (the desktop medium), restored by the backend "
        f"({'lazily, each decoded image counted whole' if args.lazy else 'from the stream'}) and running "
        f"(heartbeat seen), measured {SETTLE_S:.0f} s later.",
        f"KSM with {', '.join(f'{k}={v}' for k, v in settings.items())}; measured after "
        f"{scans} full scans ({took:.0f} s).",
        f"Command: `.venv/bin/python bench/sharing_bench.py --scans {args.scans}"
        + "".join(f" --set {s}" for s in args.set) + (" --lazy" if args.lazy else "") + "`",
        "",
        "| what | without merging | with merging | with / without |",
        "|---|---|---|---|",
        f"| host memory of all QEMUs, PSS | {pss0 / MiB:.0f} MiB ({early / MiB:.0f} MiB {CONTROL_S:.0f} s "
        f"earlier) | {pss1 / MiB:.0f} MiB | **{pss1 / pss0:.2f}x** |",
        f"| RSS summed (a merged page counts in each) | {rss0 / MiB:.0f} MiB | {rss1 / MiB:.0f} MiB | - |",
        f"| KSM: pages shared / sharing / zero pages | - | {stats.pages_shared} / {stats.pages_sharing} / "
        f"{stats.zero_pages} ({stats.saved_mib} MiB saved) | - |",
        "| merged per guest | - | " + ", ".join(f"{n} {b / MiB:.0f} MiB" for n, b in merged.items()) + " | - |",
    ]
    publish("Memory shared between flavours", lines, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
