"""The default desktop from a DVD: time to the desktop responding, bytes read, seeks.

The Xfce flavour (xubuntu, 1 GiB) of the desktop medium, served through the
drive model (bench/mediumsim) as a DVD, a USB 2 stick and a fast disk. The
medium holds the flavour twice, sharing its disks: once as mastered for the
tests (zstd level 3) and once as mastered for a burnt medium
(``xsession-master --level 19``; the statefile recompressed, cached). From a
cold cache each time, one run, the ways side by side:

* ``cold boot``: the backend's cold boot, to the guest agent's ready line (DVD only:
  about a minute under emulation, and what it reads is the point);
* ``restore as before``: level 3, QEMU given the kernel and initrd (read from the medium);
* ``restore, stubs``: level 3, QEMU given stubs (:mod:`xsession.hypervisor.bootstub`);
* ``restore, stubs, level 19``: the default path for a burnt medium;
* ``switch to server, preloaded``: with the desktop running, the server's
  statefile is preloaded into RAM as the manager does (:class:`xsession.preload.Preload`,
  one sequential read), then the server is restored from that copy: the time a
  person waits after asking for it.

Each is timed from the backend's start to the guest running and to its first
heartbeat after the restore (the desktop session answers), with the drive's
counters; the physical limit is the statefile's bytes at the profile's rate.

    .venv/bin/python bench/dvd_desktop_bench.py [--level 19] [--record]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.benchlib import machine, publish  # noqa: E402
from bench.mediumsim import PROFILES, Stats, make_image, slow_medium  # noqa: E402
from xsession.demomedia import ensure_desktop_medium  # noqa: E402
from xsession.hypervisor.qemu import QemuBackend, QemuGuest  # noqa: E402
from xsession.manifest import MANIFEST_RELPATH, Manifest, load_manifest  # noqa: E402
from xsession.preload import Preload  # noqa: E402

FLAVOUR = "xubuntu"
SECOND = "server"
CACHE = Path("/var/cache/xenubuntu/bench")
HEARTBEAT_TIMEOUT_S = 300.0
T = TypeVar("T")


def recompressed(state: Path, sha256: str, level: int) -> Path:
    """The statefile at another zstd level, as mastering writes it (content size and
    checksum in the frame); cached by the original's hash and the level."""
    out = CACHE / f"state-{sha256[:16]}-L{level}.zst"
    if out.is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        raw = Path(work) / "raw"
        subprocess.run(["zstd", "-dqf", str(state), "-o", str(raw)], check=True)
        subprocess.run(["zstd", "-qf", f"-{level}", "-T0", "--check", str(raw), "-o", str(Path(work) / "z")],
                       check=True)
        os.replace(Path(work) / "z", out)
    return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def build_tree(medium: Path, level: int, tree: Path) -> dict[str, int]:
    """``tree/l3`` and ``tree/lN``: two media holding only the flavour (hard links; the
    squashfs stores the shared disks once). Returns each statefile's size."""
    doc = yaml.safe_load((medium / MANIFEST_RELPATH).read_text())
    entry = next(f for f in doc["flavours"] if f["name"] == FLAVOUR)
    second = next(f for f in doc["flavours"] if f["name"] == SECOND)
    folder = medium / "xenubuntu" / "flavours" / FLAVOUR
    sizes = {}
    for tag in ("l3", f"l{level}"):
        root = tree / tag
        for name in (FLAVOUR, SECOND):
            dest = root / "xenubuntu" / "flavours" / name
            dest.mkdir(parents=True)
            for f in (medium / "xenubuntu" / "flavours" / name).iterdir():
                os.link(f, dest / f.name)
        dest = root / "xenubuntu" / "flavours" / FLAVOUR
        e = dict(entry, statefile=dict(entry["statefile"]))
        if tag != "l3":
            (dest / "state.zst").unlink()
            z = recompressed(folder / "state.zst", entry["statefile"]["sha256"], level)
            shutil.copyfile(z, dest / "state.zst")
            e["statefile"].update(size=z.stat().st_size, sha256=sha256_of(z))
        sizes[tag] = e["statefile"]["size"]
        sizes["second"] = 0  # read before the switch: its limit is RAM's
        (root / MANIFEST_RELPATH).write_text(yaml.safe_dump(dict(doc, default=FLAVOUR, flavours=[e, second]),
                                                           sort_keys=False))
        load_manifest(root / MANIFEST_RELPATH)  # the copy must be a valid medium
    return sizes


def wait_heartbeat(guest: QemuGuest) -> None:
    assert guest.channel is not None
    if guest.channel.wait_heartbeat(0, HEARTBEAT_TIMEOUT_S, guest.is_alive) is None:
        raise RuntimeError(f"{guest.name}: no heartbeat within {HEARTBEAT_TIMEOUT_S:.0f} s")


def timed_restore(backend: QemuBackend, manifest: Manifest, name: str, rundir: Path,
                  sources: tuple[Path, ...] | None = None) -> tuple[float, float]:
    """Seconds to the restored guest running, and to its first heartbeat; the guest is stopped."""
    t0 = time.monotonic()
    guest = backend.restore(manifest.flavour(name), manifest, rundir, lambda d, t: None, sources=sources)
    try:
        running = time.monotonic() - t0
        wait_heartbeat(guest)
        return running, time.monotonic() - t0
    finally:
        guest.stop()


