"""systemd's notify protocol (``READY=1``, ``STATUS=...``), never blocking the caller.

``sd_notify`` from libsystemd sends on a blocking socket: once nobody reads the
notify socket (a supervisor that stopped reading after ``READY=1``, a full
queue of 10 datagrams), each call waits, and a daemon that reports its status
from its main loop freezes for good. systemd itself does not promise delivery,
so a status message that does not fit is dropped: the next one says more.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    """Sends to ``$NOTIFY_SOCKET`` without ever blocking; a no-op when it is unset."""

    def __init__(self, address: str | None = None):
        address = os.environ.get("NOTIFY_SOCKET", "") if address is None else address
        if address.startswith("@"):  # the abstract namespace
            address = "\0" + address[1:]
        self.address = address
        self.dropped = 0
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)

    def notify(self, text: str) -> bool:
        """Send ``text``; False when it was dropped (no listener, a full queue)."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto(text.encode("utf-8", "replace"), socket.MSG_DONTWAIT, self.address)
            return True
        except OSError as e:  # EAGAIN: nobody reads; ECONNREFUSED/ENOENT: nobody listens
            self.dropped += 1
            log.log(logging.DEBUG if self.dropped > 1 else logging.WARNING,
                    "status message to the service manager dropped (%s)", e.strerror or e)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
