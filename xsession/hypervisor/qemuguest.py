"""A QEMU process of one session: its monitor (QMP), exit watching, pause, resume, stop.

:class:`~xsession.hypervisor.qemu.QemuBackend` launches or adopts these; what a
guest is made of (its command line, its statefile) is the backend's concern, what
it does while it runs is this module's.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import HypervisorError
from ..guestchannel import ChannelReader
from ..screen import Picture, read_ppm
from .base import ExitCallback, ScreenCache
from .qga import GuestAgent
from .qmp import QMP

__all__ = ["QemuGuest", "AGENT_TIMEOUT_S", "EVENT_GRACE_S"]

log = logging.getLogger(__name__)

#: how long an exit waits for the SHUTDOWN event that explains it
EVENT_GRACE_S = 1.0
#: the guest agent answers at once when it runs; longer means it does not
AGENT_TIMEOUT_S = 5.0

_SHUTDOWN_REASONS = {
    "guest-reset": "the guest reset itself (a restore that reboots is a damaged state); QEMU ended it",
    "guest-shutdown": "the guest powered itself off",
    "guest-panic": "the guest kernel panicked",
    "host-signal": "QEMU was killed by a signal",
    "host-qmp-quit": "QEMU was told to quit by someone else",
    "host-error": "QEMU hit an error",
}


class QemuGuest:
    """A QEMU process of one session: QMP, exit watching, pause/resume/stop.

    Not created directly: :class:`QemuBackend` launches or adopts them.
    """

    def __init__(self, name: str, rundir: Path, proc: subprocess.Popen[bytes] | None, pid: int):
        self.name = name
        self.rundir = rundir
        self._proc = proc  # our child: reaped by the watcher; None when adopted
        self._pid = pid
        self._exit_callbacks: list[ExitCallback] = []
        self._stopping = False
        self._exited = threading.Event()
        self._exit_reason: str | None = None
        self._event_reason: str | None = None
        self._event_seen = threading.Event()
        self.qmp = QMP(name, rundir / "qmp.sock", self._on_event)
        #: the guest channel's reader, for flavours that have one
        self.channel: ChannelReader | None = None
        #: what happened after a restore that a person should know (the clock, the network)
        self.note = ""
        #: restored from its RAM image mapped copy-on-write (:mod:`.lazyram`), not the stream
        self.restored_lazily = False
        self._screen = ScreenCache(self.screendump)
        self._watcher = threading.Thread(target=self._watch, name=f"watch-{name}", daemon=True)
        self._watcher.start()

    def attach_channel(self, flavour: str) -> None:
        """Read the guest channel (its socket is QEMU's); idempotent."""
        if self.channel is None:
            self.channel = ChannelReader(self.name, self.rundir / "guest.sock", flavour)

    def agent(self, timeout: float = AGENT_TIMEOUT_S) -> GuestAgent:
        """A conversation with the guest's agent (connect it with ``with``)."""
        return GuestAgent(self.rundir / "qga.sock", timeout)

    def picture(self, max_width: int = 0) -> bytes:
        """The screen now as a PNG, at most ``max_width`` wide (0: full size); a new one at
        most once a second (front-ends may ask often, a screendump costs QEMU a frame)."""
        return self._screen.png(max_width)

    def screendump(self) -> Picture:
        """The guest's display now. :raises HypervisorError: QEMU could not take it."""
        path = self.rundir / "screen.ppm"
        self.qmp.execute("screendump", {"filename": str(path)})
        try:
            return read_ppm(path.read_bytes())
        except (OSError, ValueError) as e:
            raise HypervisorError(f"screendump {self.name}", str(e)) from e
        finally:
            path.unlink(missing_ok=True)

    # -- facts -------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def console(self) -> dict[str, str]:
        return {
            "vnc": f"unix:{self.rundir / 'vnc.sock'}",
            "serial": str(self.rundir / "serial.sock"),
            "log": str(self.rundir / "console.log"),
        }

    def is_alive(self) -> bool:
        return not self._exited.is_set()

    @property
    def exit_reason(self) -> str | None:
        return self._exit_reason

    def on_exit(self, callback: ExitCallback) -> None:
        self._exit_callbacks.append(callback)
        if self._exited.is_set() and not self._stopping:
            callback(self._exit_reason or "QEMU exited")

    # -- watching ------------------------------------------------------------
    def _on_event(self, event: str, data: dict[str, Any]) -> None:
        if event == "SHUTDOWN":
            reason = str(data.get("reason", ""))
            self._event_reason = _SHUTDOWN_REASONS.get(reason, f"the guest shut down ({reason})")
        elif event == "RESET" and data.get("guest", True):
            self._event_reason = _SHUTDOWN_REASONS["guest-reset"]
        elif event == "GUEST_PANICKED":
            self._event_reason = _SHUTDOWN_REASONS["guest-panic"]
        if self._event_reason is not None:
            self._event_seen.set()

    def _watch(self) -> None:
        status: int | None
        if self._proc is not None:
            status = self._proc.wait()
        else:
            status = _wait_foreign(self._pid)
        if status is None or status == 0:
            # QEMU sends SHUTDOWN before it exits, but the event is handled on the QMP
            # thread, which may lag behind this one: give it a moment to say why
            self._event_seen.wait(EVENT_GRACE_S if not self._stopping else 0)
        reason = self._event_reason
        if reason is None:
            if status is None:
                # not our child (adopted from an earlier manager): its status cannot be read
                reason = "QEMU ended without a word (adopted, so its exit status is unknown: killed or crashed)"
            elif status < 0:
                reason = f"QEMU was killed by signal {-status} ({_signal_name(-status)})"
            else:
                reason = f"QEMU exited with status {status}"
            tail = self.log_tail(3)
            if tail:
                reason += f": {tail}"
        self._exit_reason = reason
        self._exited.set()
        if self.channel is not None:
            self.channel.close()
        if not self._stopping:
            self.qmp.close()  # frees its task on the shared QMP loop
            for cb in list(self._exit_callbacks):
                try:
                    cb(reason)
                except Exception:
                    log.exception("exit callback of %s failed", self.name)

    def log_tail(self, lines: int = 1) -> str:
        try:
            text = (self.rundir / "qemu.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def wait_exit(self, timeout: float) -> bool:
        return self._exited.wait(timeout)

    # -- control -------------------------------------------------------------
    def connect(self, timeout: float) -> None:
        self.qmp.connect(timeout, alive=self.is_alive)

    def status(self, timeout: float = 5.0) -> str:
        return str(self.qmp.execute("query-status", timeout=timeout)["status"])

    def pause(self) -> None:
        self.qmp.execute("stop")

    def resume(self) -> None:
        self.qmp.execute("cont")

    def stop(self, timeout: float = 10.0) -> None:
        """Quit QEMU (kill it if it does not go in time); idempotent."""
        self._stopping = True
        if self.is_alive():
            try:
                self.qmp.execute("quit", timeout=min(timeout, 3.0))
            except HypervisorError:
                pass  # dead or hung monitor: killed below
            if not self._exited.wait(timeout):
                try:
                    os.kill(self._pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._exited.wait(5.0)
        self.qmp.close()

    def detach(self) -> None:
        """Forget the guest without stopping it (the manager exits, the guest stays)."""
        self._stopping = True
        self.qmp.close()
        if self.channel is not None:
            self.channel.close()

    def write_record(self, argv: list[str], mode: str) -> None:
        """What a restarted manager needs to adopt this guest."""
        record = {"name": self.name, "pid": self._pid, "mode": mode, "argv": argv, "started": time.time()}
        tmp = self.rundir / "guest.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.rundir / "guest.json")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "an unnamed signal"


def _wait_foreign(pid: int) -> int | None:
    """Wait for a process that is not our child (an adopted guest)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)
    return None
