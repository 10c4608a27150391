"""The guest channel: what a flavour we built tells dom0 over its virtio-serial port.

Everything that comes from a guest is untrusted: a guest is whatever the person
in it made of it. The format is tiny, line based and versioned; a line that is
not exactly one of these is refused (counted and logged, never acted on)::

    xenubuntu1 ready FLAVOUR       once the flavour's session runs
    xenubuntu1 heartbeat N         every second after that, N = 1, 2, 3, ...
    xenubuntu1 install-request ID  the person in the guest asks that its flavour be installed
                                   (:mod:`xsession.install.protocol`; dom0 answers on the same socket)
    xenubuntu1 office ...          an office desktop's worker: its state, a document or an event,
                                   a problem (:mod:`xsession.office.protocol`; dom0 starts and pauses it)

Lines are ASCII, at most :data:`MAX_LINE` bytes with their newline. A guest that
sends more than :data:`MAX_LINES_PER_S` lines a second is not read for the rest
of that second (its lines are dropped, the count says so).

:func:`parse_line` is the pure part; :class:`ChannelReader` reads a socket
(QEMU's chardev for the port) in a thread and keeps what was heard.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .install.protocol import REQUEST as _INSTALL_REQUEST
from .install.protocol import InstallRequest
from .office import protocol as _office
from .office.protocol import Activity, OfficeMessage, Problem, WorkerState

__all__ = ["PORT_NAME", "MAX_LINE", "MAX_LINES_PER_S", "Ready", "Heartbeat", "InstallRequest", "WorkerState",
           "Activity", "Problem", "OfficeMessage", "Message", "ChannelError", "parse_line", "ChannelReader"]

log = logging.getLogger(__name__)

PORT_NAME = "org.xenubuntu.guest.0"
PROTOCOL = "xenubuntu1"
MAX_LINE = 128
MAX_LINES_PER_S = 20
_READY = re.compile(rb"xenubuntu1 ready ([a-z][a-z0-9_]{0,31})")
_HEARTBEAT = re.compile(rb"xenubuntu1 heartbeat ([1-9][0-9]{0,18})")


@dataclass(frozen=True)
class Ready:
    flavour: str


@dataclass(frozen=True)
class Heartbeat:
    seq: int


Message = Ready | Heartbeat | InstallRequest | OfficeMessage


class ChannelError(ValueError):
    """A line from a guest that is not a message of the protocol, or one that is refused
    (a replayed install request)."""


def parse_line(untrusted_line: bytes) -> Message:
    """One line (without its newline) from a guest.

    :raises ChannelError: anything but exactly a known message.
    """
    if len(untrusted_line) >= MAX_LINE:
        raise ChannelError(f"a line of {len(untrusted_line)} bytes (at most {MAX_LINE - 1})")
    if (m := _READY.fullmatch(untrusted_line)) is not None:
        return Ready(m.group(1).decode("ascii"))
    if (m := _HEARTBEAT.fullmatch(untrusted_line)) is not None:
        return Heartbeat(int(m.group(1)))
    if (m := _INSTALL_REQUEST.fullmatch(untrusted_line)) is not None:
        return InstallRequest(m.group(1).decode("ascii"))
    if (m := _office.STATE.fullmatch(untrusted_line)) is not None:
        return WorkerState(m.group(1).decode("ascii"))
    if (m := _office.ACTIVITY.fullmatch(untrusted_line)) is not None:
        return Activity(m.group(1).decode("ascii"), m.group(2).decode("ascii"))
    if (m := _office.PROBLEM.fullmatch(untrusted_line)) is not None:
        return Problem(m.group(1).decode("ascii"))
    if not untrusted_line.startswith(PROTOCOL.encode() + b" "):
        raise ChannelError("not a xenubuntu1 message")
    raise ChannelError("an unknown or malformed xenubuntu1 message")


class ChannelReader:
    """Reads one guest's channel socket in a thread: readiness and heartbeats.

    The socket is QEMU's (a chardev server); the reader connects when it appears
    and reconnects if QEMU drops it. ``flavour`` is the name the guest must say
    it is ready as. ``on_message`` hears every accepted message (in the reader's
    thread); it refuses one by raising :class:`ChannelError`. :meth:`send` answers
    the guest. Call :meth:`close` when the guest ends.
    """

    def __init__(self, name: str, socket_path: Path, flavour: str,
                 on_message: Callable[[Message], None] | None = None):
        self.name = name
        self.socket_path = socket_path
        self.flavour = flavour
        self.on_message = on_message
        self.ready = threading.Event()
        self.last_seq = 0
        self.last_at = 0.0          # time.time() of the last heartbeat
        self.first_at = 0.0         # ... and of the first: when a restored guest answered again
        self.heartbeats = 0
        self.refused = 0
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"channel-{name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(2.0)

    def send(self, line: bytes) -> bool:
        """Write one line to the guest, never waiting: a guest that does not read its port
        must not hold up dom0 (the line is dropped). False when it was not written."""
        sock = self._sock
        if sock is None:
            return False
        try:
            with self._send_lock:
                sent = sock.send(line, socket.MSG_DONTWAIT)
        except OSError as e:  # BlockingIOError too: the guest's side is full
            log.debug("%s: cannot write to the guest channel: %s", self.name, e)
            return False
        if sent != len(line):
            log.warning("%s: the guest channel took %d of %d bytes of a line", self.name, sent, len(line),
                        extra={"SESSION": self.name})
            return False
        return True

    # -- waiting -------------------------------------------------------------------
    def wait_ready(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            if time.monotonic() >= deadline or not alive() or self._closed.is_set():
                return False
        return True

    def wait_heartbeat(self, after_seq: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> int | None:
        """The first heartbeat numbered above ``after_seq``; None on timeout or death."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.last_seq <= after_seq:
                left = deadline - time.monotonic()
                if left <= 0 or not alive() or self._closed.is_set():
                    return None
                self._changed.wait(min(left, 0.2))
            return self.last_seq

    # -- reading (thread) ------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(str(self.socket_path))
                    self._sock = sock
                    self._read(sock)
            except OSError:
                pass
            finally:
                self._sock = None
            self._closed.wait(0.1)

    def _read(self, sock: socket.socket) -> None:
        pending = b""
        window_start, in_window = time.monotonic(), 0
        while not self._closed.is_set():
            data = sock.recv(4096)
            if not data:
                return
            pending += data
            *lines, pending = pending.split(b"\n")
            if len(pending) >= MAX_LINE:  # no newline in sight: refuse and resynchronise
                self._refuse(pending[:40], f"a line longer than {MAX_LINE} bytes")
                pending = b""
            for line in lines:
                now = time.monotonic()
                if now - window_start >= 1.0:
                    window_start, in_window = now, 0
                in_window += 1
                if in_window > MAX_LINES_PER_S:
                    self.refused += 1
                    if in_window == MAX_LINES_PER_S + 1:
                        log.warning("%s: the guest floods its channel; the rest of this second is dropped",
                                    self.name, extra={"SESSION": self.name})
                    continue
                self._handle(line)

    def _handle(self, untrusted_line: bytes) -> None:
        try:
            message = parse_line(untrusted_line)
        except ChannelError as e:
            self._refuse(untrusted_line[:40], str(e))
            return
        if isinstance(message, Ready):
            if message.flavour != self.flavour:
                self._refuse(untrusted_line[:40], f"ready as {message.flavour!r}, not {self.flavour!r}")
                return
            self.ready.set()
        elif isinstance(message, Heartbeat):
            with self._changed:
                self.last_seq = message.seq
                self.last_at = time.time()
                self.first_at = self.first_at or self.last_at
                self.heartbeats += 1
                self._changed.notify_all()
        if self.on_message is not None:
            try:
                self.on_message(message)
            except ChannelError as e:
                self._refuse(untrusted_line[:40], str(e))

    def _refuse(self, excerpt: bytes, why: str) -> None:
        self.refused += 1
        level = logging.WARNING if self.refused <= 3 else logging.DEBUG  # a flood must not flood the journal
        log.log(level, "%s: refused a line from the guest (%s): %r", self.name, why, excerpt,
                extra={"SESSION": self.name})
