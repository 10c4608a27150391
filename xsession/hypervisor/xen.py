"""Xen backend: sessions are Xen domains, statefiles are ``xl save`` images.

An xl save image has no checksum and no compression of its own, so the
manager never lets xl read the medium: :class:`~xsession.statefile.Feeder`
reads the file once and pipes it through ``zstd -dc`` into a (widened) pipe
that ``xl restore -p`` reads as ``/proc/self/fd/N``. The domain is restored
**paused**; it is unpaused only when the feed reports the image whole and
true. Otherwise the paused domain is destroyed and :class:`StatefileCorrupt`
raised, so the engine can cold-boot the flavour instead.

Whole and true means: exactly the recorded number of bytes read, and zstd's
verdict, which covers every decoded byte with the frame's content checksum and
the decoded length with the frame's content size, when the frame header
promises both and the size is the manifest's ``raw_size`` (as mastering writes
it); otherwise the sha256 of the file as well. Dom0 usually has one vCPU, on
which hashing, decompression and xl's own reading take turns: a sha256 pass
that repeats what zstd proves costs restore time for nothing. zstd and xl run
as batch tasks there, so neither preempts the other at every write into the
pipe; the device model xl starts gets the normal policy back.

The domain's id and the unpause come from xenstore and libxenctrl in process
(:mod:`.xenctl`): each ``xl`` call costs dom0 a libxl set-up on the same vCPU.

The guest's PV console is read from xenconsoled's log
(``/var/log/xen/console/guest-NAME.log``, written when xenconsoled runs with
``--log=guest``, i.e. ``XENCONSOLED_TRACE=guest`` in ``/etc/default/xen``), or
else through an ``xl console`` process whose output goes to
``RUNDIR/console.log``. A watcher polls ``xl list`` and calls the exit
callback when the domain disappears, crashes or shuts down without being asked.

Domain names are flavour names; a domain is addressed by its id once known,
so a replacement with the same name is never paused or destroyed by mistake.

A flavour with a screen gets a PV framebuffer, and one with a guest channel a
PV channel; Xen's device model (QEMU in dom0) serves both on sockets in the
session's run folder (``vnc.sock``, ``guest.sock``), as QEMU's sessions have.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import HypervisorError, MediumUnavailable, NetworkError, StatefileCorrupt
from ..guestchannel import PORT_NAME as CHANNEL_PORT
from ..guestchannel import ChannelReader
from ..netplan import guest_mac
from ..screen import Picture
from ..manifest import Flavour, MachineConfig, Manifest, StatePart
from ..statefile import Feeder, batch_scheduling, precheck, sha256_of, widen_pipe, zstd_checks_suffice
from . import rfb, xl
from .xenctl import Unavailable, XenControl
from .console import wait_for_text
from .base import ExitCallback, HostMemory, Progress, ScreenCache

__all__ = ["XenBackend", "XenGuest", "xl_settings", "CONSOLE_LOG_DIR", "console_log_dir_from_config"]

log = logging.getLogger(__name__)

#: where xenconsoled writes guest consoles with --log=guest (Debian's default --log-dir)
CONSOLE_LOG_DIR = Path("/var/log/xen/console")
#: a restore gets this long plus the time to move its raw image at RESTORE_BYTES_PER_S
RESTORE_BASE_TIMEOUT_S = 60.0
RESTORE_BYTES_PER_S = 8 * 1024 * 1024  # pessimistic: a DVD under an emulated CPU
#: Xen's bookkeeping per domain beyond its RAM (struct domain, vCPU pages, xenstore and console rings)
DOMAIN_BASE_OVERHEAD_MIB = 2
#: Xen's device model (QEMU in dom0) of a domain with a screen or a channel: 24 MiB resident
#: measured in the test host's dom0 (tests/xen: the "display" step), rounded up
DEVICE_MODEL_MIB = 32
#: how often the watcher asks xl whether a domain is still there
POLL_S = 1.0


def console_log_dir_from_config(defaults: Path = Path("/etc/default/xen")) -> Path | None:
    """Where xenconsoled logs guest consoles, or None when it does not (``XENCONSOLED_TRACE``)."""
    trace = os.environ.get("XENCONSOLED_TRACE")
    if trace is None:
        try:
            for line in defaults.read_text(encoding="utf-8").splitlines():
                key, sep, value = line.strip().partition("=")
                if sep and key == "XENCONSOLED_TRACE":
                    trace = value.strip().strip("\"'")
        except OSError:
            trace = None
    return CONSOLE_LOG_DIR if trace in ("guest", "all") else None


def cpuid_of(machine: MachineConfig) -> str | None:
    """The xl ``cpuid`` policy of a machine: ``cpu`` holds it for Xen.

    ``host`` (and the manifest's QEMU-minded default ``qemu64``) mean Xen's default
    policy. Under an emulated CPU, PVH guests need ``host,rdtscp=0,avx=0``.
    """
    return None if machine.cpu in ("host", "qemu64", "") else machine.cpu


#: the VNC server of a domain's PV framebuffer: a unix socket in its run folder, as QEMU's
DISPLAY_SOCKET = "vnc.sock"
#: the guest channel: a PV channel (a second PV console in the guest, named
#: ``org.xenubuntu.guest.0``) that Xen's device model serves on this socket, as QEMU's
CHANNEL_SOCKET = "guest.sock"
CHANNEL_PLACEHOLDER = "org.xenubuntu.placeholder"


def display_socket(flavour: Flavour, rundir: Path) -> Path | None:
    """Where the flavour's screen is served, or None for a domain without one (``vga: none``)."""
    return None if flavour.machine.vga == "none" else rundir / DISPLAY_SOCKET


def xl_settings(flavour: Flavour, manifest: Manifest, rundir: Path | None = None
                ) -> dict[str, str | int | list[str]]:
    """The xl configuration of a flavour's domain, for create and for restore.

    A restore uses the same file as a cold boot: the guest-visible part
    (type, memory, vCPUs, CPUID) must be the one the image was saved with, and
    a reboot ends the domain (the manager decides what comes next, as QEMU's
    ``-no-reboot``); a crash keeps it for inspection and is reported.

    A flavour with a screen (``vga`` other than ``none``) gets a PV framebuffer and
    keyboard (``vfb``, which brings a ``vkb``): Xen's device model (QEMU in dom0)
    serves it over VNC on a unix socket in ``rundir``, as QEMU's own sessions do. It
    is a backend in dom0, outside the saved state: a restore starts a new one.
    """
    m = flavour.machine
    if m.machine_type not in ("pv", "pvh"):
        raise HypervisorError(f"configure {flavour.name}",
                              f"machine_type {m.machine_type!r} is not a Xen domain type (pv or pvh)")
    cb = flavour.cold_boot
    settings: dict[str, str | int | list[str]] = {
        "name": flavour.name,
        "type": m.machine_type,
        "kernel": str(manifest.resolve(cb.kernel)),
        "ramdisk": str(manifest.resolve(cb.initrd)),
        "extra": cb.cmdline,
        "memory": m.memory_mib,
        "maxmem": m.memory_mib,
        "vcpus": m.vcpus,
        "on_poweroff": "destroy",
        "on_reboot": "destroy",
        "on_crash": "preserve",
    }
    cpuid = cpuid_of(m)
    if cpuid:
        settings["cpuid"] = cpuid
    if m.nic == "internal":
        # the NIC is part of the saved domain, plugged or not: Xen's own hotplug script is
        # not run (it wants bash and a bridge of its own making); the manager puts the vif
        # on dom0's bridge itself (XenBackend._plug), as it does a QEMU session's tap
        settings["vif"] = [f"mac={guest_mac(flavour.name)},script={VIF_SCRIPT}"]
    if rundir is None:
        return settings
    # xl splits a device's settings at commas; a unix socket's path has a length limit
    if "," in str(rundir) or len(str(rundir / DISPLAY_SOCKET)) > 100:
        raise HypervisorError(f"configure {flavour.name}",
                              f"the run folder {rundir} has a comma or is too long for its sockets")
    sock = display_socket(flavour, rundir)
    if sock is not None:
        settings["vfb"] = [f"vnc=1,vncunused=0,vnclisten=unix:{sock}"]  # no port range: a socket
    if m.guest_channel:
        # xl numbers channels from 0, and libxl refuses a channel numbered 0 (the primary
        # console's number) without a word but a log line: a placeholder takes that number
        # and is dropped, so ours is console 1, the guest's /dev/hvc1 (Xen 4.17, as tested)
        settings["channel"] = [f"name={CHANNEL_PLACEHOLDER},connection=pty",
                               f"name={CHANNEL_PORT},connection=socket,path={rundir / CHANNEL_SOCKET}"]
    return settings


#: the vif's hotplug script: none (the manager plugs the vif into the bridge itself)
VIF_SCRIPT = "/bin/true"


class XenGuest:
    """One domain of a session: pause, resume, stop, its console, and a watcher.

    Made by :class:`XenBackend` (restore, cold boot, adoption), not directly.
    """

    def __init__(self, name: str, domid: int, rundir: Path, console_log: Path, *, xl_path: str = xl.XL,
                 console_proc: subprocess.Popen[bytes] | None = None, poll_s: float = POLL_S,
                 display: Path | None = None):
        self.name = name
        self.domid = domid
        self.rundir = rundir
        self.console_log = console_log
        #: the VNC socket of its PV framebuffer (served by Xen's device model), if it has one
        self.display = display
        #: the guest channel's reader, for flavours that have one
        self.channel: ChannelReader | None = None
        self._screen = ScreenCache(self._grab)
        #: console bytes before this guest's life (the log is shared by all domains of the name)
        self.console_start = _size(console_log)
        self._xl = xl_path
        self._console_proc = console_proc  # an `xl console` writing console_log; ended in stop()
        self._poll_s = poll_s
        self._callbacks: list[ExitCallback] = []
        self._stopping = False
        self._exit_reason: str | None = None
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    # -- facts -----------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """None: a domain is no process of dom0 (see :attr:`domid`)."""
        return None

    @property
    def console(self) -> dict[str, str]:
        """How to reach it: its PV console (``xl console``, the log) and its screen (``vnc``), if any."""
        out = {"xen": f"xl console {self.name}", "domid": str(self.domid), "log": str(self.console_log)}
        if self.display is not None:
            out["vnc"] = f"unix:{self.display}"
        return out

    @property
    def exit_reason(self) -> str | None:
        return self._exit_reason

    def state(self) -> xl.ListEntry | None:
        """This domain's ``xl list`` row, or None when it is gone (or replaced).

        :raises XlError: xl failed for another reason than an unknown domain.
        """
        row = xl.domain_exists(str(self.domid), xl=self._xl)
        return row if row is not None and row.name == self.name else None

    def status(self) -> str:
        """``running``, ``paused`` or ``gone``, as ``xl list`` shows the domain.

        :raises XlError: xl failed for another reason than an unknown domain.
        """
        row = self.state()
        if row is None:
            return "gone"
        return "paused" if row.paused else "running"

    def is_alive(self) -> bool:
        if self._exit_reason is not None:
            return False
        try:
            row = self.state()
        except xl.XlError:
            return True  # cannot tell; the watcher reports a lasting failure
        return row is not None and not (row.shutdown or row.crashed or row.dying)

    # -- console -------------------------------------------------------------------
    def read_console(self) -> str:
        """What the guest printed on its PV console in this life."""
        try:
            with open(self.console_log, "rb") as f:
                f.seek(self.console_start)
                return f.read().decode("utf-8", "replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def wait_for_line(self, needle: str, timeout: float, since: int | None = None,
                      aborting: threading.Event | None = None) -> bool:
        """Wait until ``needle`` appears on the console after byte ``since``; False at timeout or death."""
        alive = self.is_alive if aborting is None else (lambda: not aborting.is_set() and self.is_alive())
        return wait_for_text(self.console_log, needle, timeout, alive,
                             start=self.console_start if since is None else since, alive_every=2.0, poll=0.1)

    # -- watching ------------------------------------------------------------------
    def on_exit(self, callback: ExitCallback) -> None:
        """Call ``callback(reason)`` once when the domain ends without being asked to."""
        with self._lock:
            self._callbacks.append(callback)
            reason = self._exit_reason
            if self._watcher is None and reason is None:
                self._watcher = threading.Thread(target=self._watch, name=f"xen-watch-{self.name}", daemon=True)
                self._watcher.start()
        if reason is not None and not self._stopping:
            callback(reason)

    def _watch(self) -> None:
        failures = 0
        while not self._stopping:
            time.sleep(self._poll_s)
            if self._stopping:
                return
            try:
                row = xl.domain_exists(str(self.domid), xl=self._xl)
                failures = 0
            except xl.XlError as e:
                failures += 1
                if failures < 5:
                    continue
                reason = f"xl no longer answers about domain {self.name}: {e}"
            else:
                if row is None or row.name != self.name:
                    reason = f"domain {self.name} (id {self.domid}) was destroyed outside the session manager"
                elif row.crashed:
                    reason = f"domain {self.name} (id {self.domid}) crashed"
                elif row.shutdown or row.dying:
                    reason = f"domain {self.name} (id {self.domid}) shut down by itself"
                else:
                    continue
            self._exited(reason)
            return

    def _exited(self, reason: str) -> None:
        with self._lock:
            if self._exit_reason is not None:
                return
            self._exit_reason = reason
            callbacks = list(self._callbacks)
        self._end_console()
        if self._stopping:
            return
        for cb in callbacks:
            try:
                cb(reason)
            except Exception:  # a callback's failure must not kill the watcher silently
                log.exception("exit callback of %s failed", self.name)

    # -- actions -------------------------------------------------------------------
    def pause(self) -> None:
        """:raises XlError: the domain is gone or xl failed."""
        xl.pause(str(self.domid), xl=self._xl)

    def resume(self) -> None:
        """:raises XlError: the domain is gone or xl failed."""
        xl.unpause(str(self.domid), xl=self._xl)

    def stop(self, timeout: float = 10.0) -> None:
        """Destroy the domain; idempotent, and the exit callback is not called.

        :raises XlError: xl failed to destroy a domain that is still there.
        """
        self._stopping = True
        try:
            if self.state() is not None:
                xl.destroy(str(self.domid), timeout=timeout, xl=self._xl)
        except xl.XlError as e:
            if not xl.is_no_such_domain(e) and self.state() is not None:
                raise
        finally:
            with self._lock:
                if self._exit_reason is None:
                    self._exit_reason = "stopped by the session manager"
            self._end_console()

    def picture(self, max_width: int = 0) -> bytes:
        """The screen now as a PNG, at most ``max_width`` wide (0: full size), read from its
        VNC socket; a new one at most once a second, as QEMU's.

        :raises HypervisorError: the domain has no screen, or its device model did not give one.
        """
        return self._screen.png(max_width)

    def _grab(self) -> Picture:
        if self.display is None:
            raise HypervisorError(f"picture of {self.name}", "the domain has no screen")
        try:
            return rfb.grab(self.display)
        except (OSError, rfb.RfbError) as e:
            raise HypervisorError(f"picture of {self.name}", f"its screen at {self.display}: {e}") from e

    def attach_channel(self, flavour: str) -> None:
        """Read the guest channel (its socket is the device model's); idempotent."""
        if self.channel is None:
            self.channel = ChannelReader(self.name, self.rundir / CHANNEL_SOCKET, flavour)

    def _end_console(self) -> None:
        """Stop reading what the domain says: its console process and its channel."""
        proc, self._console_proc = self._console_proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if self.channel is not None:
            self.channel.close()


class XenBackend:
    """Xen through the ``xl`` toolstack (Debian's Xen 4.17)."""

    name = "xen"

    def __init__(self, *, xl_path: str = xl.XL, console_log_dir: Path | None | str = "auto",
                 poll_s: float = POLL_S):
        """``console_log_dir``: xenconsoled's log folder, None to read consoles through
        ``xl console``, or ``"auto"`` to follow ``XENCONSOLED_TRACE``."""
        self.xl = xl_path
        self.console_log_dir = (console_log_dir_from_config() if console_log_dir == "auto"
                                else None if console_log_dir is None else Path(console_log_dir))
        self.poll_s = poll_s
        self._aborting = threading.Event()
        #: in-process answers where the real xl would be asked (not for another xl binary)
        self._ctl = XenControl() if xl_path == xl.XL else None
        #: dom0's internal network (:class:`xsession.network.InternalNetwork`), when there is
        #: one: a session with an ``internal`` NIC gets its vif put on its bridge
        self.network: Any = None
        #: zstd and ``xl restore`` take turns on dom0's vCPU as batch tasks (see
        #: :func:`~xsession.statefile.batch_scheduling`), a pipe's worth at a time
        self.batch_stream = True

    # -- memory ------------------------------------------------------------------------
    def host_memory(self) -> HostMemory:
        """Total and free memory as Xen accounts it (``xl info``); claimed memory is not free.

        :raises XlError: xl failed.
        """
        i = xl.info(xl=self.xl)
        return HostMemory(total_mib=i.total_memory, free_mib=max(0, i.free_memory - i.outstanding_claims))

    def overhead_mib(self, flavour: Flavour) -> int:
        """Xen's memory per domain beyond its RAM.

        PVH runs on hardware-assisted paging, whose pool libxl sizes as
        4 KiB x (256 per vCPU + 2 per MiB of RAM); PV domains need none. Both
        get :data:`DOMAIN_BASE_OVERHEAD_MIB` for the hypervisor's own structures,
        and a domain with a screen or a channel its device model in dom0
        (:meth:`in_dom0_mib`).
        """
        m = flavour.machine
        paging_kib = 4 * (256 * m.vcpus + 2 * m.memory_mib) if m.machine_type != "pv" else 0
        return DOMAIN_BASE_OVERHEAD_MIB + -(-paging_kib // 1024) + self.in_dom0_mib(flavour)

    def in_dom0_mib(self, flavour: Flavour) -> int:
        """Xen's device model, in dom0, for a domain with a screen or a guest channel."""
        m = flavour.machine
        return DEVICE_MODEL_MIB if m.vga != "none" or m.guest_channel else 0

    def balloon_dom0(self, target_mib: int) -> None:
        """Set dom0's balloon target (``xl mem-set 0``) when the planner gives memory to sessions.

        :raises XlError: Xen or dom0's balloon driver refused the target.
        """
        xl.mem_set("0", target_mib, xl=self.xl)

    def domains(self) -> list[xl.DomainConfig]:
        """Every domain and its configuration (``xl list -l``).

        :raises XlError: xl failed.
        """
        return xl.list_long(xl=self.xl)

    # -- helpers -------------------------------------------------------------------------
    def _domid(self, name: str) -> int | None:
        """The id of the domain called ``name``, or None; xenstore first, xl where it cannot answer.

        :raises XlError: xl failed for another reason than an unknown domain.
        """
        if self._ctl is not None:
            try:
                return self._ctl.domid(name)
            except Unavailable as e:
                log.debug("asking xl instead: %s", e)
        row = xl.domain_exists(name, xl=self.xl)
        return row.domid if row is not None else None

    def _unpause(self, guest: XenGuest) -> None:
        """:raises HypervisorError: Xen or xl refused."""
        if self._ctl is not None:
            try:
                self._ctl.unpause(guest.domid)
                return
            except Unavailable as e:
                log.debug("asking xl instead: %s", e)
            except OSError as e:
                raise HypervisorError(f"unpause {guest.name}", f"Xen refused: {e.strerror or e}") from e
        guest.resume()

    def _prepare(self, flavour: Flavour, manifest: Manifest, rundir: Path) -> Path:
        """A run folder with the domain's xl config; refuses a name already in use."""
        rundir.mkdir(parents=True, exist_ok=True)
        (rundir / "console.log").unlink(missing_ok=True)
        if self._domid(flavour.name) is not None:
            raise HypervisorError(f"start {flavour.name}", f"a domain named {flavour.name} already exists")
        sock = display_socket(flavour, rundir)
        if sock is not None:
            sock.unlink(missing_ok=True)  # the last life's: a client must not find a dead socket
        return xl.write_config(rundir / f"{flavour.name}.cfg", xl_settings(flavour, manifest, rundir))

    def _console_path(self, name: str, rundir: Path) -> Path:
        if self.console_log_dir is not None:
            return self.console_log_dir / f"guest-{name}.log"
        return rundir / "console.log"

    def _attach(self, name: str, rundir: Path, console_start: int | None = None,
                display: Path | None = None) -> XenGuest:
        """A guest object for the domain just made, with its console reader.

        :raises XlError: the domain is not there.
        """
        domid = self._domid(name)
        if domid is None:
            raise xl.XlError([self.xl, "list", name], 1, f"no domain named {name}")
        console_log = self._console_path(name, rundir)
        proc = None
        if self.console_log_dir is None:
            # ended by XenGuest.stop() or when the watcher sees the domain go
            with open(console_log, "ab") as out:
                proc = subprocess.Popen(xl.console_argv(name, xl=self.xl), stdin=subprocess.PIPE, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        guest = XenGuest(name, domid, rundir, console_log, xl_path=self.xl, console_proc=proc,
                         poll_s=self.poll_s, display=display)
        if console_start is not None:
            guest.console_start = console_start
        return guest

    def _destroy_quietly(self, name: str) -> None:
        try:
            if xl.domain_exists(name, xl=self.xl) is not None:
                xl.destroy(name, xl=self.xl)
        except xl.XlError as e:
            log.warning("could not destroy %s after a failed start: %s", name, e)

    # -- restore -------------------------------------------------------------------------
    def preload_parts(self, flavour: Flavour) -> tuple[StatePart, ...]:
        """The xl save image: a Xen restore reads it whole."""
        assert flavour.statefile is not None
        return (flavour.statefile,)

    def restore(self, flavour: Flavour, manifest: Manifest, rundir: Path, progress: Progress,
                sources: Sequence[Path] | None = None) -> XenGuest:
        """Restore the flavour's xl save image: paused, checked, then unpaused.

        :raises StatefileCorrupt: size, zstd or sha256 check failed (the paused domain is destroyed).
        :raises MediumUnavailable: the statefile could not be read.
        :raises HypervisorError: xl refused the image (not enough memory, say); xl's words included.
        """
        sf = flavour.statefile
        if sf is None:
            raise StatefileCorrupt(flavour.name, "the flavour has no statefile")
        path = sources[0] if sources else manifest.resolve(sf.path)
        precheck(path, sf, manifest.root)
        config = self._prepare(flavour, manifest, rundir)
        console_start = _size(self._console_path(flavour.name, rundir))
        timeout = RESTORE_BASE_TIMEOUT_S + sf.raw_size / RESTORE_BYTES_PER_S
        read_fd, write_fd = os.pipe()
        widen_pipe(write_fd)  # zstd writes and xl reads a MiB per turn on dom0's vCPU, not 64 KiB
        feeder = Feeder(path, sf, write_fd, progress,  # closes write_fd, always
                        verify_sha256=not zstd_checks_suffice(path, sf), batch=self.batch_stream)
        feeder.start()
        try:
            # xl opens the pipe by name; /proc/self/fd works where /dev/fd is missing
            xl.restore(f"/proc/self/fd/{read_fd}", config, paused=True, pass_fds=(read_fd,), timeout=timeout,
                       xl=self.xl, on_start=batch_scheduling if self.batch_stream else None)
        except xl.XlError as e:
            os.close(read_fd)  # the feeder keeps hashing to the end: its verdict says whom to blame
            self._destroy_quietly(flavour.name)
            self._raise_if_image_bad(path, sf.sha256, feeder, timeout)
            raise HypervisorError(f"restore {flavour.name}", f"xl restore failed: {e.why}", e.stderr) from e
        except BaseException:
            os.close(read_fd)
            feeder.cancel()
            self._destroy_quietly(flavour.name)
            raise
        os.close(read_fd)
        try:
            result = feeder.result(timeout)
        except TimeoutError as e:
            self._destroy_quietly(flavour.name)
            raise HypervisorError(f"restore {flavour.name}", f"watchdog: {e}") from None
        if result.medium_error is not None or result.problem is not None:
            self._destroy_quietly(flavour.name)
            if result.medium_error is not None:
                raise MediumUnavailable(str(path), f"reading the statefile failed: {result.medium_error}")
            raise StatefileCorrupt(str(path), result.problem or "")
        try:
            guest = self._attach(flavour.name, rundir, console_start, display_socket(flavour, rundir))
            if flavour.machine.guest_channel:
                guest.attach_channel(flavour.name)
            self._plug(flavour, guest)
            if self.batch_stream:
                self._device_model_at_normal_policy(guest)
            self._unpause(guest)
        except BaseException:
            self._destroy_quietly(flavour.name)
            raise
        return guest

    def _device_model_at_normal_policy(self, guest: XenGuest) -> None:
        """The device model (which serves the screen and the channel) was started by the
        batch ``xl restore`` and so inherited its policy: it gets the normal one back, so a
        key press or a screen update wakes it at once. Best effort: it says what failed."""
        key = f"/local/domain/{guest.domid}/image/device-model-pid"
        try:
            if self._ctl is not None:
                value = self._ctl.read(key)
            else:
                done = subprocess.run(["xenstore-read", key], capture_output=True, timeout=10)
                value = done.stdout.strip() if done.returncode == 0 else None
            if value is None:
                return  # no device model: no screen and no channel
            os.sched_setscheduler(int(value), os.SCHED_OTHER, os.sched_param(0))
        except (Unavailable, OSError, ValueError, subprocess.TimeoutExpired) as e:
            log.warning("%s: its device model keeps the batch policy: %s", guest.name, e,
                        extra={"SESSION": guest.name})

    def _plug(self, flavour: Flavour, guest: XenGuest) -> None:
        """Put the domain's vif (Xen's backend names it ``vifDOMID.0``) on dom0's bridge, before
        the domain runs: its first packet finds the bridge. Without a network, or when that
        fails, the session runs unplugged and says why."""
        if flavour.machine.nic != "internal" or self.network is None:
            return
        try:
            self.network.plug(flavour.name, f"vif{guest.domid}.0")
        except NetworkError as e:
            log.warning("%s: runs without the internal network: %s", flavour.name, e,
                        extra={"SESSION": flavour.name})

    @staticmethod
    def _raise_if_image_bad(path: Path, sha256: str, feeder: Feeder, timeout: float) -> None:
        """After xl failed: blame the image if the feed (or, failing that, a re-hash) says it is bad.

        :raises StatefileCorrupt: the image is not the one the manifest describes.
        :raises MediumUnavailable: it cannot be read to tell.
        """
        try:
            result = feeder.result(timeout)
        except TimeoutError:
            result = None
        if result is not None:
            if result.medium_error is not None:
                raise MediumUnavailable(str(path), f"reading the statefile failed: {result.medium_error}")
            if result.problem is not None:
                raise StatefileCorrupt(str(path), result.problem)
            return
        try:
            digest = sha256_of(path)
        except OSError as e:
            raise MediumUnavailable(str(path), e.strerror or str(e)) from e
        if digest != sha256:
            raise StatefileCorrupt(str(path), f"sha256 mismatch: got {digest[:16]}..., expected {sha256[:16]}...")

    # -- cold boot ---------------------------------------------------------------------------
    def cold_boot(self, flavour: Flavour, manifest: Manifest, rundir: Path) -> XenGuest:
        """``xl create`` the flavour; returns once its ready line is on the console.

        :raises MediumUnavailable: the kernel or initrd is missing.
        :raises HypervisorError: xl refused, the domain died, or it was not ready in time.
        """
        cb = flavour.cold_boot
        for rel in (cb.kernel, cb.initrd):
            if rel is None:
                raise MediumUnavailable(flavour.name, "a Xen flavour needs a kernel and an initrd to boot")
            if not manifest.resolve(rel).is_file():
                raise MediumUnavailable(str(manifest.resolve(rel)), "needed for a cold boot but missing")
        config = self._prepare(flavour, manifest, rundir)
        console_start = _size(self._console_path(flavour.name, rundir))
        try:
            xl.create(config, paused=True, xl=self.xl)
            guest = self._attach(flavour.name, rundir, console_start, display_socket(flavour, rundir))
            if flavour.machine.guest_channel:
                guest.attach_channel(flavour.name)
            self._plug(flavour, guest)
            self._unpause(guest)
        except xl.XlError as e:
            self._destroy_quietly(flavour.name)
            raise HypervisorError(f"cold boot {flavour.name}", f"xl create failed: {e.why}", e.stderr) from e
        except BaseException:
            self._destroy_quietly(flavour.name)
            raise
        try:
            if not guest.wait_for_line(cb.ready_line, cb.timeout_s, aborting=self._aborting):
                why = ("cancelled: the manager is shutting down" if self._aborting.is_set()
                       else "the domain ended" if not guest.is_alive() else f"not ready within {cb.timeout_s:.0f} s")
                raise HypervisorError(f"cold boot {flavour.name}", f"{why} (no {cb.ready_line!r} on its console)",
                                      guest.read_console()[-2000:])
        except BaseException:
            guest.stop()
            raise
        return guest

    def abort(self) -> None:
        """Cold boots in flight stop waiting and end their domain (the manager is shutting down)."""
        self._aborting.set()

    # -- adoption ------------------------------------------------------------------------------
    def adopt(self, name: str, rundir: Path) -> XenGuest | None:
        """Take over a domain a previous manager left running; None when there is none to take.

        :raises XlError: xl failed for another reason than an unknown domain.
        """
        row = xl.domain_exists(name, xl=self.xl)
        if row is None or row.shutdown or row.crashed or row.dying:
            return None
        rundir.mkdir(parents=True, exist_ok=True)
        sock = rundir / DISPLAY_SOCKET
        guest = self._attach(name, rundir, display=sock if sock.is_socket() else None)
        guest.console_start = _size(guest.console_log)
        if (rundir / CHANNEL_SOCKET).is_socket():
            guest.attach_channel(name)
        return guest

    # -- saving (mastering) ----------------------------------------------------------------------
    def save(self, guest: XenGuest, image: Path, timeout: float = xl.SLOW) -> int:
        """``xl save`` the guest to ``image`` (the domain ends); returns the image's size.

        :raises XlError: xl failed (no room for the image, say).
        """
        guest._stopping = True  # the domain goes away on purpose
        try:
            xl.save(str(guest.domid), image, timeout=timeout, xl=self.xl)
        finally:
            guest._end_console()
        return image.stat().st_size


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0

