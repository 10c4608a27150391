"""Sessions, their state machine, and the restore scheduler that drives a backend.

A session is one flavour's VM. Its states (as README.md lists them)::

    available -> queued -> restoring -> running <-> paused
                              |            |          |
                              v            v          v
                           booting      stopped    stopped
    any -> failed (with a reason)

``restoring`` falls back to ``booting`` (a cold boot) when the statefile cannot
be used; the reason says why. Transitions come from :data:`TRANSITIONS` only.

Events (delivered to every subscriber, from whichever thread caused them):

* ``state-changed``  (session snapshot) on every state or reason change;
* ``progress``       (session snapshot) while restoring, at most every
  :data:`PROGRESS_INTERVAL_S` or each :data:`PROGRESS_STEP` of the total;
* ``warnings``       (None) when the manager's warnings changed.

The engine never imports the D-Bus layer; the daemon subscribes.
"""

from __future__ import annotations

import enum
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bootopts import BootOptions, RestorePolicy, check_flavours
from .errors import InvalidState, MediumUnavailable, NoSuchFlavour, NotEnoughMemory, XSessionError
from .hypervisor.base import Backend, Guest
from .manifest import Flavour, Manifest
from .preload import Preload
from . import scheduler

__all__ = ["State", "TRANSITIONS", "SessionView", "Engine", "EventCallback", "FitCheck", "GuestListener"]

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.1
#: a preload leaves at least this much memory free (MiB): sessions come first
PRELOAD_HEADROOM_MIB = 1024
PROGRESS_STEP = 0.02
#: written in a session's run folder once its guest runs: a restarted manager
#: adopts only guests that reached running (a restore cut short is redone)
RAN_MARKER = "ran"


class State(str, enum.Enum):
    AVAILABLE = "available"
    QUEUED = "queued"
    RESTORING = "restoring"
    BOOTING = "booting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    FAILED = "failed"


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.AVAILABLE: frozenset({S.QUEUED, S.RUNNING, S.PAUSED, S.FAILED}),   # running/paused: adopted
    S.QUEUED: frozenset({S.RESTORING, S.BOOTING, S.AVAILABLE, S.STOPPED, S.FAILED}),
    S.RESTORING: frozenset({S.RUNNING, S.BOOTING, S.FAILED}),
    S.BOOTING: frozenset({S.RUNNING, S.FAILED}),
    S.RUNNING: frozenset({S.PAUSED, S.STOPPED, S.FAILED}),
    S.PAUSED: frozenset({S.RUNNING, S.STOPPED, S.FAILED}),
    S.STOPPED: frozenset({S.QUEUED, S.FAILED}),
    S.FAILED: frozenset({S.QUEUED}),
}

#: which states each action may start from
ACTIONS: dict[str, frozenset[State]] = {
    "activate": frozenset(State),  # each state has its own meaning of "make it run"
    "pause": frozenset({S.RUNNING}),
    "resume": frozenset({S.PAUSED}),
    "stop": frozenset({S.QUEUED, S.RUNNING, S.PAUSED}),
    "reset": frozenset({S.RUNNING, S.PAUSED, S.STOPPED, S.FAILED, S.AVAILABLE}),
}


@dataclass(frozen=True)
class SessionView:
    """A consistent snapshot of one session, safe to hand to any thread."""

    name: str
    title: str
    state: State
    reason: str
    bytes_done: int
    bytes_total: int
    priority: int
    memory_mib: int
    console: dict[str, str]
    last_change: float
    origin: str  # "", "restored", "cold-booted", "adopted"
    description: str = ""
    source: str = ""
    heartbeat_seq: int = 0
    heartbeat_at: float = 0.0
    #: what its restore reads is in RAM (the statefile, or a lazy restore's RAM image and devices' state)
    preloaded: bool = False

    @property
    def progress(self) -> float:
        if self.state is S.RUNNING or self.state is S.PAUSED:
            return 1.0
        return self.bytes_done / self.bytes_total if self.bytes_total else 0.0


