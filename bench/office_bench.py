"""The office at work: from Start to the first document seen on the second desktop.

The desktop medium's office (a server and two desktops, docs/office.md) with the
manager's own pieces in this process, as xsessiond wires them: dom0's internal
network (a bridge and dnsmasq, in a network namespace of this run's own: the
script re-runs itself under ``unshare --net``), the QEMU backend, the engine and
the :class:`~xsession.office.manager.OfficeManager`. Two rounds, one run:

* **cold**: nothing runs; ``Start`` restores the three sessions from the medium,
  then the workers start (the person's first click);
* **warm**: the office paused, everything running; ``Start`` again.

For each, seconds from ``Start`` to: every session running, both workers
acknowledging, the first document saved, the first document read by the other
desktop, the first calendar event seen by the other desktop. The worker takes a
step every two seconds, so the floor of "first read" is about one step after the
first save (read on the other desktop's next step).

    .venv/bin/python bench/office_bench.py [--record]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.benchlib import machine, publish  # noqa: E402

TIMEOUT_S = 900.0
MARKS = ("running", "acknowledged", "saved", "read", "saw")


class Stamps:
    """The first time each mark is reached after a start (the office's events, any thread)."""

    def __init__(self, desktops: tuple[str, ...]):
        self.desktops = desktops
        self.t0 = 0.0
        self.at: dict[str, float] = {}
        self.cond = threading.Condition()

    def begin(self) -> None:
        with self.cond:
            self.t0 = time.monotonic()
            self.at = {}

    def mark(self, what: str) -> None:
        with self.cond:
            if self.t0 and what not in self.at:
                self.at[what] = time.monotonic() - self.t0
                self.cond.notify_all()

    def wait(self, timeout: float = TIMEOUT_S) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(m in self.at for m in MARKS):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"only {sorted(self.at)} within {timeout:.0f} s")
                self.cond.wait(left)
            return dict(self.at)


def run() -> list[str]:
    from xsession.bootopts import parse_cmdline
    from xsession.demomedia import ensure_desktop_medium
    from xsession.engine import Engine, State
    from xsession.hypervisor.qemu import QemuBackend
    from xsession.manifest import MANIFEST_RELPATH, load_manifest
    from xsession.netplan import NetworkMode
    from xsession.network import network_for
    from xsession.office.manager import OfficeManager

    medium = ensure_desktop_medium(report=lambda line: print(line, file=sys.stderr))
    manifest = load_manifest(medium / MANIFEST_RELPATH)
    assert manifest.office is not None, "the desktop medium has no office"
    work = Path(tempfile.mkdtemp(prefix="office-bench."))
    net = network_for(manifest, NetworkMode.INTERNAL, work / "network")
    assert net is not None
    net.up()
    backend = QemuBackend()
    backend.network = net
    engine = Engine(manifest, backend, work / "run", parse_cmdline("xenubuntu.restore=off"), max_parallel=1)
    office = OfficeManager(engine)
    layout = manifest.office
    stamps = Stamps(layout.desktops)
    names = (layout.server, *layout.desktops)

    def on_office(event: str, payload: object) -> None:
        if event == "activity":
            stamps.mark(payload.kind)  # type: ignore[attr-defined]
        elif event == "changed":
            workers = payload.workers  # type: ignore[attr-defined]
            wanted = payload.state.value  # type: ignore[attr-defined]
            if all(workers[d].acknowledged == wanted for d in layout.desktops):
                stamps.mark("acknowledged")

    def on_engine(event: str, view: object) -> None:
        if event == "state-changed" and all(engine.session(n).state is State.RUNNING for n in names):
            stamps.mark("running")

    office.subscribe(on_office)
    engine.subscribe(on_engine)
    engine.start()
    rows = []
    try:
        for label in ("cold (nothing runs)", "warm (paused, all running)"):
            if label.startswith("warm"):
                office.pause()
                time.sleep(10)  # the workers acknowledge; what they did before has arrived
            stamps.begin()
            office.start()
            if label.startswith("warm"):
                stamps.mark("running")  # already
            at = stamps.wait()
            rows.append(f"| {label} | " + " | ".join(f"{at[m]:.1f}" for m in MARKS) + " |")
            print(rows[-1], file=sys.stderr)
        counters = office.view().counters
    finally:
        engine.shutdown(stop_guests=True)
        net.close(teardown=True)
        shutil.rmtree(work, ignore_errors=True)
    return [
        machine(),
        "",
        "`.venv/bin/python bench/office_bench.py --record` (the desktop medium's office: "
        f"{layout.server} with {', '.join(layout.desktops)}; seconds from Start)",
        "",
        "| round | all running | workers acknowledge | first document saved | first document read on the other "
        "desktop | first event seen on the other desktop |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Over both rounds: {counters.saved} documents saved, {counters.read} read by the other desktop; "
        f"{counters.added} events added, {counters.seen} seen by the other.",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    if os.environ.get("XENUBUNTU_BENCH_NETNS") != "1":  # a network of this run's own
        env = dict(os.environ, XENUBUNTU_BENCH_NETNS="1")
        return subprocess.run(["unshare", "--net", "--", sys.executable, *sys.argv], env=env).returncode
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    publish("The office at work", run(), args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
