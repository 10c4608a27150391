"""A small client of QEMU's guest agent (``qemu-guest-agent`` in the guest, Debian's
package): the clock, and commands run in the guest after a restore or before a save.

The protocol is QMP-like JSON over the virtio-serial port ``org.qemu.guest_agent.0``,
whose host end is a socket of QEMU's. ``guest-sync-delimited`` first: the agent
may hold a half-read request from before a save, and its reply, preceded by a
0xFF byte, marks where the fresh conversation starts. A slow agent may answer a
synchronisation asked again after the first was answered: such a late answer (it
starts with that byte too) is passed over, not taken for the next command's.

Replies come from the guest and are untrusted: each is one JSON object of a
bounded size; anything else ends the conversation with :class:`AgentError`.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["AgentError", "GuestAgent", "PORT_NAME"]

PORT_NAME = "org.qemu.guest_agent.0"
MAX_REPLY = 1 << 20


class AgentError(Exception):
    """The guest agent did not answer, or answered with an error or nonsense."""


class GuestAgent:
    """One conversation with a guest's agent; a context manager."""

    def __init__(self, socket_path: Path, timeout: float = 5.0):
        self.socket_path = socket_path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> GuestAgent:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Connect and synchronise. :raises AgentError: no agent answered in time."""
        deadline = time.monotonic() + self.timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.socket_path))
        except OSError as e:
            sock.close()
            raise AgentError(f"cannot reach the guest agent's socket: {e.strerror or e}") from e
        self._sock = sock
        token = random.randrange(1, 1 << 31)
        while True:  # an agent that is not up yet drops the request: ask again
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise AgentError("the guest agent did not answer (is qemu-guest-agent running in the guest?)")
            self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}})
            try:
                reply = self._reply(min(left, 1.0), after_delimiter=True)
            except TimeoutError:
                continue
            if reply.get("return") == token:
                return

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- commands --------------------------------------------------------------------
    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """:raises AgentError: an error reply, no reply in time, or a malformed one."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._send(request)
        try:
            reply = self._reply(timeout or self.timeout)
        except TimeoutError:
            raise AgentError(f"{command}: no answer within {timeout or self.timeout:.0f} s") from None
        if "error" in reply:
            err = reply["error"]
            desc = err.get("desc", err) if isinstance(err, dict) else err
            raise AgentError(f"{command}: {str(desc)[:200]}")
        if "return" not in reply:
            raise AgentError(f"{command}: a reply without a result")
        return reply["return"]

    def run(self, argv: list[str], timeout: float = 30.0) -> tuple[int, bytes, bytes]:
        """Run a command in the guest; its exit status and (bounded) output.

        :raises AgentError: it could not be run, or did not end in time.
        """
        started = self.execute("guest-exec", {"path": argv[0], "arg": argv[1:], "capture-output": True})
        pid = started.get("pid") if isinstance(started, dict) else None
        if not isinstance(pid, int):
            raise AgentError("guest-exec: no pid in the reply")
        deadline = time.monotonic() + timeout
        while True:
            status = self.execute("guest-exec-status", {"pid": pid})
            if not isinstance(status, dict):
                raise AgentError("guest-exec-status: not an object")
            if status.get("exited"):
                code = status.get("exitcode", -1)
                out = _b64(status.get("out-data", ""))
                err = _b64(status.get("err-data", ""))
                return (code if isinstance(code, int) else -1), out, err
            if time.monotonic() >= deadline:
                raise AgentError(f"{argv[0]} did not end within {timeout:.0f} s")
            time.sleep(0.05)

    # -- wire ----------------------------------------------------------------------------
    def _send(self, obj: dict[str, Any]) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(json.dumps(obj).encode() + b"\n")
        except OSError as e:
            raise AgentError(f"cannot write to the guest agent: {e.strerror or e}") from e

    def _reply(self, timeout: float, after_delimiter: bool = False) -> dict[str, Any]:
        assert self._sock is not None
        deadline = time.monotonic() + timeout
        while True:
            if after_delimiter:
                cut = self._buf.rfind(b"\xff")
                if cut >= 0:
                    self._buf = self._buf[cut + 1:]
                    after_delimiter = False
                else:
                    self._buf = b""
            if not after_delimiter and b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if not line.strip() or line.startswith(b"\xff"):
                    continue  # a late answer to a synchronisation that was asked again
                try:
                    reply = json.loads(line)
                except ValueError:
                    raise AgentError("the guest agent sent something that is not JSON") from None
                if not isinstance(reply, dict):
                    raise AgentError("the guest agent sent JSON that is not an object")
                return reply
            if len(self._buf) > MAX_REPLY:
                raise AgentError(f"a reply longer than {MAX_REPLY} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise
            except OSError as e:
                raise AgentError(f"cannot read from the guest agent: {e.strerror or e}") from e
            if not data:
                raise AgentError("the guest agent's socket closed")
            self._buf += data


def _b64(text: object) -> bytes:
    if not isinstance(text, str):
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return b""
