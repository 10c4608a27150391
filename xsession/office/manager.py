"""The office bound to an engine: it starts the office's sessions, tells the desktops'
workers to start or pause until they acknowledge, and keeps what they report.

Decisions are the :class:`~.ledger.Ledger`'s; this module does what it says:
``engine.activate``/``engine.reset`` of the sessions, lines written to the
desktops' channels, events for the D-Bus layer. It listens to the engine twice:

* every guest message (:meth:`Engine.listen_guests`, in the channel's thread): an
  office line is taken or refused (``ChannelError``: a session that is no office
  desktop, a line that contradicts the office), and each heartbeat of a desktop that
  has not acknowledged the wanted command brings the command again;
* the sessions' states (:meth:`Engine.subscribe`): a desktop whose session leaves
  ``running`` (restored, reset, re-activated, paused) has acknowledged nothing.

Events (to every subscriber, from whichever thread caused them):

* ``changed``  (:class:`~.ledger.OfficeView`) the state, counters or workers changed;
* ``activity`` (:class:`~.ledger.Record`) a desktop reported a document or an event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..engine import Engine, SessionView, State
from ..guestchannel import ChannelError, Heartbeat
from ..office.protocol import Activity, Problem, WorkerState, command_line
from .errors import NoOffice
from .ledger import Counters, Ledger, OfficeState, OfficeView, Record

__all__ = ["OfficeManager", "OfficeEvent"]

log = logging.getLogger(__name__)

#: (event, payload): ("changed", OfficeView) or ("activity", Record)
OfficeEvent = Callable[[str, Any], None]
#: sessions that are on their way to running from the medium: a reset would only redo that
_UNDER_WAY = frozenset({State.QUEUED, State.RESTORING, State.BOOTING})
_ABSENT = OfficeView(OfficeState.ABSENT, "", (), 0.0, Counters())


class OfficeManager:
    """The office of ``engine``'s medium, or an absent one (:attr:`present` is False) when the
    manifest has none or the boot options left one of its flavours out."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time):
        self.engine = engine
        self.clock = clock
        layout = engine.manifest.office
        self.ledger: Ledger | None = None
        if layout is not None:
            missing = [n for n in layout.names if n not in engine.names]
            if missing:
                why = f"the office is off: the boot options leave out {', '.join(missing)}"
                log.warning("%s", why)
                engine.warnings.append(why)
            else:
                self.ledger = Ledger(layout.server, layout.desktops)
        self._lock = threading.Lock()
        self._subscribers: list[OfficeEvent] = []
        engine.listen_guests(self._on_guest)
        engine.subscribe(self._on_engine)

    @property
    def present(self) -> bool:
        return self.ledger is not None

    def view(self) -> OfficeView:
        with self._lock:
            return self.ledger.view() if self.ledger is not None else _ABSENT

    def records(self) -> list[Record]:
        """The latest activity, oldest first (at most ``ledger.MAX_RECORDS``)."""
        with self._lock:
            return list(self.ledger.records) if self.ledger is not None else []

    def subscribe(self, callback: OfficeEvent) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def _emit(self, event: str, payload: Any) -> None:
        for cb in list(self._subscribers):
            try:
                cb(event, payload)
            except Exception:
                log.exception("office subscriber failed on %s", event)

    def _need(self, action: str) -> Ledger:
        if self.ledger is None:
            raise NoOffice(action)
        return self.ledger

    # -- what a person asks ---------------------------------------------------------------
    def start(self) -> OfficeView:
        """Make the server and every desktop run (restored, resumed), then tell the workers
        to start: at once, and again at each heartbeat until each desktop acknowledges.

        :raises NoOffice: the medium has none.
        :raises NotEnoughMemory: a session cannot fit; the office's state is unchanged.
        """
        ledger = self._need("start")
        for name in (ledger.server, *ledger.desktops):
            self.engine.activate(name)
        with self._lock:
            ledger.start(self.clock())
            view = ledger.view()
        log.info("office started: %s serves %s", ledger.server, ", ".join(ledger.desktops))
        self._emit("changed", view)
        self._tell_all()
        return view

    def pause(self) -> OfficeView:
        """Tell the workers to pause (the sessions keep running).

        :raises NoOffice: the medium has none.
        """
        ledger = self._need("pause")
        with self._lock:
            ledger.pause()
            view = ledger.view()
        log.info("office paused")
        self._emit("changed", view)
        self._tell_all()
        return view

    def reset(self) -> OfficeView:
        """Back to the office as mastered: every one of its sessions thrown away and restored
        from its pristine statefile (one already on its way from the medium is left to it),
        the office idle, its activity forgotten.

        :raises NoOffice: the medium has none.
        :raises InvalidState: a session that is being stopped.
        """
        ledger = self._need("reset")
        for name in (ledger.server, *ledger.desktops):
            if self.engine.session(name).state not in _UNDER_WAY:
                self.engine.reset(name)
        with self._lock:
            ledger.reset()
            view = ledger.view()
        log.info("office reset to its mastered state")
        self._emit("changed", view)
        return view

    def _tell_all(self) -> None:
        ledger = self.ledger
        assert ledger is not None
        for desktop in ledger.desktops:
            self._tell(desktop)

    def _tell(self, desktop: str) -> None:
        """Write the command ``desktop`` still owes an answer to, if any; a lost line is
        said again at its next heartbeat."""
        with self._lock:
            command = self.ledger.due(desktop) if self.ledger is not None else None
        if command is None:
            return
        channel = self.engine.channel(desktop)
        if channel is not None:
            channel.send(command_line(command))

    # -- what the guests say (a channel's thread) ------------------------------------------
    def _on_guest(self, session: str, message: object) -> None:
        if isinstance(message, Heartbeat):
            if self.ledger is not None and session in self.ledger.desktops:
                self._tell(session)
            return
        if not isinstance(message, (WorkerState, Activity, Problem)):
            return  # not the office's
        with self._lock:
            if self.ledger is None:
                raise ChannelError(f"an office message from {session}, but this medium has no office")
            before = self.ledger.view()
            record = self.ledger.hear(session, message, self.clock())   # :raises ChannelError:
            view = self.ledger.view()
        if record is not None:
            self._emit("activity", record)
        if view != before:
            self._emit("changed", view)

    def _on_engine(self, event: str, view: SessionView | None) -> None:
        """A desktop whose session left ``running`` has a new guest next time: it owes the
        wanted command anew; one that runs (again) is told at once."""
        if event != "state-changed" or view is None or self.ledger is None or view.name not in self.ledger.desktops:
            return
        if view.state is State.RUNNING:
            self._tell(view.name)
            return
        with self._lock:
            forgot = self.ledger.forget(view.name)
            office = self.ledger.view()
        if forgot:
            self._emit("changed", office)
