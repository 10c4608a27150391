"""Install jobs: a guest's request becomes a pending job that a person confirms.

Shaped like udisks2's ``Job`` objects: one job per request, with the session
and flavour that asked, a state, the target once confirmed, progress, rate and
expected end, and an error when it fails. The states::

    pending --confirm--> running --> done | failed | cancelled
    pending --cancel---> cancelled

A guest asks; nothing is written until :meth:`Jobs.confirm` names a target (the
D-Bus layer authorizes that and checks the target first). A session may have
one open (pending or running) job; a second request from it, or a replayed
request ID, is refused on the channel and changes nothing.

Events to subscribers (any thread, one job at a time, in order): ``added``,
``changed``, ``removed``, each with a :class:`JobView` snapshot.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import InvalidState, XSessionError
from ..guestchannel import ChannelError
from .errors import NoSuchJob
from .protocol import ReplayGuard, Replayed

__all__ = ["JobState", "JobView", "Jobs", "Runner", "Report", "MAX_OPEN_PER_SESSION", "KEEP_FINISHED"]

log = logging.getLogger(__name__)

#: one install at a time per session: a guest cannot queue installs
MAX_OPEN_PER_SESSION = 1
#: finished jobs kept for front-ends to read; older ones are withdrawn
KEEP_FINISHED = 8
#: the guest hears of progress at most every this many percent
GUEST_STEP_PERCENT = 10


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobView:
    """A snapshot of one job, as published."""

    number: int
    session: str
    flavour: str
    request_id: str
    state: JobState
    target: str = ""
    progress: float = 0.0
    bytes_done: int = 0
    bytes_total: int = 0
    rate: int = 0                 # bytes a second, 0 while unknown
    expected_end_us: int = 0      # µs since the epoch, 0 while unknown (udisks' ExpectedEndTime)
    error: str = ""
    created: float = 0.0


#: ``report(done, total)``: bytes written of those the install will write
Report = Callable[[int, int], None]
#: runs an install: ``(job, target, report, cancelled)``; raises on failure
Runner = Callable[[JobView, str, Report, threading.Event], None]
Listener = Callable[[str, JobView], None]


@dataclass
class _Job:
    view: JobView
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0
    told_percent: int = -1


class Jobs:
    """The install jobs of one manager. Thread-safe."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self._jobs: dict[int, _Job] = {}
        self._guards: dict[str, ReplayGuard] = {}
        self._next = 1
        self._lock = threading.RLock()
        self._listeners: list[Listener] = []
        self._threads: dict[int, threading.Thread] = {}

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def _emit(self, event: str, view: JobView) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, view)
            except Exception:  # a front-end's bug must not stop the install
                log.exception("install job listener failed on %s", event)

    def views(self) -> list[JobView]:
        with self._lock:
            return [j.view for j in self._jobs.values()]

    def view(self, number: int) -> JobView:
        with self._lock:
            return self._get(number).view

    def _get(self, number: int) -> _Job:
        try:
            return self._jobs[number]
        except KeyError:
            raise NoSuchJob(number) from None

    # -- from a guest ---------------------------------------------------------------
    def request(self, session: str, flavour: str, request_id: str) -> JobView:
        """A guest's request (its session is the channel's; it named nothing else).

        :raises ChannelError: a replayed ID, or the session has an open job already.
        """
        with self._lock:
            guard = self._guards.setdefault(session, ReplayGuard())
            try:
                guard.admit(request_id)
            except Replayed as e:
                raise ChannelError(str(e)) from None
            open_jobs = [j.view.number for j in self._jobs.values()
                         if j.view.session == session and not j.view.state.finished]
            if len(open_jobs) >= MAX_OPEN_PER_SESSION:
                raise ChannelError(f"an install request is open already (job {open_jobs[0]})")
            view = JobView(self._next, session, flavour, request_id, JobState.PENDING, created=time.time())
            self._next += 1
            self._jobs[view.number] = _Job(view)
            self._emit("added", view)
            self._forget_old()
            log.info("install job %d: %s asks to install %s (request %s)", view.number, session, flavour,
                     request_id)
            return view

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.view.state.finished]
        for j in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[j.view.number]
            self._emit("removed", j.view)

    # -- from a person (authorized by the caller) --------------------------------------
    def confirm(self, number: int, target: str) -> JobView:
        """Start the install onto ``target`` (a disk the caller checked).

        :raises NoSuchJob: :raises InvalidState: the job is not pending.
        """
        with self._lock:
            job = self._get(number)
            if job.view.state is not JobState.PENDING:
                raise InvalidState(f"job {number}", "confirm", job.view.state.value, [JobState.PENDING.value])
            job.started = time.monotonic()
            self._update(job, state=JobState.RUNNING, target=target)
            thread = threading.Thread(target=self._run, args=(job, target), name=f"install-{number}",
                                      daemon=True)
            self._threads[number] = thread
            thread.start()
            return job.view

    def cancel(self, number: int) -> JobView:
        """A pending job ends at once; a running one stops at its next step and leaves the
        disk as the installer says (:mod:`.installer`).

        :raises NoSuchJob: :raises InvalidState: it has finished.
        """
        with self._lock:
            job = self._get(number)
            if job.view.state.finished:
                raise InvalidState(f"job {number}", "cancel", job.view.state.value,
                                   [JobState.PENDING.value, JobState.RUNNING.value])
            job.cancel.set()
            if job.view.state is JobState.PENDING:
                self._update(job, state=JobState.CANCELLED, error="cancelled before it started")
            return job.view

    def wait(self, number: int, timeout: float) -> JobView:
        """Until the job has finished (tests, the command line); its view then or now."""
        thread = self._threads.get(number)
        if thread is not None:
            thread.join(timeout)
        return self.view(number)

    # -- the install ----------------------------------------------------------------------
    def _run(self, job: _Job, target: str) -> None:
        def report(done: int, total: int) -> None:
            now = time.monotonic()
            elapsed = now - job.started
            rate = int(done / elapsed) if elapsed > 0 and done > 0 else 0
            end = int((time.time() + (total - done) / rate) * 1e6) if rate else 0
            with self._lock:
                self._update(job, progress=min(1.0, done / total) if total else 0.0, bytes_done=done,
                             bytes_total=total, rate=rate, expected_end_us=end)

        try:
            self.runner(job.view, target, report, job.cancel)
        except XSessionError as e:
            with self._lock:
                state = JobState.CANCELLED if job.cancel.is_set() else JobState.FAILED
                self._update(job, state=state, error=str(e), expected_end_us=0)
            log.warning("install job %d %s: %s", job.view.number, state.value, e)
        except Exception as e:
            with self._lock:
                self._update(job, state=JobState.FAILED, error=f"internal error: {e!r}", expected_end_us=0)
            log.exception("install job %d crashed", job.view.number)
        else:
            with self._lock:
                self._update(job, state=JobState.DONE, progress=1.0, expected_end_us=0)
            log.info("install job %d: %s installed onto %s", job.view.number, job.view.flavour, target)
        with self._lock:
            self._forget_old()

    def _update(self, job: _Job, **changes: object) -> None:
        job.view = replace(job.view, **changes)  # type: ignore[arg-type]
        self._emit("changed", job.view)

    def guest_percent_due(self, number: int) -> int | None:
        """The percent to tell the guest now, or None when it heard this step already."""
        with self._lock:
            job = self._get(number)
            percent = int(job.view.progress * 100) // GUEST_STEP_PERCENT * GUEST_STEP_PERCENT
            if percent == job.told_percent:
                return None
            job.told_percent = percent
            return percent
