"""The demo's media, built when missing: the quick one of small demo guests, and the
one of real flavours (Debian desktops, a server, a live ISO).

Both are cached. The quick medium lives in the clone's ``.cache/`` (seconds to
rebuild). The real flavours and their medium are big (GBs, minutes to build), so
they live in a machine-wide cache outside the clone, keyed by a hash of what they
are made from, so that a second clone, the tests and the demo share them:

    /var/cache/xenubuntu/flavours/NAME-KEY/    a built flavour (demo/build-flavour.sh)
    /var/cache/xenubuntu/media/desktops-KEY/   the medium mastered from them

A medium is mastered into a temporary folder and renamed into place once it is
complete and its manifest validates; one that fails that check is built again.
Builders are serialised by a lock file, so parallel test runs wait for each other.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import cachepruning
from .errors import XSessionError
from .manifest import MANIFEST_RELPATH, load_manifest
from .mastering import master as _master
from . import screen as _screen
from .mastering import sources as _sources
from .mastering import pool as _pool
from . import netplan as _netplan
from . import network as _network
from .mastering.master import load_spec, master_medium

__all__ = ["REPO", "DEMO", "CACHE", "MEDIA_CACHE", "REAL_FLAVOURS", "ensure_demo_medium", "ensure_real_flavour",
           "ensure_desktop_medium", "lazy_qemu"]

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "demo"
CACHE = REPO / ".cache"
MEDIA_CACHE = Path(os.environ.get("XENUBUNTU_MEDIA_CACHE", "/var/cache/xenubuntu/media"))
REAL_FLAVOURS = ("xubuntu", "lubuntu", "server")
COMPLETE = ".complete"
Report = Callable[[str], None]


def ensure_demo_medium(cache: Path = CACHE, report: Report = print) -> Path:
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
        splitter, stamp = lazy_qemu(), medium / ".lazy-qemu"  # a new QEMU splits the statefiles anew
        if (not manifest.exists() or any(p.stat().st_mtime > manifest.stat().st_mtime for p in inputs)
                or not stamp.exists() or stamp.read_text() != splitter):
            report("mastering the demo medium (each flavour boots once and is saved) ...")
            master_medium(load_spec(DEMO / "flavours.yaml"), guests, medium,
                          report=lambda line: report("  " + line), lazy_qemu=splitter)
            stamp.write_text(splitter)
    return medium


@functools.lru_cache(maxsize=1)
def lazy_qemu() -> str:
    """A QEMU that restores lazily (8.2 or later): Debian 12's backport, unpacked into a
    machine-wide cache beside the system's 7.2 (``tools/qemu-backports``). Asked once per
    process: the tool asks the package index each time."""
    out = subprocess.run([str(REPO / "tools" / "qemu-backports")], check=True, stdout=subprocess.PIPE, text=True)
    return str(Path(out.stdout.strip().splitlines()[-1]) / "qemu-system-x86_64")


def ensure_real_flavour(name: str, report: Report | None = None) -> Path:
    """The folder of a real flavour built from Debian's packages (``demo/build-flavour.sh``).

    Builds it when the machine-wide cache has no valid build of the current recipe;
    the cache serialises concurrent builders. ``report`` gets the build's progress
    lines (default: they go to stderr).

    :raises subprocess.CalledProcessError: the build failed.
    """
    if name not in REAL_FLAVOURS:
        raise ValueError(f"no real flavour {name!r}; there are {', '.join(REAL_FLAVOURS)}")
    cmd = [str(DEMO / "build-flavour.sh"), name]
    if report is None:
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        return _used(name, Path(done.stdout.strip().splitlines()[-1]), lambda line: None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None and proc.stdout is not None
    for line in proc.stderr:
        report(line.rstrip("\n"))
    out = proc.stdout.read()
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, out)
    return _used(name, Path(out.strip().splitlines()[-1]), report)


def _used(name: str, entry: Path, report: Report) -> Path:
    """Mark a flavour's build used and let the oldest builds of it go (their lock is
    build-flavour.sh's ``.NAME-KEY.lock``)."""
    cachepruning.mark_used(entry)
    cachepruning.prune(entry.parent, name, entry, report, lambda old: old.parent / f".{old.name}.lock")
    return entry


