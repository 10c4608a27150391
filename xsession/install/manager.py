"""Ties the install to the rest of the manager: guests' requests from the engine's
channels become jobs, jobs' states go back to the guest that asked, and a
confirmed job runs the installer over the flavour as it is on the medium.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pyudev

from ..diskchain import check_chain
from ..engine import Engine
from ..errors import MediumUnavailable, XSessionError
from ..guestchannel import ChannelError, InstallRequest
from ..hardware import MediumInfo, parse_meminfo
from . import installer, targets
from .errors import InstallFailed
from .jobs import Jobs, JobState, JobView, Report
from .protocol import reply_line

__all__ = ["InstallManager"]

log = logging.getLogger(__name__)


def _virtual_size(image: Path) -> int:
    """The bytes of a disk image once raw (``qemu-img info``).

    :raises MediumUnavailable: it cannot be read.
    """
    try:
        done = subprocess.run(["qemu-img", "info", "--output=json", str(image)], capture_output=True, text=True,
                              timeout=60, check=True)
        return int(json.loads(done.stdout)["virtual-size"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
        raise MediumUnavailable(str(image), f"cannot read the flavour's disk image: {e}") from e


class InstallManager:
    """The install side of one engine. ``medium`` is the live medium (never a target)."""

    def __init__(self, engine: Engine, medium: Callable[[], MediumInfo | None],
                 proc: Path = Path("/proc")):
        self.engine = engine
        self.medium = medium
        self.proc = proc
        self.jobs = Jobs(self._run)
        #: tests cancel halfway with it: called before each step of an install
        self.step_hook: Callable[[installer.Step], None] | None = None
        engine.listen_guests(self._on_guest_message)
        self.jobs.subscribe(self._tell_guest)

    # -- guests ---------------------------------------------------------------------------
    def _on_guest_message(self, session: str, message: object) -> None:
        """A channel's thread: an install request (the session is the channel's own)."""
        if isinstance(message, InstallRequest):
            try:
                try:
                    self.source(session)  # a flavour that cannot be installed is refused at once
                except XSessionError as e:
                    raise ChannelError(f"an install request: {e}") from None
                self.jobs.request(session, self.engine.session(session).name, message.request_id)
            except ChannelError:  # refused (and counted by the channel); the guest hears so
                channel = self.engine.channel(session)
                if channel is not None:
                    channel.send(reply_line(message.request_id, "refused"))
                raise

    def _tell_guest(self, event: str, view: JobView) -> None:
        if event == "removed":
            return
        percent = None
        if view.state is JobState.RUNNING:
            percent = self.jobs.guest_percent_due(view.number)
            if percent is None:
                return
        channel = self.engine.channel(view.session)
        if channel is not None:
            channel.send(reply_line(view.request_id, view.state.value, percent))

    # -- targets ------------------------------------------------------------------------------
    def source(self, flavour: str) -> installer.Source:
        """What installing ``flavour`` copies, from the medium (as mastered: never the
        session's overlay).

        :raises InstallFailed: a flavour this installer cannot copy (a live ISO's).
        :raises MediumUnavailable: its files cannot be read.
        """
        name = self.engine.session(flavour).name  # :raises NoSuchFlavour:
        fl = next(x for x in self.engine.flavours if x.name == name)
        cb = fl.cold_boot
        m = self.engine.manifest
        if cb.kernel is None or cb.initrd is None or fl.source not in ("initrd", "disk") or (
                fl.source == "disk" and fl.disk is None):
            raise InstallFailed("prepare", f"a flavour of source {fl.source!r} without its own kernel cannot be "
                                           "installed (a live ISO's root is its squashfs)",
                                "the disk was not written to")
        source = installer.Source(fl.name, fl.title, m.resolve(cb.kernel), m.resolve(cb.initrd), fl.memory_mib,
                                  cmdline=cb.cmdline)
        if fl.source == "disk":
            assert fl.disk is not None
            image = m.resolve(fl.disk.base)
            check_chain(image, m.root)  # every file qemu-img would open stays on the medium
            source = replace(source, root_image=image, root_image_size=_virtual_size(image))
        return source
    def needed(self, flavour: str) -> int:
        return installer.needed_bytes(self.source(flavour).size())

    def candidates(self, flavour: str) -> list[targets.Disk]:
        return targets.candidates(pyudev.Context(), self.medium(), self.needed(flavour))

    def check_target(self, flavour: str, device: str) -> targets.Disk:
        """:raises TargetRefused: named."""
        return targets.check_target(pyudev.Context(), device, self.medium(), self.needed(flavour))

    # -- the install ------------------------------------------------------------------------------
    def _run(self, job: JobView, target: str, report: Report, cancel: threading.Event) -> None:
        source = self.source(job.flavour)
        disk = self.check_target(job.flavour, target)  # again: a disk may have been mounted since
        total_mib, _ = parse_meminfo((self.proc / "meminfo").read_text())
        installer.check_host(total_mib * 2**20, (self.proc / "cpuinfo").read_text(), source, disk.size)
        installer.run(source, target, installer.new_identity(job.flavour), report, cancel, self.step_hook)
