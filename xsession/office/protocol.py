"""The office lines of the guest channel (protocol ``xenubuntu1``), both ways.

From an office desktop (untrusted; :func:`xsession.guestchannel.parse_line` matches
whole lines only)::

    xenubuntu1 office state (idle|running|paused)      the worker's state, the answer to each command
    xenubuntu1 office (saved|added|read|saw) ID        a document or calendar event, see KINDS
    xenubuntu1 office problem (share|calendar)         the worker cannot reach it (and retries)

``ID`` is ``USER-REST``: an office user (``[a-z][a-z0-9]{0,15}``), a dash, then
1 to 40 of ``[0-9a-z-]`` (``alice-0003-3fa2c1``). It names a document or an event,
never a path: dom0 only counts it.

From dom0 (:func:`command_line`)::

    xenubuntu1 office start
    xenubuntu1 office pause

A command can be lost (the guest's port may not be open yet right after a
restore), so dom0 says it again at each heartbeat of a desktop until that desktop
answers with the matching state (:mod:`.ledger`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["WORKER_STATES", "KINDS", "PROBLEMS", "COMMANDS", "ID_RE", "STATE", "ACTIVITY", "PROBLEM",
           "WorkerState", "Activity", "Problem", "OfficeMessage", "command_line"]

WORKER_STATES = ("idle", "running", "paused")
#: saved: this desktop saved a document in the share; added: it added a calendar event;
#: read: it read a document another desktop saved; saw: it saw an event another desktop added
KINDS = ("saved", "added", "read", "saw")
PROBLEMS = ("share", "calendar")
#: dom0's commands and the worker state that acknowledges each
COMMANDS = {"start": "running", "pause": "paused"}
ID_RE = re.compile(r"[a-z][a-z0-9]{0,15}-[0-9a-z-]{1,40}")
STATE = re.compile(rb"xenubuntu1 office state (" + "|".join(WORKER_STATES).encode() + rb")")
ACTIVITY = re.compile(rb"xenubuntu1 office (" + "|".join(KINDS).encode() + rb") (" + ID_RE.pattern.encode() + rb")")
PROBLEM = re.compile(rb"xenubuntu1 office problem (" + "|".join(PROBLEMS).encode() + rb")")


@dataclass(frozen=True)
class WorkerState:
    """The desktop's worker says what it does now."""

    state: str


@dataclass(frozen=True)
class Activity:
    """A document saved or read, an event added or seen, by the desktop that says so."""

    kind: str
    item: str

    @property
    def user(self) -> str:
        """The office user who made the item: the part of its ID before the first dash."""
        return self.item.split("-", 1)[0]


@dataclass(frozen=True)
class Problem:
    """The worker cannot reach the share or the calendar."""

    what: str


OfficeMessage = WorkerState | Activity | Problem


def command_line(command: str) -> bytes:
    """The line dom0 sends a desktop (with its newline).

    :raises ValueError: not a command of the protocol (a bug in dom0).
    """
    if command not in COMMANDS:
        raise ValueError(f"no office command {command!r}")
    return f"xenubuntu1 office {command}\n".encode("ascii")
