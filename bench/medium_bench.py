"""A demo statefile read from a DVD, a USB 2 stick and a fast disk (bench/mediumsim).

The demo medium is made into one squashfs image, served through the drive
model for each profile and mounted; each run starts cold (the medium's
caches dropped first). Per profile, on the default flavour's statefile:

* ``sequential``: a plain read in 1 MiB chunks;
* ``feed``: the manager's verified feed (``Feeder``: sha256 and ``zstd -dc``)
  into a pipe a thread drains;
* ``restore``: the whole ``QemuBackend.restore`` from the slowed medium, to
  the guest running (QEMU also reads its disk and the medium's metadata);
* ``seeks``: an accuracy check, K reads of 64 KiB 2 MiB apart (each a seek).

Reported: time, bytes delivered, bytes under the head, seeks, the model's
time for those reads, and the ratio of the time to the physical limit (the
statefile's size at the profile's rate). One run, profiles side by side.

    .venv/bin/python bench/medium_bench.py [--record] [--seeks K]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.benchlib import publish  # noqa: E402
from bench.mediumsim import PROFILES, Stats, make_image, slow_medium  # noqa: E402
from xsession.demomedia import ensure_demo_medium  # noqa: E402
from xsession.hypervisor.qemu import QemuBackend  # noqa: E402
from xsession.manifest import MANIFEST_RELPATH, load_manifest  # noqa: E402
from xsession.statefile import CHUNK, Feeder  # noqa: E402

MiB = 1 << 20


def sequential(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            n += len(block)
    return n


def feed(path: Path, sf) -> None:
    r, w = os.pipe()

    def drain() -> None:
        while os.read(r, 1 << 20):
            pass

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    feeder = Feeder(path, sf, w)
    feeder.start()
    result = feeder.result(300)
    t.join(60)
    os.close(r)
    if result.problem or result.medium_error:
        raise RuntimeError(f"feed failed: {result.problem or result.medium_error}")


def seeks(path: Path, k: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # exactly the reads asked for
        for i in range(k):
            os.pread(fd, 64 << 10, (k - i) * 2 * MiB)  # backwards: each one a seek
    finally:
        os.close(fd)


def restore(root: Path, flavour_name: str) -> None:
    manifest = load_manifest(root / MANIFEST_RELPATH)
    flavour = manifest.flavour(flavour_name)
    rundir = Path(tempfile.mkdtemp(prefix="xsm-"))
    try:
        guest = QemuBackend().restore(flavour, manifest, rundir, lambda done, total: None)
        guest.stop()
    finally:
        subprocess.run(["rm", "-rf", str(rundir)], check=False)


def measure(slow, fn) -> tuple[float, Stats]:
    slow.drop_caches()
    before = slow.stats()
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0, slow.stats() - before


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    p.add_argument("--seeks", type=int, default=10, help="reads in the seek check (default 10)")
    args = p.parse_args()
    medium = ensure_demo_medium(report=lambda line: print(line, flush=True))
    manifest = load_manifest(medium / MANIFEST_RELPATH)
    flavour = manifest.flavour(manifest.default)
    sf = flavour.statefile
    rel = Path(manifest.resolve(sf.path)).relative_to(os.path.realpath(medium))
    rows = []
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xsm-img-") as work:
        image = make_image(medium, Path(work) / "medium.sqfs")
        for name in ("dvd", "usb2", "fast"):
            prof = PROFILES[name]
            with slow_medium(image, prof, mount=True) as slow:
                state = slow / rel
                runs = [("sequential 1 MiB reads", lambda s=state: sequential(s)),
                        ("manager's feed (sha256 + zstd -dc)", lambda s=state: feed(s, sf)),
                        (f"restore of {flavour.name} to running", lambda r=slow.path: restore(r, flavour.name)),
                        (f"{args.seeks} x 64 KiB, 2 MiB apart, backwards", lambda s=state: seeks(s, args.seeks))]
                for what, fn in runs:
                    dt, st = measure(slow, fn)
                    rows.append((name, what, dt, st, prof))
                    print(f"{name:5} {what:40} {dt:7.3f} s  {st}", flush=True)
    wall = time.monotonic() - t_all

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    lines = [
        f"Machine: {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, Debian "
        f"{Path('/etc/debian_version').read_text().strip()}; commit {commit}; other work running at the same time.",
        f"Statefile: `{rel}` of the demo medium ({sf.size / 1e6:.1f} MB zstd); the medium as an uncompressed squashfs "
        f"image on a loop device over the nbdfuse file; caches dropped before each run; one run (whole bench {wall:.0f} s).",
        f"Command: `.venv/bin/python bench/medium_bench.py --seeks {args.seeks}`",
        "",
        "| profile | what | time | bytes delivered | bytes under the head | seeks | model time | time/model "
        "| physical limit (statefile / rate) | time/limit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, what, dt, st, prof in rows:
        limit = prof.physical_limit(sf.size)
        ratio = f"{dt / limit:.2f}x" if limit > 0 else "-"
        model = f"{dt / st.model_s:.3f}" if st.model_s > 0 else "-"
        lines.append(f"| {name} | {what} | {dt:.3f} s | {st.bytes / 1e6:.1f} MB | {st.medium_bytes / 1e6:.1f} MB "
                     f"| {st.seeks} | {st.model_s:.3f} s | {model} | {limit:.3f} s | {ratio} |")
    publish("Slow media", lines, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
