"""The memory planner: which sessions fit, in which order, and why.

Pure: no I/O, no udev, no GLib, no subprocess. The engine calls :func:`plan`
before each restore and applies the :class:`Plan` it returns; a request for one
flavour is checked with :func:`check_request`, which raises
:class:`~xsession.errors.NotEnoughMemory` naming what it needs, what is free
and which running sessions could be stopped to make room.

The arithmetic is the same in every plan and every sentence it writes::

    available = total - reserve - running - sum(need of every NOW decision)
    need      = flavour memory + hypervisor overhead per guest

Verdicts:

- ``NOW``: restore at once; its memory is counted as committed.
- ``LATER``: fits on this machine, but not now. With ``background`` set the
  scheduler may start it by itself when idle (it fits in what is left after
  the NOW decisions and the earlier background ones); without it, it waits
  for a request and may need other sessions stopped first.
- ``NEVER``: does not fit even alone on this machine, with nothing else running.

With ``lazy``, a default that can never fit on this machine is replaced, for
the restore at boot, by the first flavour in priority order that fits now, so
the person gets a session rather than none; a note says so.

>>> from xsession.hypervisor.base import HostMemory
>>> from xsession.bootopts import BootOptions
>>> class F:  # anything with name, priority and memory_mib
...     def __init__(self, name, priority, memory_mib):
...         self.name, self.priority, self.memory_mib = name, priority, memory_mib
>>> p = plan(HostMemory(2048, 1800), [F("kubuntu", 1, 256), F("server", 4, 192)],
...          BootOptions(flavour="kubuntu", reserve_mib=512), overhead=64)
>>> [(d.name, d.verdict.value, d.need_mib) for d in p.decisions]
[('kubuntu', 'now', 320), ('server', 'later', 256)]
>>> p.available_mib
1216
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, Union

from .bootopts import BootOptions, RestorePolicy
from .errors import NoSuchFlavour, NotEnoughMemory
from .hypervisor.base import HostMemory

__all__ = [
    "Verdict",
    "Decision",
    "Plan",
    "plan",
    "check_request",
    "explain",
    "fit_check",
    "compute_reserve",
    "RESERVE_BASE_MIB",
    "RESERVE_RAM_DIVISOR",
    "RESERVE_MAX_MIB",
]

# dom0's own needs when no xenubuntu.reserve is given:
#   reserve = RESERVE_BASE_MIB + total / RESERVE_RAM_DIVISOR, at most RESERVE_MAX_MIB
#
# RESERVE_BASE_MIB: a live system without a desktop (kernel, udev, D-Bus,
# journald, this manager in Python, the squashfs metadata cache) runs in about
# 200 MiB; the writable overlay of a live system is a tmpfs and grows with logs
# and the sessions' qcow2 overlays' metadata, so 384 MiB leaves room to grow.
RESERVE_BASE_MIB = 384
# The kernel's per-page bookkeeping (struct page: 64 bytes per 4 KiB page, 1.6%)
# plus page tables and slab that grow with RAM: 1/32 (3.1%) of the total.
RESERVE_RAM_DIVISOR = 32
# Beyond 1 GiB dom0 gains nothing that a session would not use better.
RESERVE_MAX_MIB = 1024

BACKENDS = ("qemu", "xen")


class FlavourLike(Protocol):
    """What the planner reads of a flavour (:class:`xsession.manifest.Flavour` fits)."""

    @property
    def name(self) -> str: ...

    @property
    def priority(self) -> int: ...

    @property
    def memory_mib(self) -> int: ...


#: the hypervisor's per-guest overhead: a function of the flavour (``Backend.overhead_mib``),
#: one figure for all, or a figure per flavour name (missing names count 0)
Overhead = Union[Callable[[FlavourLike], int], int, Mapping[str, int]]


class Verdict(enum.Enum):
    NOW = "now"
    LATER = "later"
    NEVER = "never"


@dataclass(frozen=True)
class Decision:
    """One flavour's fate in a plan, with the numbers that decided it.

    ``free_before_mib`` is what was available when this flavour's turn came;
    a NOW decision leaves ``free_before_mib - need_mib`` to the next one.
    """

    name: str
    priority: int
    memory_mib: int
    overhead_mib: int
    verdict: Verdict
    background: bool
    free_before_mib: int
    reason: str

    @property
    def need_mib(self) -> int:
        return self.memory_mib + self.overhead_mib

    def as_dict(self) -> dict[str, str | int | bool]:
        return {
            "name": self.name,
            "priority": self.priority,
            "memory_mib": self.memory_mib,
            "overhead_mib": self.overhead_mib,
            "need_mib": self.need_mib,
            "verdict": self.verdict.value,
            "background": self.background,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Plan:
    """What to restore now, what later, what never; and how the memory adds up.

    ``available_mib == total_mib - reserve_mib - running_mib - now_mib`` always
    holds; ``committed_mib`` is ``running_mib + now_mib``. ``balloon_target_mib``
    is set only on Xen, when dom0 must give memory back before the NOW
    decisions fit in what the hypervisor has free: the engine sets dom0's
    target to it (``xl mem-set 0``) before restoring.
    """

    backend: str
    policy: RestorePolicy
    default: str | None
    total_mib: int
    host_free_mib: int
    reserve_mib: int
    reserve_source: str
    running: tuple[tuple[str, int], ...]
    decisions: tuple[Decision, ...]
    balloon_target_mib: int | None = None
    notes: tuple[str, ...] = field(default=())
    #: every offered flavour's priority, running ones included (for choosing what to stop)
    priorities: tuple[tuple[str, int], ...] = field(default=())
    #: memory the host has merged between the sessions' pages (KSM), as measured: shown,
    #: never counted in ``available_mib``, since any write to a merged page un-merges it
    shared_mib: int = 0
    #: on Xen, the part of each flavour's overhead that lives in dom0 (Xen's device model
    #: for its screen and channel), by name: dom0 keeps it when it balloons down
    in_dom0: tuple[tuple[str, int], ...] = field(default=())

    def in_dom0_mib(self, names: Iterable[str]) -> int:
        """What the named sessions hold in dom0's own memory (their device models)."""
        parts = dict(self.in_dom0)
        return sum(parts.get(n, 0) for n in names)

    def dom0_target(self, now: Iterable[str]) -> int:
        """dom0's balloon target once the ``now`` sessions run beside the running ones:
        total - what those sessions take from the hypervisor (their need, less what of it
        lives in dom0), so that dom0 keeps its reserve and the sessions' device models."""
        now = list(now)
        running = [n for n, _ in self.running]
        needs = sum(self.decision(n).need_mib for n in now)
        return self.total_mib - (self.running_mib - self.in_dom0_mib(running)) - (needs - self.in_dom0_mib(now))

    @property
    def running_mib(self) -> int:
        return sum(mib for _, mib in self.running)

    @property
    def now_mib(self) -> int:
        return sum(d.need_mib for d in self.decisions if d.verdict is Verdict.NOW)

    @property
    def committed_mib(self) -> int:
        return self.running_mib + self.now_mib

    @property
    def headroom_mib(self) -> int:
        """Memory for sessions before any NOW decision: total - reserve - running."""
        return self.total_mib - self.reserve_mib - self.running_mib

    @property
    def available_mib(self) -> int:
        return self.headroom_mib - self.now_mib

    @property
    def capacity_mib(self) -> int:
        """Memory for sessions on this machine with nothing running: total - reserve."""
        return self.total_mib - self.reserve_mib

    def names(self, verdict: Verdict) -> tuple[str, ...]:
        return tuple(d.name for d in self.decisions if d.verdict is verdict)

    @property
    def now(self) -> tuple[str, ...]:
        return self.names(Verdict.NOW)

    @property
    def later(self) -> tuple[str, ...]:
        return self.names(Verdict.LATER)

    @property
    def never(self) -> tuple[str, ...]:
        return self.names(Verdict.NEVER)

    @property
    def background(self) -> tuple[str, ...]:
        """LATER flavours the scheduler may restore by itself, in this order."""
        return tuple(d.name for d in self.decisions if d.verdict is Verdict.LATER and d.background)

    def decision(self, name: str) -> Decision:
        """:raises NoSuchFlavour: the plan has no decision for ``name``."""
        for d in self.decisions:
            if d.name == name:
                return d
        raise NoSuchFlavour(name, [d.name for d in self.decisions])

    def as_dict(self) -> dict[str, str | int | bool | list[str]]:
        """Plain values for the D-Bus ``Memory`` property (a{sv})."""
        out: dict[str, str | int | bool | list[str]] = {
            "backend": self.backend,
            "policy": self.policy.value,
            "default": self.default or "",
            "total_mib": self.total_mib,
            "host_free_mib": self.host_free_mib,
            "reserve_mib": self.reserve_mib,
            "reserve_source": self.reserve_source,
            "running_mib": self.running_mib,
            "committed_mib": self.committed_mib,
            "available_mib": self.available_mib,
            "now": list(self.now),
            "later": list(self.later),
            "never": list(self.never),
            "background": list(self.background),
            "balloon": self.balloon_target_mib is not None,
            "balloon_target_mib": self.balloon_target_mib if self.balloon_target_mib is not None else 0,
            "shared_mib": self.shared_mib,
        }
        return out