@dataclass
class _Session:
    flavour: Flavour
    state: State = S.AVAILABLE
    reason: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    last_change: float = field(default_factory=time.time)
    guest: Guest | None = None
    origin: str = ""
    held: bool = False          # a person stopped it: policy leaves it alone
    busy: bool = False          # its guest is being stopped: no new guest until it is gone
    retry_on_medium: bool = False
    last_emit: float = 0.0
    last_emit_fraction: float = 0.0
    preloaded: bool = False

    def view(self) -> SessionView:
        channel = getattr(self.guest, "channel", None)
        return SessionView(
            name=self.flavour.name, title=self.flavour.title, state=self.state, reason=self.reason,
            bytes_done=self.bytes_done, bytes_total=self.bytes_total, priority=self.flavour.priority,
            memory_mib=self.flavour.memory_mib, console=dict(self.guest.console) if self.guest else {},
            last_change=self.last_change, origin=self.origin, description=self.flavour.description,
            source=self.flavour.source, heartbeat_seq=channel.last_seq if channel is not None else 0,
            heartbeat_at=channel.last_at if channel is not None else 0.0, preloaded=self.preloaded)


def _mark_ran(rundir: Path) -> None:
    try:
        (rundir / RAN_MARKER).touch()
    except OSError as e:  # only adoption after a crash depends on it
        log.warning("cannot mark %s as running: %s", rundir, e)


EventCallback = Callable[[str, SessionView | None], None]
#: (flavour, sessions that run) -> None, or raise NotEnoughMemory
FitCheck = Callable[[Flavour, dict[str, int]], None]
#: (session, message) -> None, or raise ``ChannelError`` to refuse the message
GuestListener = Callable[[str, object], None]


