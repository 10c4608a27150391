"""What the benchmarks share: the machine they ran on, a cold boot timed, and recording."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def machine() -> str:
    """The machine and the commit, as a table's first line says them."""
    cpus = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return (f"Machine: {platform.machine()}, {cpus} CPUs, QEMU TCG, "
            f"Debian {Path('/etc/debian_version').read_text().strip()}; commit {commit}")


def cold_boot(flavour, manifest, rundir: Path) -> float:  # type: ignore[no-untyped-def]
    """Seconds from QEMU's start to the flavour's readiness (the backend's cold boot)."""
    from xsession.hypervisor.qemu import QemuBackend
    t0 = time.monotonic()
    guest = QemuBackend().cold_boot(flavour, manifest, rundir)
    t = time.monotonic() - t0
    guest.stop()
    return t


def record(title: str, table: str) -> None:
    with open(REPO / "bench" / "RESULTS.md", "a") as out:
        out.write(f"\n## {title} ({time.strftime('%Y-%m-%d')})\n\n{table}\n")


def publish(title: str, lines: list[str], keep: bool) -> None:
    """Print a benchmark's table; with ``keep`` (``--record``) append it to bench/RESULTS.md too."""
    table = "\n".join(lines)
    print("\n" + table)
    if keep:
        record(title, table)
