"""The timing model of a slow medium: pure functions and one small state machine.

A read costs ``length / rate``. A read that does not start where the previous
one ended costs a seek on top, unless it starts a little further on (a forward
gap of at most ``gap`` bytes): a drive reads through such a gap at its
sequential rate rather than moving the head, so the gap costs ``gap / rate``.
The first read after the medium is opened starts from offset 0 (the head's
resting place), so a read from the start is no seek. A drive also keeps what it
read since its last seek (up to ``buffer`` bytes): a read of those bytes again
(the kernel re-reading a superblock, requests a little out of order) is served
from that cache, costs nothing and leaves the head where it was.

:func:`sequence_cost` is the whole model for a list of reads issued back to
back. :class:`Drive` adds arrival times, for the server that serves a real
reader: the drive is busy until its last request is done, and when it sits
idle after a sequential read it goes on reading ahead into its buffer (as
optical drives and USB sticks do), so a reader that comes back a moment later
for the next bytes does not pay again for its own think time. Requests issued
back to back cost exactly what :func:`sequence_cost` says.

Nothing here sleeps, reads a clock or touches a file: time is passed in.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import astuple, dataclass, field, replace

__all__ = ["MiB", "Profile", "PROFILES", "profile", "Step", "step", "Head", "Stats", "sequence_cost", "Drive",
           "STATS_SIZE", "pack_stats", "unpack_stats"]

MiB = 1 << 20


@dataclass(frozen=True)
class Profile:
    """How a kind of medium reads.

    :param rate: sequential rate, bytes per second (``math.inf``: no limit).
    :param seek: seconds added to a read that is not (nearly) contiguous with the previous one.
    :param gap: forward gaps up to this many bytes are read through at ``rate`` instead of seeking.
    :param buffer: bytes the drive reads ahead while idle after a sequential read.
    """

    name: str
    rate: float
    seek: float
    gap: int
    buffer: int

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"profile {self.name}: rate must be > 0, got {self.rate}")
        if self.seek < 0 or self.gap < 0 or self.buffer < 0:
            raise ValueError(f"profile {self.name}: seek, gap and buffer must be >= 0")

    @property
    def throttled(self) -> bool:
        return math.isfinite(self.rate) or self.seek > 0

    def physical_limit(self, nbytes: int) -> float:
        """Seconds the medium needs at best to deliver ``nbytes``: one sequential pass."""
        return nbytes / self.rate

    def args(self) -> list[str]:
        """The profile as nbdkit ``key=value`` parameters of the plugin."""
        return [f"rate={self.rate!r}", f"seek={self.seek!r}", f"gap={self.gap}", f"buffer={self.buffer}"]


#: an optical drive (DVD, ~16x): 20 MB/s, 100 ms per seek, reads through gaps up to 1 MiB
#: (a seek costs as much as reading 2 MB) and keeps a 2 MiB read-ahead buffer
DVD = Profile("dvd", rate=20e6, seek=0.100, gap=1 * MiB, buffer=2 * MiB)
#: a USB 2 stick: ~30 MB/s over a 480 Mbit/s link, ~1 ms per random read; reading through
#: 32 KiB costs about that much
USB2 = Profile("usb2", rate=30e6, seek=0.001, gap=32 << 10, buffer=512 << 10)
#: no throttling: what the serving stack itself delivers, for comparison; seeks are
#: counted (free) as on a DVD, so the counters compare
FAST = Profile("fast", rate=math.inf, seek=0.0, gap=DVD.gap, buffer=DVD.buffer)
PROFILES = {p.name: p for p in (DVD, USB2, FAST)}


def profile(name: str, **changes: float) -> Profile:
    """A named profile, some figures changed: ``profile("dvd", rate=10e6, seek=0.15)``.

    :raises KeyError: no such profile.
    """
    base = PROFILES[name]
    if "gap" in changes:
        changes["gap"] = int(changes["gap"])
    if "buffer" in changes:
        changes["buffer"] = int(changes["buffer"])
    return replace(base, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Step:
    """What one read cost: whether it seeked, the gap read through, the bytes served
    from the drive's cache, and seconds."""

    seek: bool
    gap: int
    hit: int
    seconds: float


def step(p: Profile, head: int, offset: int, length: int, cached: int = 0) -> Step:
    """The cost of reading ``length`` bytes at ``offset`` when the previous read ended at
    ``head`` and the drive still holds the ``cached`` bytes before ``head`` (data it read
    since its last seek, at most a buffer's worth): those are served without moving the head.
    """
    if length < 0 or offset < 0 or cached < 0:
        raise ValueError(f"bad read: offset {offset}, length {length}, cached {cached}")
    end = offset + length
    if head - cached <= offset < head:
        hit = min(end, head) - offset
        return Step(False, 0, hit, (length - hit) / p.rate)
    gap = offset - head
    if gap == 0:
        return Step(False, 0, 0, length / p.rate)
    if 0 < gap <= p.gap:
        return Step(False, gap, 0, (gap + length) / p.rate)
    return Step(True, 0, 0, p.seek + length / p.rate)


