"""The install messages of the guest channel (protocol ``xenubuntu1``), both ways.

From the guest (untrusted, parsed by :func:`xsession.guestchannel.parse_line`)::

    xenubuntu1 install-request ID        ID: 8 to 32 of [0-9a-f], new for each request

A guest names no disk, no path and no flavour: the manager knows which session
the channel belongs to, and the disk is chosen by a person in dom0.

From dom0, on the same socket, one line each time the job's state changes::

    xenubuntu1 install ID STATE [PERCENT]
    STATE: pending running done failed cancelled refused

An ID a session used before is refused (:class:`ReplayGuard`): a restored
guest starts from the same saved RAM as every other restore, and a replayed
line must not start a second install.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

__all__ = ["InstallRequest", "REQUEST", "STATES", "reply_line", "parse_reply", "ReplayGuard", "Replayed"]

#: the request's exact form (the channel's parser matches the whole line)
REQUEST = re.compile(rb"xenubuntu1 install-request ([0-9a-f]{8,32})")
STATES = ("pending", "running", "done", "failed", "cancelled", "refused")
_REPLY = re.compile(r"xenubuntu1 install ([0-9a-f]{8,32}) (" + "|".join(STATES) + r")(?: ([0-9]{1,3}))?")


@dataclass(frozen=True)
class InstallRequest:
    """A guest asks that its own flavour be installed; ``request_id`` is the guest's."""

    request_id: str


def reply_line(request_id: str, state: str, percent: int | None = None) -> bytes:
    """The line dom0 sends the guest (with its newline).

    :raises ValueError: an ID or state the protocol cannot carry (a bug in dom0).
    """
    if state not in STATES or not re.fullmatch(r"[0-9a-f]{8,32}", request_id):
        raise ValueError(f"no install reply for {request_id!r} {state!r}")
    tail = "" if percent is None else f" {max(0, min(100, int(percent)))}"
    return f"xenubuntu1 install {request_id} {state}{tail}\n".encode("ascii")


def parse_reply(line: str) -> tuple[str, str, int | None]:
    """(ID, state, percent) of a reply line, as the guest reads it.

    :raises ValueError: not a reply.
    """
    m = _REPLY.fullmatch(line.strip())
    if m is None:
        raise ValueError(f"not an install reply: {line[:60]!r}")
    return m.group(1), m.group(2), None if m.group(3) is None else int(m.group(3))


class Replayed(ValueError):
    """A request ID the session used before."""


class ReplayGuard:
    """The request IDs one session used, the last :attr:`keep` of them."""

    def __init__(self, keep: int = 256):
        self.keep = keep
        self._order: deque[str] = deque()
        self._seen: set[str] = set()

    def admit(self, request_id: str) -> None:
        """:raises Replayed: the ID was used before."""
        if request_id in self._seen:
            raise Replayed(f"request {request_id} was used before (a replay)")
        self._seen.add(request_id)
        self._order.append(request_id)
        if len(self._order) > self.keep:
            self._seen.discard(self._order.popleft())