class Engine:
    """Owns the sessions of one medium and restores them in order on one backend.

    Thread-safe: public methods may be called from any thread. Restores run in
    worker threads; at most :attr:`max_parallel` at once.
    """

    def __init__(self, manifest: Manifest, backend: Backend, runtime_dir: Path,
                 options: BootOptions | None = None, *, max_parallel: int = 1,
                 fit_check: FitCheck | None = None, preload: bool = False):
        """``preload``: while idle, copy the statefiles of flavours that wait into RAM
        (worth it on a slow or seek-bound medium, see :mod:`xsession.preload`)."""
        self.manifest = manifest
        self.backend = backend
        self.runtime_dir = runtime_dir
        opts = check_flavours(options or BootOptions(), manifest.names, manifest.default)
        self.options = opts
        self.default = opts.flavour or manifest.default
        allowed = set(opts.sessions) if opts.sessions else set(manifest.names)
        self._flavours = tuple(f for f in manifest.flavours if f.name in allowed)
        self._sessions = {f.name: _Session(f) for f in self._flavours}
        self.max_parallel = max(1, max_parallel)
        self.fit_check = fit_check or self._host_fit_check
        self.warnings: list[str] = list(opts.warnings)
        self._queue: list[scheduler.QueueEntry] = []
        self._active: dict[str, threading.Thread] = {}
        self._subscribers: list[EventCallback] = []
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._closing = False
        self._medium_ok = True
        self._medium_warnings: list[str] = []
        self.preload = preload
        self._preloads: dict[str, Preload] = {}
        self._medium_readers = 0
        self._medium_free = threading.Event()  # cleared while a restore reads the medium
        self._medium_free.set()
        self._guest_listeners: list[GuestListener] = []

    # -- observing -------------------------------------------------------------
    def subscribe(self, callback: EventCallback) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def listen_guests(self, callback: GuestListener) -> None:
        """Hear what every running guest says on its channel: ``callback(session, message)``
        for each accepted message (heartbeats too), in the channel's thread, in the order
        the listeners came. A listener refuses a message by raising ``ChannelError``: the
        channel counts and logs it, and the listeners after it do not hear it. The install
        and the office each listen for their own messages and let the others pass.
        """
        with self._lock:
            self._guest_listeners.append(callback)

    def _guest_message(self, name: str, message: object) -> None:
        """A channel's thread: pass one message to every listener (see :meth:`listen_guests`)."""
        with self._lock:
            listeners = list(self._guest_listeners)
        for listener in listeners:
            listener(name, message)

    def _emit(self, event: str, session: _Session | None) -> None:
        view = session.view() if session else None
        for cb in list(self._subscribers):
            try:
                cb(event, view)
            except Exception:
                log.exception("event subscriber failed on %s", event)

    @property
    def flavours(self) -> tuple[Flavour, ...]:
        """The flavours this engine manages (the boot options may leave some out)."""
        return self._flavours

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self._flavours)

    def sessions(self) -> list[SessionView]:
        """All sessions in restore order."""
        with self._lock:
            order = scheduler.priority_order(self._flavours, self.default)
            return [self._sessions[n].view() for n in order]

    def session(self, name: str) -> SessionView:
        with self._lock:
            return self._get(name).view()

    def _get(self, name: str) -> _Session:
        try:
            return self._sessions[name]
        except KeyError:
            raise NoSuchFlavour(name, self.names) from None

    def running_memory(self) -> dict[str, int]:
        """MiB committed per session that holds memory (or is about to), and per
        statefile held in RAM (``NAME (preloaded)``): a plan never counts a preload as free."""
        with self._lock:
            held = {n: s.flavour.memory_mib + self.backend.overhead_mib(s.flavour)
                    for n, s in self._sessions.items()
                    if s.state in (S.RESTORING, S.BOOTING, S.RUNNING, S.PAUSED)}
            held.update({f"{n} (preloaded)": p.mib for n, p in self._preloads.items()})
            return held

    # -- state machine ------------------------------------------------------------
    def _set(self, s: _Session, state: State, reason: str = "") -> None:
        """Move a session along :data:`TRANSITIONS` (lock held)."""
        if state is not s.state and state not in TRANSITIONS[s.state]:
            raise InvalidState(s.flavour.name, f"move to {state.value}", s.state.value,
                               [st.value for st, nxt in TRANSITIONS.items() if state in nxt])
        changed = state is not s.state or reason != s.reason
        s.state, s.reason = state, reason
        if state in (S.RUNNING, S.PAUSED) and s.bytes_total:
            s.bytes_done = s.bytes_total
        if changed:
            s.last_change = time.time()
            log.info("%s: %s%s", s.flavour.name, state.value, f" ({reason})" if reason else "",
                     extra={"SESSION": s.flavour.name, "STATE": state.value})
            self._emit("state-changed", s)
            self._idle.notify_all()

    def _require(self, s: _Session, action: str) -> None:
        if s.state not in ACTIONS[action]:
            raise InvalidState(s.flavour.name, action, s.state.value, sorted(x.value for x in ACTIONS[action]))

    # -- starting ---------------------------------------------------------------------
    def start(self) -> None:
        """Apply the restore policy: queue what it says and start restoring."""
        with self._lock:
            for entry in scheduler.initial_queue(self._flavours, self.default, self.options.restore):
                s = self._sessions[entry.name]
                if s.state is S.AVAILABLE:
                    self._queue.append(entry)
                    self._set(s, S.QUEUED, "restoring at boot")
            self._dispatch()

    def adopt_running(self) -> list[str]:
        """Take over guests a previous manager left running; report those that died meanwhile."""
        adopted = []
        with self._lock:
            for name, s in self._sessions.items():
                rundir = self._rundir(name)
                had_guest = (rundir / "guest.json").exists() or (rundir / RAN_MARKER).exists()
                try:
                    guest = self.backend.adopt(name, rundir)
                except XSessionError as e:
                    self._set(s, S.FAILED, f"cannot take over its guest: {e}")
                    continue
                if (guest is not None or had_guest) and not (rundir / RAN_MARKER).exists():
                    # the previous manager died mid-restore: the stream was never
                    # verified, so the half-loaded guest is discarded and restored again
                    if guest is not None:
                        self._stop_guest(guest)
                    shutil.rmtree(rundir, ignore_errors=True)
                    self._queue.append(scheduler.QueueEntry(name, False))
                    self._set(s, S.QUEUED, "its restore was cut short when the previous manager ended; restoring again")
                    continue
                if guest is None:
                    if had_guest:
                        self._set(s, S.FAILED, "its hypervisor process ended while the manager was away")
                    continue
                s.guest = guest
                s.origin = "adopted"
                self._listen(s, guest)
                try:
                    paused = guest.status() == "paused"
                except XSessionError:
                    paused = False
                self._set(s, S.PAUSED if paused else S.RUNNING, "adopted from the previous manager")
                guest.on_exit(self._exit_watcher(s, guest))
                adopted.append(name)
        return adopted

    def activate(self, name: str) -> SessionView:
        """Make a session run: restore it now (jumping the queue), resume it, or nothing if it runs.

        :raises NoSuchFlavour: unknown name.
        :raises NotEnoughMemory: it cannot fit now; names what could be stopped.
        """
        with self._lock:
            s = self._get(name)
            self._require_idle(s, "activate")
            if s.state in (S.RUNNING, S.RESTORING, S.BOOTING):
                return s.view()
            if s.state is S.PAUSED:
                self.resume(name)
                return s.view()
            self.fit_check(s.flavour, self.running_memory())
            s.held = False
            self._queue = scheduler.enqueue_request(self._queue, name)
            if s.state is not S.QUEUED:
                self._set(s, S.QUEUED, "requested")
            self._dispatch()
            return s.view()

    def _rundir(self, name: str) -> Path:
        return self.runtime_dir / "sessions" / name

    def _dispatch(self) -> None:
        """Start queued restores while slots are free (lock held)."""
        if self._closing or not self._medium_ok:
            return  # queued sessions wait for the medium
        while len(self._active) < self.max_parallel and self._queue:
            entry = self._queue.pop(0)
            s = self._sessions[entry.name]
            if s.state is not S.QUEUED:
                continue
            if self._fits(s, waiting_reason=not entry.requested):
                self._start_job(s)
        if not self._active and not self._queue and self.options.restore is not RestorePolicy.OFF:
            self._fill_when_idle()
            if not self._active:
                self._next_preload()

    def _fits(self, s: _Session, waiting_reason: bool) -> bool:
        """Ask the memory check; a refusal leaves the session waiting (policy) or
        failed (a request), and any other failure of the check fails it (lock held)."""
        try:
            try:
                self.fit_check(s.flavour, self.running_memory())
            except NotEnoughMemory:
                # preloaded statefiles are a cache: they give way to a person's request
                if waiting_reason or not self._drop_preloads(keep=s.flavour.name):
                    raise
                self.fit_check(s.flavour, self.running_memory())
            return True
        except NotEnoughMemory as e:
            if waiting_reason:
                self._set(s, S.AVAILABLE, f"waiting for memory: {e}")
            else:
                self._set(s, S.FAILED, str(e))
        except XSessionError as e:
            self._set(s, S.FAILED, f"the memory check failed: {e}")
        except Exception as e:  # a planner bug must not leave the session queued forever
            log.exception("%s: memory check crashed", s.flavour.name)
            self._set(s, S.FAILED, f"internal error in the memory check: {e!r}")
        return False

    def _fill_when_idle(self) -> None:
        """Restore the next waiting flavour that fits, one at a time while idle (lock held).

        Under ``lazy`` these are the flavours not restored yet; under ``eager`` the
        ones that waited for memory.
        """
        waiting = [n for n, s in self._sessions.items() if s.state is S.AVAILABLE and not s.held]
        if self.options.restore is RestorePolicy.EAGER:
            waiting = [n for n in waiting if self._sessions[n].reason.startswith("waiting for memory")]
        for name in scheduler.priority_order([self._sessions[n].flavour for n in waiting], self.default):
            s = self._sessions[name]
            if not self._fits(s, waiting_reason=True):
                continue
            self._set(s, S.QUEUED, "restoring while idle")
            self._start_job(s)  # checked just now: straight to the restore
            return

    def _start_job(self, s: _Session) -> None:
        statefile = s.flavour.statefile
        has_state = statefile is not None
        s.bytes_done = 0
        s.bytes_total = statefile.size if statefile is not None else 0
        s.origin = ""
        rundir = self._rundir(s.flavour.name)
        rundir.mkdir(parents=True, exist_ok=True)
        (rundir / RAN_MARKER).unlink(missing_ok=True)
        preload = self._preloads.get(s.flavour.name)
        sources = preload.sources() if preload is not None and preload.complete else None
        if preload is not None and sources is None:
            preload.cancel()  # half copied: the restore reads the medium itself, from the start
        if sources is None:
            self._medium_readers += 1  # a cold boot reads the medium too (kernel, disk)
            self._medium_free.clear()
        if has_state:
            self._set(s, S.RESTORING, "reading the statefile" + (" from RAM (preloaded)" if sources else ""))
        else:
            self._set(s, S.BOOTING, "no statefile on the medium; cold booting")
        t = threading.Thread(target=self._job, args=(s, sources), name=f"restore-{s.flavour.name}", daemon=True)
        self._active[s.flavour.name] = t
        t.start()

    # -- the restore job (worker thread) -----------------------------------------------
    def _progress(self, s: _Session, done: int, total: int) -> None:
        with self._lock:
            if s.state is not S.RESTORING:
                return
            s.bytes_done, s.bytes_total = done, total
            now = time.monotonic()
            fraction = done / total if total else 0.0
            if (now - s.last_emit >= PROGRESS_INTERVAL_S or fraction - s.last_emit_fraction >= PROGRESS_STEP
                    or done == total):
                s.last_emit, s.last_emit_fraction = now, fraction
                self._emit("progress", s)

    def _job(self, s: _Session, sources: tuple[Path, ...] | None = None) -> None:
        try:
            self._restore_or_boot(s, sources)
        finally:
            with self._lock:
                if sources is None:
                    self._medium_readers -= 1
                    if self._medium_readers == 0:
                        self._medium_free.set()
                self._forget_preload(s)
                self._dispatch()

    def _restore_or_boot(self, s: _Session, sources: tuple[Path, ...] | None) -> None:
        name = s.flavour.name
        rundir = self._rundir(name)
        guest: Guest | None = None
        origin = "restored"
        reason = ""
        try:
            if s.flavour.statefile is not None:
                try:
                    guest = self.backend.restore(s.flavour, self.manifest, rundir,
                                                 lambda d, t: self._progress(s, d, t), sources=sources)
                    note = getattr(guest, "note", "")
                    reason = "restored from its statefile" + (f"; {note}" if note else "")
                except MediumUnavailable:
                    raise
                except XSessionError as e:
                    if self._closing:
                        raise  # no cold boot for a manager that is going away
                    log.warning("%s: statefile unusable: %s", name, e, extra={"SESSION": name})
                    with self._lock:
                        self._set(s, S.BOOTING, f"cold booting: {e}")
                    reason = f"cold-booted because {e}"
            if guest is None:
                origin = "cold-booted"
                guest = self.backend.cold_boot(s.flavour, self.manifest, rundir)
                reason = reason or "cold-booted (no statefile)"
        except MediumUnavailable as e:
            with self._lock:
                s.retry_on_medium = True
                self._set(s, S.FAILED, f"{e}; retried when the medium returns")
        except XSessionError as e:
            with self._lock:
                self._set(s, S.FAILED, str(e))
        except Exception as e:  # a bug must not kill the scheduler
            log.exception("%s: restore crashed", name)
            with self._lock:
                self._set(s, S.FAILED, f"internal error: {e!r}")
        with self._lock:
            self._active.pop(name, None)
            if guest is not None:
                if self._closing:
                    self._stop_guest(guest)
                else:
                    s.guest = guest
                    s.origin = origin
                    self._listen(s, guest)
                    _mark_ran(rundir)
                    self._set(s, S.RUNNING, reason)
                    guest.on_exit(self._exit_watcher(s, guest))

    # -- preloading ---------------------------------------------------------------------
    def _next_preload(self) -> None:
        """Copy the next waiting flavour's statefile into RAM, one at a time (lock held)."""
        if not self.preload or self._closing or not self._medium_ok:
            return
        if any(not p.complete and p.error is None for p in self._preloads.values()):
            return  # one sequential read at a time
        waiting = [s.flavour for s in self._sessions.values()
                   if s.state in (S.AVAILABLE, S.STOPPED, S.FAILED) and s.flavour.statefile is not None
                   and s.flavour.name not in self._preloads]
        for name in scheduler.priority_order(waiting, self.default):
            s = self._sessions[name]
            parts = self.backend.preload_parts(s.flavour)
            mib = -(-sum(p.size for p in parts) // (1 << 20))
            if self.backend.host_memory().free_mib < mib + PRELOAD_HEADROOM_MIB:
                return  # memory is for sessions first; a preload never takes the last of it
            try:
                files = [(self.manifest.resolve(p.path), p.size) for p in parts]
            except XSessionError:
                continue  # refused when it is restored, with its reason
            preload = Preload(name, files, self._medium_free, self._preload_done)
            self._preloads[name] = preload
            log.info("%s: preloading %s (%d MiB) into RAM", name, ", ".join(p.name for p, _ in files), mib,
                     extra={"SESSION": name})
            preload.start()
            return

    def _preload_done(self, preload: Preload) -> None:
        with self._lock:
            s = self._sessions[preload.name]
            if self._preloads.get(preload.name) is not preload:
                return
            if preload.complete:
                s.preloaded = True
                self._emit("preloaded", s)
            else:
                self._forget_preload(s)
            if not self._active:
                self._next_preload()

    def _forget_preload(self, s: _Session) -> None:
        """Free a session's preload (lock held)."""
        preload = self._preloads.pop(s.flavour.name, None)
        if preload is not None:
            threading.Thread(target=preload.release, name=f"release-{s.flavour.name}", daemon=True).start()
            if s.preloaded:
                s.preloaded = False
                self._emit("preloaded", s)

    def _drop_preloads(self, keep: str) -> bool:
        """Free every preload but ``keep``'s, the least wanted first; False if there was none (lock held)."""
        others = [n for n in self._preloads if n != keep]
        for name in reversed(scheduler.priority_order([self._sessions[n].flavour for n in others], self.default)):
            log.info("%s: its preloaded statefile gives way to %s", name, keep, extra={"SESSION": name})
            self._forget_preload(self._sessions[name])
        return bool(others)

    def preload_status(self, name: str) -> tuple[int, int, int]:
        """(bytes copied, size, pauses for a restore) of a session's preload; zeros if none."""
        with self._lock:
            p = self._preloads.get(name)
            return (p.copied, p.size, p.pauses) if p is not None else (0, 0, 0)

    def _listen(self, s: _Session, guest: Guest) -> None:
        """Pass what the guest says on its channel to the listeners (:meth:`listen_guests`)."""
        channel = getattr(guest, "channel", None)
        if channel is not None:
            channel.on_message = lambda message, name=s.flavour.name: self._guest_message(name, message)

    def channel(self, name: str) -> Any:
        """The running guest's channel (``ChannelReader``: :meth:`send` answers it), or None."""
        with self._lock:
            return getattr(self._get(name).guest, "channel", None)

    def _exit_watcher(self, s: _Session, guest: Guest) -> Callable[[str], None]:
        """The callback that tells this session that this guest ended by itself."""
        return lambda reason: self._guest_exited(s, guest, reason)

    def _guest_exited(self, s: _Session, guest: Guest, reason: str) -> None:
        with self._lock:
            if s.guest is not guest:
                return
            s.guest = None
            if s.state in (S.RUNNING, S.PAUSED):
                self._set(s, S.FAILED, reason)
            self._dispatch()

    # -- actions --------------------------------------------------------------------
    def pause(self, name: str) -> None:
        self._guest_call(name, "pause", S.PAUSED, "paused")

    def resume(self, name: str) -> None:
        self._guest_call(name, "resume", S.RUNNING, "resumed")

    def _guest_call(self, name: str, action: str, then: State, reason: str) -> None:
        """Pause or resume: the hypervisor is asked outside the lock (a hung monitor
        must not freeze every reader), the state changes only if nothing else did."""
        with self._lock:
            s = self._get(name)
            self._require_idle(s, action)
            self._require(s, action)
            guest = s.guest
            assert guest is not None  # running and paused sessions always have one
        getattr(guest, action)()
        with self._lock:
            if s.guest is guest and s.state in ACTIONS[action]:
                self._set(s, then, reason)

    def _require_idle(self, s: _Session, action: str) -> None:
        if s.busy:
            raise InvalidState(s.flavour.name, action, "stopping", ["any state once it has stopped"])

    def _stop_guest(self, guest: Guest) -> None:
        """Stop a guest; a hypervisor that fails to is logged, not raised, so the
        caller's other guests and state changes still happen."""
        try:
            guest.stop()
        except XSessionError as e:
            log.error("stopping %s failed: %s", getattr(guest, "name", "?"), e)

    def _take_guest_away(self, s: _Session, action: str) -> Guest | None:
        """Detach the session's guest for stopping; the session is busy until
        :meth:`_release` (lock held)."""
        self._require_idle(s, action)
        self._require(s, action)
        guest, s.guest = s.guest, None
        s.busy = guest is not None
        if guest is not None:
            self._forget_guest(s.flavour.name)  # stopped on purpose: nothing to adopt
        return guest

    def _release(self, s: _Session, guest: Guest | None) -> None:
        if guest is not None:
            self._stop_guest(guest)
        with self._lock:
            s.busy = False

    def stop(self, name: str) -> None:
        with self._lock:
            s = self._get(name)
            guest = self._take_guest_away(s, "stop")
            if s.state is S.QUEUED:
                self._queue = [e for e in self._queue if e.name != name]
            s.held = True
            self._set(s, S.STOPPED, "stopped on request")
        self._release(s, guest)
        with self._lock:
            self._dispatch()

    def _forget_guest(self, name: str) -> None:
        """A guest stopped on purpose is nothing a restarted manager should adopt or report."""
        for record in ("guest.json", RAN_MARKER):
            (self._rundir(name) / record).unlink(missing_ok=True)

    def reset(self, name: str) -> SessionView:
        """Throw the session away and restore it again from the pristine statefile."""
        with self._lock:
            s = self._get(name)
            guest = self._take_guest_away(s, "reset")
            if s.state in (S.RUNNING, S.PAUSED):
                self._set(s, S.STOPPED, "reset: discarded")
        self._release(s, guest)
        shutil.rmtree(self._rundir(name), ignore_errors=True)
        return self.activate(name)

    def picture(self, name: str, max_width: int = 0, live: bool = True) -> tuple[bytes, str]:
        """What the flavour looks like: its running guest's screen now (``live``, unless
        ``live`` is False), else the still saved at mastering (``still``), else nothing.
        Slow (a screendump): call it outside the main loop.
        """
        with self._lock:
            s = self._get(name)
            guest = s.guest if live and s.state in (S.RUNNING, S.PAUSED) else None
            still = s.flavour.still
        if guest is not None and hasattr(guest, "picture"):
            try:
                png: bytes = guest.picture(max_width)
                return png, "live"
            except XSessionError as e:
                log.debug("%s: no live picture: %s", name, e)
        if still is not None:
            try:
                return self.manifest.resolve(still).read_bytes(), "still"
            except (OSError, XSessionError) as e:
                log.debug("%s: no still: %s", name, e)
        return b"", ""

    def set_default(self, name: str) -> None:
        with self._lock:
            self._get(name)
            self.default = name

    # -- the medium ---------------------------------------------------------------
    def medium_removed(self, why: str = "the medium was removed") -> None:
        with self._lock:
            self._medium_ok = False
            self.warnings.append(why)
            self._medium_warnings.append(why)
            self._emit("warnings", None)

    def medium_returned(self) -> None:
        """Retry the sessions whose restore failed because the medium was gone."""
        with self._lock:
            self._medium_ok = True
            self.warnings = [w for w in self.warnings if w not in self._medium_warnings]
            self._medium_warnings.clear()
            self._emit("warnings", None)
            for s in self._sessions.values():
                if s.retry_on_medium and s.state is S.FAILED:
                    s.retry_on_medium = False
                    self._queue.append(scheduler.QueueEntry(s.flavour.name, False))
                    self._set(s, S.QUEUED, "the medium returned; retrying")
            self._dispatch()

    # -- memory -------------------------------------------------------------------
    def _host_fit_check(self, flavour: Flavour, running: dict[str, int]) -> None:
        """Without a planner: refuse what the host's free memory cannot hold."""
        need = flavour.memory_mib + self.backend.overhead_mib(flavour)
        free = self.backend.host_memory().free_mib
        if need > free:
            raise NotEnoughMemory(flavour.name, need, free, sorted(running))

    # -- waiting and ending ---------------------------------------------------------
    def wait_idle(self, timeout: float) -> bool:
        """Until nothing is queued or restoring; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._queue or self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
            return True

    def wait_state(self, name: str, states: set[State], timeout: float) -> SessionView:
        """Until the session is in one of ``states``; raises TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while True:
                s = self._get(name)
                if s.state in states:
                    return s.view()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{name} is {s.state.value}, not {sorted(x.value for x in states)}")
                self._idle.wait(left)

    def shutdown(self, stop_guests: bool = True, timeout: float = 30.0) -> None:
        """End the engine: cancel restores in flight, then stop (or leave) the guests.

        A restore cut short is redone by the next manager (no ``ran`` marker), so
        nothing is lost by cancelling it; waiting for it could take minutes.
        """
        with self._lock:
            self._closing = True
            self._queue.clear()
            active = list(self._active.values())
            for s in self._sessions.values():
                self._forget_preload(s)
        abort = getattr(self.backend, "abort", None)
        if active and abort is not None:
            abort()
        deadline = time.monotonic() + timeout
        for t in active:
            t.join(max(0.1, deadline - time.monotonic()))
        with self._lock:
            guests = [(s, s.guest) for s in self._sessions.values() if s.guest is not None]
            for s, _ in guests:
                s.guest = None
        for s, g in guests:
            if stop_guests:
                self._forget_guest(s.flavour.name)
                self._stop_guest(g)
                with self._lock:
                    if s.state in (S.RUNNING, S.PAUSED):
                        self._set(s, S.STOPPED, "the manager shut down")
            else:
                detach = getattr(g, "detach", None)
                if detach is not None:
                    detach()