class Head:
    """Where the drive is: the end of the last read and the start of its current run."""

    __slots__ = ("pos", "run_start")

    def __init__(self, pos: int = 0) -> None:
        self.pos = pos
        self.run_start = pos

    def cached(self, p: Profile) -> int:
        return min(p.buffer, self.pos - self.run_start)

    def move(self, s: Step, offset: int, length: int) -> None:
        if s.seek:
            self.run_start = offset
        self.pos = max(self.pos, offset + length) if not s.seek else offset + length


@dataclass(frozen=True)
class Stats:
    """Counters of a medium: requests, bytes delivered, seeks, bytes read through in gaps,
    the model's time for them (issued back to back), and the time the server actually delayed."""

    reads: int = 0
    bytes: int = 0
    seeks: int = 0
    gap_bytes: int = 0
    hit_bytes: int = 0
    model_s: float = 0.0
    delay_s: float = 0.0

    @property
    def medium_bytes(self) -> int:
        """Bytes that passed under the head: delivered, less drive-cache hits, plus gaps read through."""
        return self.bytes - self.hit_bytes + self.gap_bytes

    def __add__(self, other: Stats) -> Stats:
        return Stats(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def __sub__(self, other: Stats) -> Stats:
        """What happened between two snapshots: ``after - before``."""
        return Stats(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))


def sequence_cost(p: Profile, reads: Iterable[tuple[int, int]], head: int = 0) -> Stats:
    """The model's counters for ``(offset, length)`` reads issued back to back from ``head``.

    Its ``model_s`` is ``medium_bytes / rate + seeks * seek``.
    """
    h = Head(head)
    reads_n = nbytes = seeks = gaps = hits = 0
    seconds = 0.0
    for offset, length in reads:
        s = step(p, h.pos, offset, length, h.cached(p))
        h.move(s, offset, length)
        reads_n += 1
        nbytes += length
        seeks += s.seek
        gaps += s.gap
        hits += s.hit
        seconds += s.seconds
    return Stats(reads_n, nbytes, seeks, gaps, hits, seconds, 0.0)


@dataclass
class Drive:
    """One drive serving requests as they arrive, one at a time.

    :meth:`request` takes a request and the time it arrived and returns when its
    data is delivered; the server holds the data back until then. While
    streaming, the drive reaches byte ``P`` at ``base + P / rate``: it reads on
    whether or not the reader has asked yet, until its buffer holds ``buffer``
    bytes the reader has not taken, then waits. So the reader's own time between
    requests (up to a buffer's worth) costs nothing, as with a real drive, and
    requests issued back to back take what :func:`sequence_cost` says. A seek
    starts when the request arrives. Counters in :attr:`stats`.
    """

    profile: Profile
    head: Head = field(default_factory=Head)
    #: the streaming timeline (None: not streaming yet)
    base: float | None = None
    #: when the previous request was delivered (None: none yet)
    done_at: float | None = None
    stats: Stats = field(default_factory=Stats)

    def request(self, offset: int, length: int, now: float) -> float:
        """Serve one read arriving at ``now``; the time its data is delivered (``>= now``)."""
        p = self.profile
        h = self.head
        s = step(p, h.pos, offset, length, h.cached(p))
        end = max(h.pos, offset + length) if not s.seek else offset + length
        if self.base is None or self.done_at is None or s.seek:
            done = (now if self.done_at is None else max(now, self.done_at)) + s.seconds
            base = done - end / p.rate
        else:
            # the drive stopped when its buffer was full: `buffer` bytes past what was last delivered
            base = max(self.base, self.done_at - (h.pos + p.buffer) / p.rate)
            done = max(now, base + end / p.rate)
        h.move(s, offset, length)
        self.base = base
        self.done_at = done
        self.stats = self.stats + Stats(1, length, int(s.seek), s.gap, s.hit, s.seconds, done - now)
        return done


# --- counters shared between the server and its caller: a small fixed-size record ------------

_STATS = struct.Struct("<8sQQQQQQdd")  # magic, sequence, reads, bytes, seeks, gap, hit bytes, model s, delay s
_MAGIC = b"MEDSIM02"
STATS_SIZE = _STATS.size


def pack_stats(stats: Stats, sequence: int) -> bytes:
    """The record the server keeps in a shared file; ``sequence`` counts the updates."""
    return _STATS.pack(_MAGIC, sequence, *astuple(stats))


def unpack_stats(data: bytes) -> tuple[Stats, int]:
    """:raises ValueError: not such a record."""
    if len(data) < STATS_SIZE:
        raise ValueError(f"stats record too short: {len(data)} bytes")
    magic, seq, *values = _STATS.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError("not a stats record")
    return Stats(*values), seq
