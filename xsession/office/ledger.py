"""What the office heard and what it still has to say: pure, no I/O, no threads.

The :class:`Ledger` holds the office's state (``idle``, ``running``, ``paused``),
the command each desktop has not acknowledged yet, the activity the desktops
reported (a bounded list of :class:`Record`) and its :class:`Counters`. The
manager (:mod:`.manager`) feeds it what the channels say and sends what it says
is due; a test feeds it lines and a clock.

Why acknowledgements: a command dom0 writes right after a restore can be lost
(the guest has not opened its port yet), so the wanted command is due again at
each heartbeat until the desktop answers ``office state X`` with the state the
command asks for; a desktop whose guest changed (restored, reset) has
acknowledged nothing.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ..guestchannel import ChannelError
from .protocol import COMMANDS, Activity, OfficeMessage, Problem, WorkerState

__all__ = ["OfficeState", "Record", "Counters", "Worker", "OfficeView", "Ledger", "MAX_RECORDS", "MAX_ITEMS"]

#: the activity kept for a front-end: enough for a screenful of lines and a benchmark's first ones
MAX_RECORDS = 200
#: items whose maker is remembered (to refuse a desktop "reading" its own document); a
#: worker makes a few a minute, so this is hours of office
MAX_ITEMS = 4096
#: which problem an activity shows solved
_AREA = {"saved": "share", "read": "share", "added": "calendar", "saw": "calendar"}


class OfficeState(str, enum.Enum):
    ABSENT = "absent"     # the medium has no office
    IDLE = "idle"         # as mastered: the workers were never started (or were reset)
    RUNNING = "running"
    PAUSED = "paused"


#: the command that makes the workers match the office's state (none while idle)
_COMMAND = {OfficeState.RUNNING: "start", OfficeState.PAUSED: "pause"}


@dataclass(frozen=True)
class Record:
    """One activity a desktop reported: when dom0 heard it, from which session, what, which item."""

    at: float
    session: str
    kind: str
    item: str


@dataclass(frozen=True)
class Counters:
    """Activity since the last reset; ``first_read``/``first_seen``: seconds from the last
    start to the first document read (event seen) by a desktop other than its maker, -1 before."""

    saved: int = 0
    added: int = 0
    read: int = 0
    seen: int = 0
    first_read: float = -1.0
    first_seen: float = -1.0


@dataclass(frozen=True)
class Worker:
    """One desktop's worker: the state it last acknowledged ("" since its guest changed) and
    the last problem it reported ("" when none, or once it worked again)."""

    acknowledged: str = ""
    problem: str = ""


@dataclass(frozen=True)
class OfficeView:
    """A consistent snapshot of the office, safe to hand to any thread."""

    state: OfficeState
    server: str
    desktops: tuple[str, ...]
    started: float
    counters: Counters
    workers: dict[str, Worker] = field(default_factory=dict)


class Ledger:
    """The office's bookkeeping. Not thread-safe: the manager holds a lock around it."""

    def __init__(self, server: str, desktops: Sequence[str], max_records: int = MAX_RECORDS):
        self.server = server
        self.desktops = tuple(desktops)
        self.state = OfficeState.IDLE
        self.started = 0.0
        self.counters = Counters()
        self.workers = {d: Worker() for d in self.desktops}
        self.records: deque[Record] = deque(maxlen=max_records)
        self._makers: OrderedDict[str, str] = OrderedDict()   # item -> the session that made it

    def view(self) -> OfficeView:
        return OfficeView(self.state, self.server, self.desktops, self.started, self.counters, dict(self.workers))

    # -- what dom0 decides -----------------------------------------------------------
    def start(self, now: float) -> None:
        """The workers are to run; the first cross-desktop read and sight are timed from ``now``."""
        self.state = OfficeState.RUNNING
        self.started = now
        self.counters = replace(self.counters, first_read=-1.0, first_seen=-1.0)

    def pause(self) -> None:
        self.state = OfficeState.PAUSED

    def reset(self) -> None:
        """Back to the mastered office: idle, nothing heard, nothing acknowledged."""
        self.state = OfficeState.IDLE
        self.started = 0.0
        self.counters = Counters()
        self.workers = {d: Worker() for d in self.desktops}
        self.records.clear()
        self._makers.clear()

    def forget(self, desktop: str) -> bool:
        """The desktop's guest changed: it acknowledged nothing yet. True if that changed anything."""
        worker = self.workers.get(desktop)
        if worker is None or not worker.acknowledged:
            return False
        self.workers[desktop] = replace(worker, acknowledged="")
        return True

    @property
    def command(self) -> str | None:
        """The command the office's state asks of every desktop (None while idle)."""
        return _COMMAND.get(self.state)

    def due(self, desktop: str) -> str | None:
        """The command ``desktop`` has not acknowledged yet, or None."""
        command = self.command
        worker = self.workers.get(desktop)
        if command is None or worker is None or worker.acknowledged == COMMANDS[command]:
            return None
        return command

    # -- what the desktops say ---------------------------------------------------------
    def hear(self, desktop: str, message: OfficeMessage, now: float) -> Record | None:
        """Take one office message of ``desktop``; the activity record it makes, if any.

        :raises ChannelError: the session is no office desktop, or the message contradicts
            what the office knows (a desktop reading its own document); nothing changes.
        """
        worker = self.workers.get(desktop)
        if worker is None:
            role = "the office's server" if desktop == self.server else "no office desktop of this medium"
            raise ChannelError(f"an office message from {desktop}, which is {role}")
        if isinstance(message, WorkerState):
            self.workers[desktop] = replace(worker, acknowledged=message.state)
            return None
        if isinstance(message, Problem):
            self.workers[desktop] = replace(worker, problem=message.what)
            return None
        assert isinstance(message, Activity)
        maker = self._makers.get(message.item)
        if message.kind in ("read", "saw"):
            if maker == desktop:
                what = "document" if message.kind == "read" else "calendar event"
                raise ChannelError(f"{desktop} says it {message.kind} {message.item}, a {what} it made itself")
        elif maker is not None and maker != desktop:
            raise ChannelError(f"{desktop} says it {message.kind} {message.item}, which {maker} made")
        elif maker is None:
            self._makers[message.item] = desktop
            if len(self._makers) > MAX_ITEMS:
                self._makers.popitem(last=False)
        self._count(message.kind, now)
        if worker.problem == _AREA[message.kind]:
            self.workers[desktop] = replace(worker, problem="")
        record = Record(now, desktop, message.kind, message.item)
        self.records.append(record)
        return record

    def _count(self, kind: str, now: float) -> None:
        c = self.counters
        timed = self.state is OfficeState.RUNNING and self.started > 0
        if kind == "saved":
            c = replace(c, saved=c.saved + 1)
        elif kind == "added":
            c = replace(c, added=c.added + 1)
        elif kind == "read":
            c = replace(c, read=c.read + 1)
            if timed and c.first_read < 0:
                c = replace(c, first_read=max(0.0, now - self.started))
        else:
            c = replace(c, seen=c.seen + 1)
            if timed and c.first_seen < 0:
                c = replace(c, first_seen=max(0.0, now - self.started))
        self.counters = c