def _mastering_key(spec: Path, builds: dict[str, Path], splitter: str) -> str:
    """What a mastered medium is made of: the spec, each build (its folder names its
    recipe's key), the code that decides what a statefile holds, and the QEMU that
    splits it for lazy restores (its folder names its version)."""
    from .hypervisor import lazyram, qemu
    h = hashlib.sha256(spec.read_bytes())
    h.update(f"lazy-qemu={splitter}\n".encode())
    for name, folder in sorted(builds.items()):
        h.update(f"{name}={folder.name}\n".encode())
    for code in (_master, _sources, _screen, _pool, _netplan, _network,
                 qemu.qemu_argv, qemu.QemuBackend.boot_for_save, qemu.QemuBackend.save,
                 qemu.QemuBackend.save_lazy_image, lazyram,
                 qemu.QemuBackend.settle, qemu.QemuBackend._wait_settled, qemu.QemuBackend._wait_ready,
                 qemu.QemuBackend.prepare_for_save, qemu.PREPARE_FOR_SAVE, qemu.freshen_script, qemu.clock_offset,
                 repr((qemu.SETTLE_QUIET_S, qemu.SETTLE_QUIET_PLAIN_S, qemu.PAINTED_COLOURS, qemu.SETTLE_SAMPLE_S,
                       qemu.SETTLE_AFTER_READY_S, qemu.SETTLE_QUIET_TEXT_MODE_S, qemu.TEXT_MODE,
                       qemu.SETTLE_QUIET_PLAIN_SCREEN_ONLY_S))):
        h.update(code.encode() if isinstance(code, str) else inspect.getsource(code).encode())
    return h.hexdigest()[:12]


def _sizes(medium: Path) -> dict[str, int]:
    return {str(p.relative_to(medium)): p.stat().st_size for p in sorted(medium.rglob("*"))
            if p.is_file() and p.name != COMPLETE}


def _valid(medium: Path) -> bool:
    """Complete (the stamp, written last, lists every file and its size) and unchanged
    since: a file damaged in place, or one that a link shares with a damaged build, is seen."""
    try:
        recorded = json.loads((medium / COMPLETE).read_text())
        manifest = load_manifest(medium / MANIFEST_RELPATH)
        return (isinstance(recorded, dict) and recorded.get("files") == _sizes(medium)
                and all(f.statefile is not None for f in manifest.flavours))
    except (XSessionError, OSError, ValueError):
        return False


def ensure_desktop_medium(report: Report = print, spec: Path = DEMO / "desktops.yaml",
                          cache: Path = MEDIA_CACHE) -> Path:
    """The medium of real flavours, built and mastered when the cache has no valid one.

    The first time on a machine this builds three Debian systems (several minutes
    each) and boots each once under QEMU to save it (about a minute each under
    emulation); progress goes to ``report``.
    """
    names = [f.name for f in load_spec(spec).flavours]
    builds = {}
    for name in names:
        report(f"flavour {name}: checking the build cache ...")
        builds[name] = ensure_real_flavour(name, report=lambda line, n=name: report(f"  {n}: {line}"))
    splitter = lazy_qemu()
    key = _mastering_key(spec, builds, splitter)
    medium = cache / f"desktops-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for leftover in cache.glob("desktops-*.*"):  # a mastering that died (nobody masters while we hold the lock)
            cachepruning.remove_tree(leftover)
        if not _valid(medium):
            _master_into(medium, key, spec, builds, splitter, report)
        cachepruning.mark_used(medium)
        cachepruning.prune(cache, "desktops", medium, report)  # under the cache's lock
    return medium


def _master_into(medium: Path, key: str, spec: Path, builds: dict[str, Path], splitter: str,
                 report: Report) -> None:
    """Master the medium in a temporary folder of the cache and rename it into place."""
    cache = medium.parent
    shutil.rmtree(medium, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f"desktops-{key}.", dir=cache))
    try:
        guests = work / "guests"
        guests.mkdir()
        for name, folder in builds.items():
            (guests / name).symlink_to(folder)
        out = work / "medium"
        report("mastering the desktop medium (each flavour boots once, settles and is saved) ...")
        _master_in_namespace(spec, guests, out, next(iter(builds.values())).parent / "debs", splitter, report)
        (out / COMPLETE).write_text(json.dumps({"key": key, "files": _sizes(out)}, indent=1))
        out.rename(medium)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _master_in_namespace(spec: Path, guests: Path, out: Path, debs: Path, splitter: str, report: Report) -> None:
    """``xsession-master`` in a network namespace of its own: the flavours are saved on
    an internal network like dom0's (same addresses), made where it touches no other
    network, and their packages go into the medium's pool.

    :raises XSessionError: mastering failed (its last lines say why).
    """
    argv = ["unshare", "--net", "--", sys.executable, "-m", "xsession.mastering.cli", str(spec),
            "--guests", str(guests), "--out", str(out), "--jobs", "1", "--pool-debs", str(debs),
            "--lazy-qemu", splitter]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        report("  " + line.rstrip("\n"))
        tail = (tail + [line.rstrip()])[-5:]
    if proc.wait() != 0:
        raise XSessionError(f"mastering the desktop medium failed ({proc.returncode}): {' | '.join(tail)}")