def restore_way(root: Path, stub: bool) -> Callable[[Path], tuple[float, float]]:
    def run(rundir: Path) -> tuple[float, float]:
        return timed_restore(QemuBackend(boot_stub=stub), load_manifest(root / MANIFEST_RELPATH), FLAVOUR, rundir)
    return run


@contextlib.contextmanager
def preloaded(backend: QemuBackend, manifest: Manifest, name: str) -> Iterator[tuple[Path, ...]]:
    """What a restore of ``name`` reads, preloaded into RAM as the manager does (one
    sequential read); yields the copies, freed afterwards."""
    parts = backend.preload_parts(manifest.flavour(name))
    free, done = threading.Event(), threading.Event()
    free.set()
    preload = Preload(name, [(manifest.resolve(p.path), p.size) for p in parts], free, lambda p: done.set())
    preload.start()
    done.wait(300)
    try:
        if not preload.complete:
            raise RuntimeError(f"preload failed: {preload.error}")
        yield preload.sources()
    finally:
        preload.release()


def switch_way(root: Path, backend: QemuBackend | None, timed: Callable[..., T]) -> Callable[[Path], T]:
    """The desktop restored, the second flavour preloaded, then (timed) the second restored
    from RAM; the drive counts everything, the preload included. ``timed(backend, manifest,
    name, rundir, sources=...)`` restores and measures."""
    def run(rundir: Path) -> T:
        manifest = load_manifest(root / MANIFEST_RELPATH)
        way = backend or QemuBackend()
        first = way.restore(manifest.flavour(FLAVOUR), manifest, rundir / "first", lambda d, t: None)
        try:
            wait_heartbeat(first)
            with preloaded(way, manifest, SECOND) as sources:
                return timed(way, manifest, SECOND, rundir / "second", sources=sources)
        finally:
            first.stop()
    return run


def cold_way(root: Path) -> Callable[[Path], tuple[float, float]]:
    def run(rundir: Path) -> tuple[float, float]:
        manifest = load_manifest(root / MANIFEST_RELPATH)
        t0 = time.monotonic()
        guest = QemuBackend().cold_boot(manifest.flavour(FLAVOUR), manifest, rundir)
        t = time.monotonic() - t0
        guest.stop()
        return t, t
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--level", type=int, default=19, help="zstd level of the burnt medium's statefile")
    p.add_argument("--profiles", default="dvd,usb2,fast")
    p.add_argument("--no-cold", action="store_true", help="leave out the cold boot")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args()
    medium = ensure_desktop_medium()
    hi = f"l{args.level}"
    rows: list[tuple[str, str, float, float, Stats, float]] = []
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xs-dvd-") as work:
        tree = Path(work) / "tree"
        sizes = build_tree(medium, args.level, tree)
        image = make_image(tree, Path(work) / "medium.sqfs")
        shutil.rmtree(tree)
        for name in args.profiles.split(","):
            prof = PROFILES[name]
            with slow_medium(image, prof, mount=True) as slow:
                ways: list[tuple[str, str, Callable[[Path], tuple[float, float]]]] = []
                if name == "dvd" and not args.no_cold:
                    ways.append(("cold boot", "l3", cold_way(slow.path / "l3")))
                ways += [("restore as before (level 3, kernel and initrd read)", "l3",
                          restore_way(slow.path / "l3", False)),
                         ("restore, stubs (level 3)", "l3", restore_way(slow.path / "l3", True)),
                         (f"restore, stubs, level {args.level}", hi, restore_way(slow.path / hi, True)),
                         (f"switch to {SECOND}, preloaded (level 3)", "second",
                          switch_way(slow.path / hi, None, timed_restore))]
                for what, tag, fn in ways:
                    slow.drop_caches()
                    before = slow.stats()
                    rundir = Path(tempfile.mkdtemp(prefix="xs-dvd-run-"))
                    try:
                        running, answered = fn(rundir)
                    except Exception as e:  # one way failing (a cold boot past its timeout) ends no other
                        print(f"{name:5} {what}: {e}", flush=True)
                        running = answered = float("nan")
                    finally:
                        shutil.rmtree(rundir, ignore_errors=True)
                    st = slow.stats() - before
                    limit = prof.physical_limit(sizes[tag])
                    rows.append((name, what, running, answered, st, limit))
                    print(f"{name:5} {what:55} running {running:6.2f} s, heartbeat {answered:6.2f} s, {st}",
                          flush=True)
    wall = time.monotonic() - t_all

    lines = [
        f"{machine()}. Flavour {FLAVOUR} (1024 MiB); statefile {sizes['l3'] / 1e6:.1f} MB at level 3, "
        f"{sizes[hi] / 1e6:.1f} MB at level {args.level}; medium an uncompressed squashfs through the drive "
        f"model; caches dropped before each way; one run ({wall:.0f} s).",
        f"Command: `.venv/bin/python bench/dvd_desktop_bench.py --level {args.level}`",
        "",
        "| profile | way | to running | to heartbeat | bytes read | seeks | model time "
        "| limit (statefile / rate) | heartbeat / limit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, what, running, answered, st, limit in rows:
        ratio = f"{answered / limit:.2f}x" if limit > 0 else "-"
        lines.append(f"| {name} | {what} | {running:.2f} s | {answered:.2f} s | {st.medium_bytes / 1e6:.1f} MB "
                     f"| {st.seeks} | {st.model_s:.2f} s | {limit:.2f} s | {ratio} |")
    publish("The default desktop from a DVD", lines, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