def compute_reserve(total_mib: int) -> int:
    """dom0's reserve when the boot options name none (see the constants above)."""
    reserve = min(RESERVE_BASE_MIB + max(total_mib, 0) // RESERVE_RAM_DIVISOR, RESERVE_MAX_MIB)
    return max(0, min(reserve, total_mib))


def _overhead_of(overhead: Overhead, flavour: FlavourLike) -> int:
    if isinstance(overhead, int):
        value = overhead
    elif isinstance(overhead, Mapping):
        value = int(overhead.get(flavour.name, 0))
    else:
        value = int(overhead(flavour))
    if value < 0:
        raise ValueError(f"overhead for {flavour.name} is negative: {value}")
    return value


def _host_memory(memory: object) -> HostMemory:
    if isinstance(memory, HostMemory):
        return memory
    host = getattr(memory, "host_memory", None)  # a HardwareProfile, without importing pyudev
    if isinstance(host, HostMemory):
        return host
    raise TypeError(f"expected HostMemory or HardwareProfile, not {type(memory).__name__}")


def _ordered(flavours: Iterable[FlavourLike], default: str | None) -> list[FlavourLike]:
    """Priority order (stable: ties keep the caller's order), the default first."""
    ordered = sorted(flavours, key=lambda f: f.priority)
    for i, f in enumerate(ordered):
        if f.name == default:
            ordered.insert(0, ordered.pop(i))
            break
    return ordered


def plan(
    memory: HostMemory | object,
    flavours: Sequence[FlavourLike],
    options: BootOptions,
    running: Mapping[str, int] | None = None,
    overhead: Overhead = 0,
    backend: str = "qemu",
    shared_mib: int = 0,
    in_dom0: Overhead = 0,
) -> Plan:
    """Decide what to restore now, later and never.

    :param memory: the host's memory as the backend accounts it (on Xen the
        hypervisor's total and free), or a ``HardwareProfile``.
    :param flavours: the flavours on offer (already restricted by
        ``xenubuntu.sessions``), in any order; priority decides.
    :param options: the default (``flavour``), the policy and ``reserve_mib``.
    :param running: MiB each running (or restoring) session holds, by name;
        those flavours get no decision.
    :param overhead: per-guest memory beyond the guest's RAM
        (``Backend.overhead_mib``), a figure, or figures by name.
    :param backend: ``qemu`` or ``xen``; only Xen gets a dom0 balloon target.
    :param shared_mib: what the host has merged between sessions (measured); reported only.
    :param in_dom0: on Xen, the part of ``overhead`` that lives in dom0's own memory (Xen's
        device model: ``Backend.in_dom0_mib``); dom0 keeps it when it balloons down.
    :raises ValueError: an unknown backend, a negative size, or two flavours with one name.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    host = _host_memory(memory)
    if host.total_mib < 0 or host.free_mib < 0:
        raise ValueError(f"host memory cannot be negative: {host}")
    running = dict(running or {})
    if any(mib < 0 for mib in running.values()):
        raise ValueError(f"running sessions cannot hold negative memory: {running}")
    names = [f.name for f in flavours]
    if len(set(names)) != len(names):
        raise ValueError(f"flavour names repeat: {names}")

    notes: list[str] = []
    if options.reserve_mib is not None:
        reserve, source = max(0, min(options.reserve_mib, host.total_mib)), "boot option"
        if reserve != options.reserve_mib:
            notes.append(f"xenubuntu.reserve={options.reserve_mib}M exceeds the {host.total_mib} MiB total; "
                         f"reserving {reserve} MiB")
    else:
        reserve, source = compute_reserve(host.total_mib), "computed"

    ordered = _ordered(flavours, options.flavour)
    default = options.flavour if options.flavour in names else (ordered[0].name if ordered else None)
    if ordered and default != ordered[0].name:
        ordered = _ordered(ordered, default)
    running_items = tuple(sorted(running.items()))
    running_mib = sum(running.values())
    capacity = host.total_mib - reserve
    free = capacity - running_mib
    if free < 0:
        notes.append(f"running sessions hold {running_mib} MiB, {-free} MiB more than the "
                     f"{capacity} MiB this machine has for sessions")
    default_waits = False
    stand_in = False  # lazy: the default can never fit, the first flavour that does takes its place
    background_free = None  # what is left for background restores once the NOW decisions are made

    decisions: list[Decision] = []
    for f in ordered:
        if f.name in running:
            continue
        ovh = _overhead_of(overhead, f)
        if f.memory_mib < 0:
            raise ValueError(f"flavour {f.name} has negative memory: {f.memory_mib}")
        need = f.memory_mib + ovh
        sizes = f"needs {need} MiB ({f.memory_mib} + {ovh} overhead)"
        is_default = f.name == default
        wants_now = options.restore is RestorePolicy.EAGER or (
            options.restore is RestorePolicy.LAZY and (is_default or stand_in))
        before = free
        if need > capacity:
            verdict, bg = Verdict.NEVER, False
            reason = (f"{sizes}; this machine has {capacity} MiB for sessions "
                      f"({host.total_mib} total - {reserve} reserve)")
        elif wants_now and need <= free:
            verdict, bg = Verdict.NOW, False
            free -= need
            reason = f"{sizes}; {before} MiB free, {free} MiB left"
            if stand_in:
                stand_in = False
                reason += f"; in place of the default {default}, which cannot fit"
                notes.append(f"the default {default} cannot fit this machine; {f.name} is restored now instead")
        else:
            verdict = Verdict.LATER
            if background_free is None:
                background_free = free
            if (options.restore is RestorePolicy.LAZY and not is_default and not default_waits
                    and need <= background_free):
                bg = True
                background_free -= need
                reason = (f"{sizes}; restored when idle: {background_free + need} MiB left after the ones "
                          f"before it, {background_free} after")
            else:
                bg = False
                why = "restore=off, waits for a request" if options.restore is RestorePolicy.OFF else (
                    f"{before} MiB free now; waits for a request or for sessions to stop")
                reason = f"{sizes}; fits the {capacity} MiB for sessions; {why}"
        decisions.append(Decision(f.name, f.priority, f.memory_mib, ovh, verdict, bg, before, reason))
        if verdict is Verdict.NOW and background_free is not None:
            background_free -= need
        if is_default and verdict is Verdict.LATER:
            # background restores would take the memory the default waits for
            default_waits = True
        if is_default and verdict is Verdict.NEVER and options.restore is RestorePolicy.LAZY:
            stand_in = True

    parts = tuple((f.name, _overhead_of(in_dom0, f)) for f in ordered)
    result = Plan(
        backend=backend,
        policy=options.restore,
        default=default,
        total_mib=host.total_mib,
        host_free_mib=host.free_mib,
        reserve_mib=reserve,
        reserve_source=source,
        running=running_items,
        decisions=tuple(decisions),
        notes=tuple(notes),
        priorities=tuple((f.name, f.priority) for f in ordered),
        shared_mib=max(0, shared_mib),
        in_dom0=parts,
    )
    # what the sessions restored now take from the hypervisor (their need less their part in dom0)
    from_hypervisor = result.now_mib - result.in_dom0_mib(result.now)
    if backend != "xen" or from_hypervisor <= host.free_mib:
        return result
    balloon = result.dom0_target(result.now)
    return dataclasses.replace(result, balloon_target_mib=balloon, notes=result.notes + (
        f"dom0 balloons down to {balloon} MiB: the hypervisor has {host.free_mib} MiB free "
        f"and the sessions to restore now need {from_hypervisor} MiB of it",))


def check_request(plan: Plan, name: str) -> None:
    """Refuse an explicit request that does not fit; return if it does.

    A flavour that is running, or that the plan restores now, fits. Otherwise it
    fits if its need is at most what the plan leaves available.

    :raises NoSuchFlavour: the plan knows no such flavour.
    :raises NotEnoughMemory: with the need, what is free, and the running
        sessions (lowest priority first) whose stopping would make room; none
        when even stopping all of them would not.
    """
    if name in dict(plan.running):
        return
    d = plan.decision(name)
    if d.verdict is Verdict.NOW or d.need_mib <= plan.available_mib:
        return
    free = max(plan.available_mib, 0)
    could_stop: list[str] = []
    if d.verdict is not Verdict.NEVER:
        priorities = dict(plan.priorities)
        # the default last (a person is likely using it), then the lowest priority
        # (largest number) first; among equals the largest first
        victims = sorted(plan.running, key=lambda r: (r[0] == plan.default, -priorities.get(r[0], 1 << 30),
                                                      -r[1], r[0]))
        gained = plan.available_mib
        for victim, mib in victims:
            if gained >= d.need_mib:
                break
            could_stop.append(victim)
            gained += mib
        if gained < d.need_mib:
            could_stop = []
    raise NotEnoughMemory(name, d.need_mib, free, could_stop)


def balloon_target_for(plan: Plan, name: str) -> int | None:
    """On Xen, dom0's new target so that ``name`` can be restored now; None if the
    hypervisor already has the room (or on QEMU, where dom0 is the host itself).

    dom0 gives up what the hypervisor lacks, keeping its reserve and the device models
    of the running sessions and of this one (:meth:`Plan.dom0_target`).
    """
    if plan.backend != "xen":
        return None
    need = plan.decision(name).need_mib - plan.in_dom0_mib([name])
    if need <= plan.host_free_mib:
        return None
    return plan.dom0_target([name])


def fit_check(
    memory: Callable[[], HostMemory | object],
    flavours: Sequence[FlavourLike],
    options: BootOptions,
    overhead: Overhead = 0,
    backend: str = "qemu",
    balloon: Callable[[int], None] | None = None,
    in_dom0: Overhead = 0,
) -> Callable[[FlavourLike, Mapping[str, int]], None]:
    """The engine's ``fit_check(flavour, running)`` hook, backed by the planner.

    Each call plans afresh from ``memory()`` (``Backend.host_memory``, or a
    fresh ``HardwareProfile``) and the sessions that hold memory, then applies
    :func:`check_request`. On Xen, when the flavour fits only once dom0 gives
    memory back, ``balloon(target_mib)`` is called before the restore starts:
    ballooning is the planner's decision, carried out by the backend.

    :raises NotEnoughMemory: (from the returned function) the flavour does not fit now.
    """
    def check(flavour: FlavourLike, running: Mapping[str, int]) -> None:
        p = plan(memory(), flavours, options, running, overhead, backend, in_dom0=in_dom0)
        check_request(p, flavour.name)
        if balloon is not None:
            target = balloon_target_for(p, flavour.name)
            if target is not None:
                balloon(target)

    return check


def explain(plan: Plan) -> str:
    """A table of the plan with every number it used; the sums are written out."""
    lines = [
        f"backend {plan.backend}, restore={plan.policy.value}, default {plan.default or '-'}",
        f"total {plan.total_mib} MiB, dom0 reserve {plan.reserve_mib} MiB ({plan.reserve_source}), "
        f"running {plan.running_mib} MiB"
        + (" (" + ", ".join(f"{n} {m}" for n, m in plan.running) + ")" if plan.running else ""),
        "",
    ]
    rows = [("flavour", "prio", "memory", "overhead", "need", "free before", "verdict", "reason")]
    for d in plan.decisions:
        verdict = d.verdict.value + (" (background)" if d.background else "")
        rows.append((d.name, str(d.priority), str(d.memory_mib), str(d.overhead_mib), str(d.need_mib),
                     str(d.free_before_mib), verdict, d.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 or i >= 6 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=False))) + "  " + r[-1])
    now = [d.need_mib for d in plan.decisions if d.verdict is Verdict.NOW]
    lines += [
        "",
        f"available = {plan.total_mib} total - {plan.reserve_mib} reserve - {plan.running_mib} running - "
        f"{plan.now_mib} now ({' + '.join(map(str, now)) or '0'}) = {plan.available_mib} MiB",
        f"committed = {plan.running_mib} running + {plan.now_mib} now = {plan.committed_mib} MiB",
    ]
    if plan.balloon_target_mib is not None:
        lines.append(f"dom0 balloon target {plan.balloon_target_mib} MiB "
                     f"(hypervisor free {plan.host_free_mib} MiB)")
    held = [(n, m) for n, m in plan.in_dom0 if m]
    if held and plan.backend == "xen":
        lines.append("in dom0 (device models, part of the overhead): "
                     + ", ".join(f"{n} {m} MiB" for n, m in held))
    if plan.shared_mib:
        lines.append(f"shared {plan.shared_mib} MiB: pages the host merged between sessions (measured; not "
                     f"counted as available, a write un-merges a page)")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines) + "\n"
