"""Memory shared between sessions: the host merges identical pages (KSM).

Flavours built from the same distribution hold the same kernel and libraries,
and a guest started with ``init_on_free`` keeps many pages of zeros. QEMU marks
guest RAM mergeable (``mem-merge``, on by default), so once the host kernel's
same-page merging runs, identical pages are stored once.

Merged memory is *measured*, never promised: any write to a merged page gives
the guest its own copy again. The memory plan therefore shows what is merged
(``shared_mib``) but never counts it as room for another session; only caches
that give way on demand (preloaded statefiles) live off what merging frees.

:func:`decide` is the pure part; :class:`Ksm` reads and sets the kernel's knobs
in sysfs, and puts back what it found when the manager stops, as a service that
changes a machine-wide setting should.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SharePolicy", "SharingDecision", "SharingStats", "decide", "Ksm", "KSM_DIR", "SCAN", "process_merged_bytes"]

log = logging.getLogger(__name__)

KSM_DIR = Path("/sys/kernel/mm/ksm")

#: How hard ksmd scans while sessions run: 4096 pages (16 MiB) every 50 ms
#: merges 1 GiB of guests in a few seconds of one core's time and then costs
#: little (each page is only re-checked when its checksum changes).
SCAN = {"pages_to_scan": 4096, "sleep_millisecs": 50, "use_zero_pages": 1}


class SharePolicy:
    """Values of the ``xenubuntu.share`` boot option."""

    AUTO = "auto"
    OFF = "off"
    ALL = (AUTO, OFF)


@dataclass(frozen=True)
class SharingDecision:
    enabled: bool
    reason: str


def decide(policy: str, backend: str, ksm_available: bool) -> SharingDecision:
    """Whether the manager lets the host merge the sessions' pages, and why (pure).

    >>> decide("auto", "qemu", True).enabled
    True
    >>> decide("auto", "xen", True).reason
    "Xen guests' memory is the hypervisor's, not dom0's: KSM cannot merge it"
    """
    if policy == SharePolicy.OFF:
        return SharingDecision(False, "xenubuntu.share=off")
    if backend != "qemu":
        return SharingDecision(False, "Xen guests' memory is the hypervisor's, not dom0's: KSM cannot merge it")
    if not ksm_available:
        return SharingDecision(False, "this kernel has no same-page merging (no /sys/kernel/mm/ksm)")
    return SharingDecision(True, "identical pages of the sessions are merged (KSM)")


@dataclass(frozen=True)
class SharingStats:
    """What the host has merged, from KSM's counters (pages of ``page_size`` bytes)."""

    #: pages that stand for many (one copy each)
    pages_shared: int = 0
    #: pages that point at one of those (the memory saved)
    pages_sharing: int = 0
    #: pages of zeros mapped to the kernel's zero page (``use_zero_pages``)
    zero_pages: int = 0
    page_size: int = 4096

    @property
    def saved_mib(self) -> int:
        return (self.pages_sharing + self.zero_pages) * self.page_size >> 20


class Ksm:
    """The host kernel's same-page merging, through sysfs (root only)."""

    def __init__(self, root: Path = KSM_DIR):
        self.root = root
        self._before: dict[str, str] | None = None

    def available(self) -> bool:
        return (self.root / "run").is_file()

    def _read(self, name: str) -> str:
        return (self.root / name).read_text().strip()

    def _write(self, name: str, value: str) -> None:
        (self.root / name).write_text(value)

    def enable(self, settings: dict[str, int] | None = None) -> None:
        """Start merging with ``settings`` (default :data:`SCAN`); remembers what was set.

        :raises OSError: the knobs cannot be written (not root, or no KSM).
        """
        wanted = {**SCAN, **(settings or {})}
        names = ["run", *wanted]
        present = [n for n in names if (self.root / n).is_file()]
        before = {n: self._read(n) for n in present}
        if self._before is None:
            self._before = before
        for name, value in wanted.items():
            if name in present:
                self._write(name, str(value))
        self._write("run", "1")
        log.info("same-page merging on (%s)", ", ".join(f"{k}={v}" for k, v in wanted.items()))

    def restore(self) -> None:
        """Put the knobs back as :meth:`enable` found them; already-merged pages stay merged
        (``run=0`` stops merging, it does not undo it). Best effort: logged, never raised."""
        before, self._before = self._before, None
        if before is None:
            return
        for name, value in before.items():
            try:
                self._write(name, value)
            except OSError as e:
                log.warning("could not put back %s=%s: %s", name, value, e)

    def stats(self) -> SharingStats:
        """The counters now; all zero where KSM is missing or unreadable."""
        try:
            zero = int(self._read("ksm_zero_pages")) if (self.root / "ksm_zero_pages").is_file() else 0
            return SharingStats(int(self._read("pages_shared")), int(self._read("pages_sharing")), zero,
                                os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            return SharingStats()


def process_merged_bytes(pid: int) -> int:
    """How much of one process's memory is merged (KSM pages and zero pages), from
    ``/proc/PID/ksm_stat`` (Linux 6.1 and later); 0 where it cannot be read."""
    try:
        text = Path(f"/proc/{pid}/ksm_stat").read_text()
    except OSError:
        return 0
    fields = dict(line.split(None, 1) for line in text.splitlines() if " " in line)
    pages = 0
    for key in ("ksm_merging_pages", "ksm_zero_pages"):
        try:
            pages += int(fields.get(key, "0"))
        except ValueError:
            pass
    return pages * os.sysconf("SC_PAGE_SIZE")
