"""The restore scheduler's decisions, as pure functions (no threads, no I/O).

* The default flavour first, then priority order (lower number first, then name).
* ``eager`` queues everything at start; ``lazy`` queues the default, the rest
  one at a time when the manager is idle; ``off`` queues nothing.
* An explicit request jumps the queue (behind earlier explicit requests).
* A slow or seek-bound medium (optical, USB 2) reads one statefile at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .bootopts import RestorePolicy
from .manifest import Flavour

__all__ = ["priority_order", "initial_queue", "enqueue_request", "parallel_restores",
           "QueueEntry"]


@dataclass(frozen=True)
class QueueEntry:
    name: str
    requested: bool  # asked for explicitly (a person or a front-end), not by policy


def priority_order(flavours: Iterable[Flavour], default: str) -> list[str]:
    """Names in restore order: the default first, then by priority, ties by name."""
    return [f.name for f in sorted(flavours, key=lambda f: (f.name != default, f.priority, f.name))]


def initial_queue(flavours: Sequence[Flavour], default: str, policy: RestorePolicy) -> list[QueueEntry]:
    order = priority_order(flavours, default)
    if policy is RestorePolicy.EAGER:
        return [QueueEntry(n, False) for n in order]
    if policy is RestorePolicy.LAZY:
        return [QueueEntry(default, False)] if default in order else []
    return []


def enqueue_request(queue: Sequence[QueueEntry], name: str) -> list[QueueEntry]:
    """The queue with ``name`` moved (or added) behind the other explicit requests."""
    rest = [e for e in queue if e.name != name]
    cut = 0
    while cut < len(rest) and rest[cut].requested:
        cut += 1
    return rest[:cut] + [QueueEntry(name, True)] + rest[cut:]


def parallel_restores(medium_speed: str, cpus: int) -> int:
    """How many restores may read the medium at once.

    An optical drive or USB 2 stick is seek-bound: two readers make both slower
    than one after the other. A fast medium allows one restore per two CPUs
    (decompression and QEMU's load each keep a core busy), at least one.
    """
    if medium_speed != "fast":
        return 1
    return max(1, cpus // 2)
