"""A synchronous facade over :mod:`qemu.qmp` for threaded callers.

``qemu.qmp`` is asyncio-based. The manager's engine runs restores in worker
threads and the daemon runs a GLib loop, so all QMP connections share one
asyncio loop in a background thread; every call is submitted to it and waited
for with a timeout. Events are handed to a callback *in the loop's thread*;
the callback must only record or hand off (the daemon uses ``GLib.idle_add``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

try:
    from qemu.qmp import QMPClient, QMPError
except ModuleNotFoundError as e:  # Debian 12 has no package of it
    raise ModuleNotFoundError("the QEMU backend needs the Python module qemu.qmp "
                              "(pip install 'qemu.qmp>=0.0.3')", name=e.name) from e

from ..errors import HypervisorError

__all__ = ["QMP", "QMPError"]

T = TypeVar("T")

# qemu.qmp logs every failed handshake with a traceback; each failure here becomes
# a HypervisorError carrying its reason, so its own log would only repeat it.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
EventCallback = Callable[[str, dict[str, Any]], None]

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _get_loop() -> asyncio.AbstractEventLoop:
    """The one asyncio loop for all QMP connections, started on first use."""
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            loop.set_exception_handler(_quiet_exception)
            t = threading.Thread(target=loop.run_forever, name="qmp-loop", daemon=True)
            t.start()
            _loop = loop
        return _loop


def _quiet_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Unretrieved errors of qemu.qmp's internal tasks (a QEMU that went away):
    the facade already turned them into HypervisorErrors, so one line is enough."""
    logging.getLogger(__name__).debug("QMP loop: %s: %r", context.get("message"), context.get("exception"))


def _run(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    fut = asyncio.run_coroutine_threadsafe(coro, _get_loop())
    try:
        return fut.result(timeout)
    except TimeoutError:
        fut.cancel()
        raise


class QMP:
    """One QMP connection to a QEMU's unix socket."""

    def __init__(self, name: str, socket_path: Path, on_event: EventCallback | None = None):
        self.name = name
        self.socket_path = socket_path
        self.on_event = on_event
        self._client = QMPClient(name)
        self._watch: Any = None

    def connect(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Connect, retrying until QEMU has created its socket.

        :raises HypervisorError: QEMU died first or the deadline passed.
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not alive():
                raise HypervisorError(f"QMP {self.name}", "QEMU exited before its monitor answered")
            if self.socket_path.exists():
                try:
                    _run(self._client.connect(str(self.socket_path)), max(0.5, deadline - time.monotonic()))
                    break
                except (QMPError, OSError, TimeoutError) as e:
                    last = e
                    try:
                        _run(self._client.disconnect(), 2.0)  # frees the failed attempt's tasks
                    except Exception:
                        pass
                    self._client = QMPClient(self.name)
            time.sleep(0.005)
        else:
            raise HypervisorError(f"QMP {self.name}",
                                  f"no monitor on {self.socket_path} within {timeout:.0f} s: {last}")
        if self.on_event is not None:
            self._watch = asyncio.run_coroutine_threadsafe(self._pump_events(), _get_loop())

    async def _pump_events(self) -> None:
        assert self.on_event is not None
        try:
            async for event in self._client.events:
                try:
                    self.on_event(str(event["event"]), dict(event.get("data", {})))
                except Exception:  # a faulty callback must not end the pump
                    pass
        except asyncio.CancelledError:
            pass

    def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """:raises HypervisorError: QEMU refused, disconnected or did not answer in time."""
        try:
            return _run(self._client.execute(cmd, args), timeout)
        except TimeoutError:
            raise HypervisorError(f"QMP {cmd} on {self.name}", f"no answer within {timeout:.0f} s") from None
        except (QMPError, OSError, EOFError) as e:
            raise HypervisorError(f"QMP {cmd} on {self.name}", str(e) or type(e).__name__) from e

    def send_fd(self, fd: int, fdname: str, timeout: float = 10.0) -> None:
        """Pass an open file descriptor to QEMU (SCM_RIGHTS) under ``fdname``.

        :raises HypervisorError: QEMU refused it.
        """
        async def go() -> Any:
            self._client.send_fd_scm(fd)
            return await self._client.execute("getfd", {"fdname": fdname})

        try:
            _run(go(), timeout)
        except (QMPError, OSError, TimeoutError) as e:
            raise HypervisorError(f"QMP getfd on {self.name}", str(e) or type(e).__name__) from e

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        try:
            _run(self._client.disconnect(), 5.0)
        except Exception:  # already gone: nothing left to free
            pass
