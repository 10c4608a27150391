"""Lazy against eager restores of the Xfce desktop: time, bytes read, memory.

The desktop medium's xubuntu (1 GiB) and server, their statefiles and their RAM
images as mastered (zstd level 3), served through the drive model (bench/mediumsim)
as a fast disk, a USB 2 stick and a DVD; caches dropped before each way. One run,
the ways side by side:

* ``stream, QEMU 7.2``: today's restore with Debian 12's QEMU;
* ``stream, QEMU 10``: the same stream with the backported QEMU that can map;
* ``lazy, QEMU 10``: the RAM image decoded into memory and mapped copy-on-write,
  the devices' state streamed (:mod:`xsession.hypervisor.lazyram`);
* ``switch to server, preloaded``: with the desktop running, what a restore of the
  server reads most of is preloaded into RAM as the manager does (the statefile,
  or the RAM image for a lazy restore), then the server restored from it.

Each is timed from the backend's start to the restore's end (the guest runs and its
clock was set through its agent) and to its first heartbeat (the desktop session
answers; it can come first). Memory is the host's for the guest at that end: QEMU's anonymous memory, plus the decoded image for a lazy guest
(its pages stay in memory whatever the guest touches).

    .venv/bin/python bench/lazy_bench.py [--profiles fast,usb2,dvd] [--record]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.benchlib import machine, publish  # noqa: E402
from bench.dvd_desktop_bench import switch_way, wait_heartbeat  # noqa: E402
from bench.mediumsim import PROFILES, Stats, make_image, slow_medium  # noqa: E402
from xsession.demomedia import ensure_desktop_medium, lazy_qemu  # noqa: E402
from xsession.hypervisor.qemu import QemuBackend, QemuGuest  # noqa: E402
from xsession.manifest import MANIFEST_RELPATH, Manifest, load_manifest  # noqa: E402

FLAVOUR = "xubuntu"
SECOND = "server"


@dataclass
class Run:
    running_s: float
    heartbeat_s: float
    host_mib: float
    lazily: bool


def build_tree(medium: Path, tree: Path) -> None:
    """A medium holding only the two flavours (hard links), the desktop the default."""
    doc = yaml.safe_load((medium / MANIFEST_RELPATH).read_text())
    for name in (FLAVOUR, SECOND):
        dest = tree / "xenubuntu" / "flavours" / name
        dest.mkdir(parents=True)
        for f in (medium / "xenubuntu" / "flavours" / name).iterdir():
            os.link(f, dest / f.name)
    shared = medium / "xenubuntu" / "shared"  # the flavours' common system, their disks' backing
    if shared.is_dir():
        shutil.copytree(shared, tree / "xenubuntu" / "shared", copy_function=os.link)
    flavours = [f for f in doc["flavours"] if f["name"] in (FLAVOUR, SECOND)]
    doc = {k: v for k, v in doc.items() if k != "office"}  # its other desktop is not here
    (tree / MANIFEST_RELPATH).write_text(yaml.safe_dump(dict(doc, default=FLAVOUR, flavours=flavours),
                                                       sort_keys=False))
    for f in load_manifest(tree / MANIFEST_RELPATH).flavours:  # a valid medium, split for lazy restores
        assert f.statefile is not None and f.statefile.lazy is not None, f.name


def host_mib(guest: QemuGuest, manifest: Manifest) -> float:
    """QEMU's anonymous memory, and a lazy guest's decoded image (held whole in memory)."""
    anon = 0
    for line in Path(f"/proc/{guest.pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            anon = int(line.split()[1])
    sf = manifest.flavour(guest.name).statefile
    held = sf.lazy.held_mib if guest.restored_lazily and sf is not None and sf.lazy is not None else 0
    return anon / 1024 + held


def timed(backend: QemuBackend, manifest: Manifest, name: str, rundir: Path,
          sources: tuple[Path, ...] | None = None) -> Run:
    """Seconds to the restore's end (the guest's clock set), and to its first heartbeat,
    which may come before that end: the desktop answers while its clock is set."""
    t0 = time.time()
    guest = backend.restore(manifest.flavour(name), manifest, rundir, lambda d, t: None, sources=sources)
    try:
        running = time.time() - t0
        wait_heartbeat(guest)
        assert guest.channel is not None
        return Run(running, guest.channel.first_at - t0, host_mib(guest, manifest), guest.restored_lazily)
    finally:
        guest.stop()


def restore_way(root: Path, backend: QemuBackend) -> Callable[[Path], Run]:
    return lambda rundir: timed(backend, load_manifest(root / MANIFEST_RELPATH), FLAVOUR, rundir)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", default="fast,usb2,dvd")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args()
    medium = ensure_desktop_medium()
    q10 = lazy_qemu()
    old, stream10, lazy10 = QemuBackend(), QemuBackend(binary=q10, lazy=False), QemuBackend(binary=q10)
    manifest = load_manifest(medium / MANIFEST_RELPATH)
    sf = manifest.flavour(FLAVOUR).statefile
    assert sf is not None and sf.lazy is not None
    reads = {"stream": sf.size, "lazy": sf.lazy.ram.size + sf.lazy.devices.size, "switch": 0}
    rows: list[tuple[str, str, Run | None, Stats, float]] = []
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xs-lazy-") as work:
        tree = Path(work) / "tree"
        build_tree(medium, tree)
        image = make_image(tree, Path(work) / "medium.sqfs")
        shutil.rmtree(tree)
        for name in args.profiles.split(","):
            prof = PROFILES[name]
            with slow_medium(image, prof, mount=True) as slow:
                ways = [("stream, QEMU 7.2 (today)", "stream", restore_way(slow.path, old)),
                        ("stream, QEMU 10", "stream", restore_way(slow.path, stream10)),
                        ("lazy, QEMU 10", "lazy", restore_way(slow.path, lazy10))]
                ways += [(f"switch to {SECOND}, {what}", "switch", switch_way(slow.path, backend, timed))
                         for what, backend in (("statefile preloaded (QEMU 7.2)", old),
                                               ("statefile preloaded (QEMU 10)", stream10),
                                               ("RAM image preloaded (lazy)", lazy10))]
                for what, kind, fn in ways:
                    slow.drop_caches()
                    before = slow.stats()
                    rundir = Path(tempfile.mkdtemp(prefix="xs-lazy-run-", dir="/dev/shm"))  # tmpfs, as /run is
                    result: Run | None = None
                    try:
                        result = fn(rundir)
                    except Exception as e:  # one way failing ends no other
                        print(f"{name:5} {what}: {e}", flush=True)
                    finally:
                        shutil.rmtree(rundir, ignore_errors=True)
                    st = slow.stats() - before
                    rows.append((name, what, result, st, prof.physical_limit(reads[kind])))
                    print(f"{name:5} {what:50} {result}, {st}", flush=True)
    wall = time.monotonic() - t_all
    lazy = sf.lazy
    lines = [
        f"{machine()}. Flavour {FLAVOUR} (1024 MiB): statefile {sf.size / 1e6:.1f} MB; RAM image "
        f"{lazy.ram.size / 1e6:.1f} MB (holds {lazy.held_mib} MiB decoded) and devices' state "
        f"{lazy.devices.size / 1e6:.2f} MB; all zstd level 3. The medium an uncompressed squashfs through the drive "
        f"model; caches dropped before each way; run folders on tmpfs; one run ({wall:.0f} s).",
        "Command: `.venv/bin/python bench/lazy_bench.py`",
        "",
        "| profile | way | to the restore's end | to the first heartbeat | host memory | bytes read | seeks "
        "| limit (bytes needed / rate) | heartbeat / limit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, what, r, st, limit in rows:
        if r is None:
            lines.append(f"| {name} | {what} | failed | | | {st.medium_bytes / 1e6:.1f} MB | {st.seeks} | | |")
            continue
        ratio = f"{r.heartbeat_s / limit:.2f}x" if limit > 0 else "-"
        lim = f"{limit:.2f} s" if limit > 0 else "-"
        lines.append(f"| {name} | {what}{'' if r.lazily or 'lazy' not in what else ' (fell back)'} "
                     f"| {r.running_s:.2f} s | {r.heartbeat_s:.2f} s | {r.host_mib:.0f} MiB "
                     f"| {st.medium_bytes / 1e6:.1f} MB | {st.seeks} | {lim} | {ratio} |")
    publish("Lazy restores of the desktop", lines, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
