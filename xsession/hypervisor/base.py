"""The interface every hypervisor backend implements.

The engine knows guests only through :class:`Guest` and :class:`Backend`;
backends know nothing of sessions, scheduling or D-Bus. Every blocking call
runs under a watchdog and raises an :mod:`xsession.errors` error on failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..manifest import Flavour, Manifest, StatePart
from ..screen import Picture, thumbnail, to_png

__all__ = ["Progress", "ExitCallback", "Guest", "Backend", "HostMemory", "PICTURE_INTERVAL_S", "ScreenCache"]

#: called with (bytes done, bytes total) while a statefile is fed
Progress = Callable[[int, int], None]
#: called once, from any thread, when a guest ends without being asked to: the reason
ExitCallback = Callable[[str], None]
#: a front-end's live picture of a guest is taken anew at most this often
PICTURE_INTERVAL_S = 1.0


class ScreenCache:
    """A guest's screen as a PNG for front-ends: taken anew at most every
    :data:`PICTURE_INTERVAL_S` (they may ask often; taking one costs the guest a frame),
    one kept whatever widths callers ask for."""

    def __init__(self, take: Callable[[], Picture]):
        self._take = take
        self._last: tuple[float, Picture | None] = (0.0, None)

    def png(self, max_width: int = 0) -> bytes:
        """At most ``max_width`` wide (0: full size). Raises what ``take`` raises."""
        now = time.monotonic()
        taken, picture = self._last
        if picture is None or now - taken >= PICTURE_INTERVAL_S:
            picture = self._take()
            self._last = (now, picture)
        return to_png(thumbnail(picture, max_width) if max_width else picture)


@dataclass(frozen=True)
class HostMemory:
    """The host's memory as the hypervisor accounts it, in MiB."""

    total_mib: int
    free_mib: int


class Guest(Protocol):
    """A running (or paused) VM of one flavour."""

    name: str

    @property
    def pid(self) -> int | None: ...

    @property
    def console(self) -> dict[str, str]:
        """How to reach the guest: ``vnc`` (``unix:PATH`` or ``HOST:PORT``), ``serial`` (socket path)."""
        ...

    def is_alive(self) -> bool: ...

    def status(self) -> str:
        """The hypervisor's view: ``running``, ``paused``, or another word of its own."""
        ...

    def on_exit(self, callback: ExitCallback) -> None:
        """Call ``callback(reason)`` when the guest dies, resets or shuts down by itself."""
        ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None:
        """End the guest; idempotent. Does not call the exit callback."""
        ...


class Backend(Protocol):
    name: str

    def restore(self, flavour: Flavour, manifest: Manifest, rundir: Path, progress: Progress,
                sources: Sequence[Path] | None = None) -> Guest:
        """Bring the flavour's statefile back to a running guest.

        ``sources``: read :meth:`preload_parts` from there (copies preloaded into RAM, in
        that order) instead of the medium; each is checked exactly as the medium's would be.

        :raises StatefileCorrupt: the statefile failed a size, sha256 or decompression check.
        :raises MediumUnavailable: the statefile or disk cannot be read.
        :raises HypervisorError: the hypervisor refused or died; includes its own words.
        """
        ...

    def preload_parts(self, flavour: Flavour) -> tuple[StatePart, ...]:
        """The files a restore of ``flavour`` reads, which a preload copies into RAM."""
        ...

    def cold_boot(self, flavour: Flavour, manifest: Manifest, rundir: Path) -> Guest:
        """Boot the flavour from its kernel and initrd; returns once it printed its ready line."""
        ...

    def adopt(self, name: str, rundir: Path) -> Guest | None:
        """Reattach to a guest that a previous manager left running in ``rundir``."""
        ...

    def host_memory(self) -> HostMemory: ...

    def abort(self) -> None:
        """End every restore and cold boot in flight: each stops its guest and raises
        :class:`~xsession.errors.HypervisorError` soon, not at its watchdog."""
        ...

    def overhead_mib(self, flavour: Flavour) -> int:
        """Memory the hypervisor needs per guest beyond the guest's own RAM."""
        ...

    def in_dom0_mib(self, flavour: Flavour) -> int:
        """The part of :meth:`overhead_mib` that lives in dom0's own memory (Xen's device
        model); dom0 keeps it when it balloons down. 0 where dom0 is the host itself."""
        ...
