"""``xsessiond``: the session manager as a system daemon.

Wiring only: boot options, the medium and its manifest, the hardware, the
memory planner, the engine, the D-Bus objects (:mod:`xsession.bus`), the udev
monitor, systemd's notify protocol and the journal, all on one GLib main loop.

The daemon starts whatever happens to the medium: a medium that is missing or
a manifest that does not validate becomes a ``Warnings`` entry and a ``Medium``
property saying so, and the methods answer ``MediumUnavailable``, so that a
front-end can tell the person why there is nothing to choose.

Guests outlive the daemon (SIGTERM, a crash, an upgrade): on start it adopts
those that still run; ``--stop-guests-on-exit`` (the demo) stops them instead.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gi.repository import Gio, GLib

from . import __version__, memory, restoreway, scheduler, sharing
from .bootopts import DEFAULT_MEDIA, BootOptions, parse_cmdline
from .bus import API_VERSION, BUS_NAME, Authorizer, SessionsService
from .install.dbus import install_service
from .office.dbus import office_service
from .engine import Engine, State
from .errors import MediumUnavailable, XSessionError
from .manifest import MANIFEST_RELPATH, Manifest, load_manifest
from .sdnotify import Notifier
from .sharing import Ksm, SharingDecision

__all__ = ["DaemonConfig", "Daemon", "find_medium_root", "main"]

log = logging.getLogger("xsession.daemon")

DEFAULT_RUNTIME_DIR = Path("/run/xenubuntu")
#: in the runtime folder: held (flock) by the one instance that manages it
LOCK_NAME = "xsessiond.lock"
#: how often the medium's folder is looked at (a stat of one file)
MEDIUM_POLL_S = 1
_DBUS_NAME_FLAG_DO_NOT_QUEUE = 4
_DBUS_PRIMARY_OWNER = 1


@dataclass(frozen=True)
class DaemonConfig:
    cmdline: str
    medium: Path | None = None          # overrides every other way of finding it
    runtime_dir: Path = DEFAULT_RUNTIME_DIR
    stop_guests_on_exit: bool = False
    use_polkit: bool = True
    use_udev: bool = True


def find_medium_root(options: BootOptions, explicit: Path | None = None,
                     env: dict[str, str] | None = None) -> tuple[Path | None, list[str]]:
    """Where the medium is: ``--medium``, the initramfs's ``XENUBUNTU_MEDIUM``,
    ``xenubuntu.medium=``, then ``/cdrom`` and ``/run/live/medium``.

    :returns: the first place that holds a manifest (None if none does) and the places looked at.
    """
    env = os.environ if env is None else env
    if explicit is not None:
        places = [str(explicit)]
    elif env.get("XENUBUNTU_MEDIUM"):
        places = [env["XENUBUNTU_MEDIUM"]]
    elif options.medium:
        places = [options.medium]
    else:
        places = list(DEFAULT_MEDIA)
    for place in places:
        if (Path(place) / MANIFEST_RELPATH).is_file():
            return Path(place), places
    return None, places


def _make_backend(manifest: Manifest) -> Any:
    """The backend the medium was mastered for (a restore needs the same hypervisor)."""
    kinds = {f.backend for f in manifest.flavours}
    if kinds == {"xen"}:
        from .hypervisor.xen import XenBackend
        return XenBackend()
    from .hypervisor.qemu import QEMU_BINARY, QemuBackend
    # XENUBUNTU_QEMU: another QEMU than the system's (one that restores lazily, 8.2 or later)
    return QemuBackend(binary=os.environ.get("XENUBUNTU_QEMU") or QEMU_BINARY)


@dataclass
class _MediumState:
    root: Path | None
    places: list[str]
    problem: MediumUnavailable | None = None
    present: bool = True
    info: dict[str, Any] = field(default_factory=dict)


class Daemon:
    """One run of the daemon; :meth:`run` returns its exit status."""

    def __init__(self, config: DaemonConfig):
        self.config = config
        self.options = parse_cmdline(config.cmdline)
        self.warnings: list[str] = []
        self.engine: Engine | None = None
        self.backend: Any = None
        self.profile: Any = None
        self.medium = _MediumState(None, [])
        self.service: SessionsService | None = None
        self.loop = GLib.MainLoop()
        self._monitor: Any = None
        self._status = ""
        self._notifier = Notifier()
        self._lock_fd: int | None = None
        self._ksm = Ksm()
        self.sharing = SharingDecision(False, "no sessions")
        self.restore_way = restoreway.RestoreWay(False, "no sessions")
        self.network: Any = None  # xsession.network.InternalNetwork, when the medium has one
        self.pool_server: Any = None  # xsession.poolserver.PoolServer, when the medium has a pool

    # -- start-up --------------------------------------------------------------------
    def _read_medium(self) -> None:
        root, places = find_medium_root(self.options, self.config.medium)
        self.medium = _MediumState(root, places)
        if root is None:
            self.medium.problem = MediumUnavailable(
                " or ".join(places), f"no XenUbuntu medium ({MANIFEST_RELPATH}) found")
            self.warnings.append(str(self.medium.problem))
            return
        try:
            manifest = load_manifest(root / MANIFEST_RELPATH)
            self.backend = _make_backend(manifest)
        except XSessionError as e:
            self.medium.problem = MediumUnavailable(str(root / MANIFEST_RELPATH), f"the manifest is unusable: {e}")
            self.warnings.append(str(self.medium.problem))
            return
        self._start_network(manifest, root)
        self._detect_hardware(root)
        speed = self.profile.medium.speed if self.profile is not None and self.profile.medium else "unknown"
        cpus = self.profile.cpus if self.profile is not None else (os.cpu_count() or 1)
        # from a slow or seek-bound medium, waiting flavours are preloaded into RAM while idle
        # (QEMU only for now: on Xen the copy would take dom0's memory, which the plan does not give it)
        engine = Engine(manifest, self.backend, self.config.runtime_dir, self.options,
                        max_parallel=scheduler.parallel_restores(speed, cpus),
                        preload=speed == "slow" and self.backend.name == "qemu")
        # the engine reconciled the options with the medium: plan with its flavours and options
        engine.fit_check = memory.fit_check(self.backend.host_memory, engine.flavours, engine.options,
                                            overhead=self.backend.overhead_mib, backend=self.backend.name,
                                            balloon=getattr(self.backend, "balloon_dom0", None),
                                            in_dom0=self.backend.in_dom0_mib)
        self.engine = engine
        self.sharing = sharing.decide(engine.options.share, self.backend.name, self._ksm.available())

    def _start_network(self, manifest: Manifest, root: Path) -> None:
        """dom0's internal network, when the medium's flavours have NICs on it, and the
        medium's package pool served on it; a failure is a warning (the guests then run
        with their NICs unplugged, or without the pool), never a stop."""
        from .netplan import POOL_PORT, NetworkMode
        from .network import network_for
        from .poolserver import PoolServer
        try:
            net = network_for(manifest, self.options.network, self.config.runtime_dir / "network")
            if net is None:
                return
            net.up()
            self.backend.network = net
            self.network = net
        except XSessionError as e:
            self.warnings.append(f"{e}; the guests run without a network")
            return
        if self.options.network is NetworkMode.OFF:
            return
        try:
            self.pool_server = PoolServer.for_medium(root, net.address, POOL_PORT)
        except XSessionError as e:
            self.warnings.append(f"{e}; the guests cannot install packages")

    def _detect_hardware(self, root: Path) -> None:
        try:
            from . import hardware
            self.profile = hardware.detect(medium_paths=str(root))
        except Exception as e:  # udev can be missing in a container; the manager still works
            self.warnings.append(f"cannot look at the hardware: {e}")
            return
        if self.profile.medium is not None:
            self.medium.info = self.profile.medium.as_dict()
        else:
            # a medium that is a plain folder (a copy, a test): no device to describe
            self.medium.info = {"path": str(root), "kind": "directory", "speed": "unknown"}
            self.warnings.extend(w for w in self.profile.warnings if "not mounted" not in w)

    def _watch_udev(self) -> None:
        if not self.config.use_udev:
            return
        try:
            from .hardware import HardwareMonitor, watch_with_glib
            self._monitor = HardwareMonitor(self._on_hardware,
                                            medium=self.profile.medium if self.profile is not None else None)
            watch_with_glib(self._monitor)
        except Exception as e:
            self.warnings.append(f"no udev monitor: medium and memory changes go unnoticed ({e})")

    def _watch_medium_folder(self) -> None:
        """Look at the medium's manifest every second: a loop-mounted image, a folder or a
        network share comes and goes without a udev event, and a disc's udev event can
        come before its filesystem is mounted again."""
        if self.medium.root is None or self.engine is None:
            return
        GLib.timeout_add_seconds(MEDIUM_POLL_S, self._check_medium_folder)

    def _check_medium_folder(self) -> bool:
        there = self._manifest_there()
        if there != self.medium.present:
            if there:
                self._medium_back()
            else:
                self._medium_gone(f"the medium's {MANIFEST_RELPATH} is gone from {self.medium.root}")
            if self.service is not None:
                self.service.manager_changed()
        return GLib.SOURCE_CONTINUE

    def _manifest_there(self) -> bool:
        return self.medium.root is not None and (self.medium.root / MANIFEST_RELPATH).is_file()

    def _medium_gone(self, why: str) -> None:
        if not self.medium.present:
            return  # udev and the folder watch both saw it
        self.medium.present = False
        if self.engine is not None:
            self.engine.medium_removed(why)

    def _medium_back(self) -> None:
        if self.medium.present or not self._manifest_there():
            return  # a disc whose filesystem is not mounted yet: the folder watch sees it later
        self.medium.present = True
        if self.engine is not None:
            self.engine.medium_returned()

    def _on_hardware(self, event: Any) -> None:
        """udev events (main loop)."""
        from .hardware import MediumChanged, MediumEjected, MemoryAdded
        if isinstance(event, MediumEjected):
            self._medium_gone(f"the medium was removed ({event.device}: {event.reason})")
        elif isinstance(event, MediumChanged):
            if event.same:
                self._medium_back()
            else:
                self.warnings.append(f"{event.device} holds another disc ({event.fs_label or event.fs_uuid}), "
                                     "not the XenUbuntu medium")
        elif isinstance(event, MemoryAdded):
            log.info("memory block %s came online", event.block)
        if self.service is not None:
            self.service.manager_changed()

    # -- Facts for the bus ------------------------------------------------------------
    def manager_properties(self, only: str | None = None) -> dict[str, Any]:
        """The Manager's properties; with ``only``, the costly ones not asked for are
        left out (``Memory`` plans afresh and, on Xen, runs ``xl info``)."""
        engine = self.engine
        warnings = list(dict.fromkeys(self.warnings + (list(engine.warnings) if engine else [])))
        medium: dict[str, Any] = dict(self.medium.info)
        problem = self.medium_problem()
        medium.update({
            "available": problem is None,
            "path": str(self.medium.root) if self.medium.root else "",
            "searched": list(self.medium.places),
            "error": str(problem) if problem else "",
        })
        if engine is not None:
            medium["manifest"] = engine.manifest.path
            medium["flavours"] = list(engine.manifest.names)
        mem: dict[str, Any] = {}
        if engine is not None and only in (None, "Memory"):
            try:
                shared = self._ksm.stats().saved_mib if self.sharing.enabled else 0
                mem = memory.plan(self.backend.host_memory(), engine.flavours, engine.options,
                                  engine.running_memory(), overhead=self.backend.overhead_mib,
                                  backend=self.backend.name, shared_mib=shared,
                                  in_dom0=self.backend.in_dom0_mib).as_dict()
                mem["sharing"] = ("on: " if self.sharing.enabled else "off: ") + self.sharing.reason
                mem["lazy"] = ("on: " if self.restore_way.lazy else "off: ") + self.restore_way.reason
            except (ValueError, XSessionError) as e:
                mem = {"error": str(e)}
        return {
            "Version": f"{API_VERSION} (xsession {__version__})",
            "Backend": self.backend.name if self.backend is not None else "",
            "DefaultFlavour": engine.default if engine else "",
            "RestorePolicy": (engine.options if engine else self.options).restore.value,
            "Hardware": self.profile.as_dict() if self.profile is not None else {},
            "Memory": mem,
            "Medium": medium,
            "Warnings": warnings,
        }

    def medium_problem(self) -> MediumUnavailable | None:
        if self.medium.problem is not None:
            return self.medium.problem
        if not self.medium.present or not self._manifest_there():  # now, not at the last look
            return MediumUnavailable(str(self.medium.root), "the medium was removed; put it back")
        return None

    # -- systemd --------------------------------------------------------------------
    def _notify(self, text: str) -> None:
        """Never blocks: the main loop must not wait on a supervisor that stopped reading."""
        self._notifier.notify(text)

    def _status_line(self) -> str:
        if self.engine is None:
            return f"no sessions: {self.medium_problem()}"
        views = self.engine.sessions()
        running = sum(v.state is State.RUNNING for v in views)
        return f"{running} of {len(views)} sessions running: " + ", ".join(f"{v.name} {v.state.value}" for v in views)

    def _update_status(self) -> bool:
        status = self._status_line()
        if status != self._status:
            self._status = status
            self._notify(f"STATUS={status}")
        return GLib.SOURCE_REMOVE

    # -- running ----------------------------------------------------------------------
    def _lock_runtime_dir(self) -> str | None:
        """Take the runtime folder for this instance alone; None, or why not.

        Before any session is read: a second instance must not adopt, restore or
        delete what the first one manages. The lock goes with the process (no stale
        lock after a crash) and is not inherited by guests (close-on-exec).
        """
        path = self.config.runtime_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            return f"cannot open {path}: {e.strerror or e}"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            return f"another xsessiond (pid {holder}) manages {self.config.runtime_dir}; this one exits"
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return None

    def run(self) -> int:
        refusal = self._lock_runtime_dir()
        if refusal is not None:
            log.error("%s", refusal)
            return 1
        self._read_medium()
        for w in self.warnings + (list(self.engine.warnings) if self.engine else []):
            log.warning("%s", w)
        if self.engine is not None:
            adopted = self.engine.adopt_running()
            if adopted:
                log.info("adopted %s", ", ".join(adopted))
            self.engine.subscribe(lambda event, view: event == "state-changed"
                                  and GLib.idle_add(self._update_status))
        try:
            con = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
        except GLib.Error as e:
            log.error("cannot connect to the system bus: %s", e.message)
            return 1
        authorizer = Authorizer(con, self.config.use_polkit)
        self.service = SessionsService(con, self.engine, self, authorizer)
        self.service.publish()
        if self.engine is not None:
            self.service.install = install_service(con, self.engine, authorizer,
                                                   lambda: self.profile.medium if self.profile else None)
            self.service.office = office_service(con, self.engine, authorizer, self.medium_problem)
        try:
            reply = con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                  "RequestName", GLib.Variant("(su)", (BUS_NAME, _DBUS_NAME_FLAG_DO_NOT_QUEUE)),
                                  GLib.VariantType("(u)"), Gio.DBusCallFlags.NONE, 10_000, None).unpack()[0]
        except GLib.Error as e:
            log.error("cannot own %s: %s", BUS_NAME, e.message)
            self._end(con, stop_guests=False)
            return 1
        if reply != _DBUS_PRIMARY_OWNER:
            log.error("%s is owned by another process already; this one exits", BUS_NAME)
            self._end(con, stop_guests=False)  # it never managed them: leave the guests as they are
            return 1
        self._watch_udev()
        self._watch_medium_folder()
        self._start_sharing()
        self._choose_restore_way()
        if self.engine is not None:
            self.engine.start()
        self._status = self._status_line()
        self._notify(f"READY=1\nSTATUS={self._status}")
        log.info("ready on %s: %s", BUS_NAME, self._status)
        for signum in (signal.SIGTERM, signal.SIGINT):
            GLib.unix_signal_add(GLib.PRIORITY_HIGH, signum, self._on_signal, signum)
        con.connect("closed", lambda *_: self.loop.quit())
        self.loop.run()
        self._end(con)
        return 0

    def _start_sharing(self) -> None:
        """Let the host merge the sessions' identical pages, when decided so (before any guest)."""
        if not self.sharing.enabled:
            log.info("memory sharing off: %s", self.sharing.reason)
            return
        try:
            self._ksm.enable()
        except OSError as e:
            self.sharing = SharingDecision(False, f"cannot turn on same-page merging: {e}")
            self.warnings.append(self.sharing.reason)
            log.warning("%s", self.sharing.reason)

    def _choose_restore_way(self) -> None:
        """Stream or map the QEMU sessions' RAM, once it is known whether pages merge (before any restore)."""
        if self.backend is None:
            return
        from .hypervisor.lazyram import maps_private_readonly
        self.restore_way = restoreway.decide(self.options.lazy, self.backend.name,
                                             lambda: maps_private_readonly(self.backend.binary), self.sharing.enabled)
        if self.backend.name == "qemu":
            self.backend.lazy = self.restore_way.lazy
        log.info("restores: %s", self.restore_way.reason)

    def _on_signal(self, signum: int) -> bool:
        log.info("%s: %s", signal.Signals(signum).name,
                 "stopping the guests" if self.config.stop_guests_on_exit else "leaving the guests running")
        self.loop.quit()
        return GLib.SOURCE_REMOVE

    def _end(self, con: Gio.DBusConnection, stop_guests: bool | None = None) -> None:
        """Withdraw from the bus first (no call may start now), then let go of the engine."""
        self._notify("STOPPING=1")
        if self.service is not None:
            for part in (self.service.install, self.service.office):
                if part is not None:
                    part.close()
            self.service.close()
        if self._monitor is not None:
            self._monitor.close()
        stop = self.config.stop_guests_on_exit if stop_guests is None else stop_guests
        if self.engine is not None:
            self.engine.shutdown(stop_guests=stop)
        if self.pool_server is not None:
            self.pool_server.close()
        if self.network is not None:
            self.network.close(teardown=stop)  # guests that stay keep their network
        self._ksm.restore()
        try:
            con.flush_sync(None)
        except GLib.Error:
            pass


# --- logging -------------------------------------------------------------------------

class _FlavourField(logging.Filter):
    """Journal field FLAVOUR next to SESSION (a session is one flavour's VM)."""

    def filter(self, record: logging.LogRecord) -> bool:
        session = getattr(record, "SESSION", None)
        if session is not None and not hasattr(record, "FLAVOUR"):
            record.FLAVOUR = session
        return True


def setup_logging(level: int) -> None:
    """To the journal when systemd runs us (its stderr stream is the journal), stderr otherwise."""
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM") and os.path.exists("/run/systemd/journal/socket"):
        from systemd.journal import JournalHandler
        handler = JournalHandler(SYSLOG_IDENTIFIER="xsessiond")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("xsessiond: %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_FlavourField())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _read_cmdline(args: argparse.Namespace) -> str:
    if args.cmdline is not None:
        return args.cmdline
    if "XENUBUNTU_OPTIONS" in os.environ:  # the initramfs's copy of the xenubuntu.* words
        return os.environ["XENUBUNTU_OPTIONS"]
    try:
        return Path("/proc/cmdline").read_text()
    except OSError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xsessiond", description=__doc__.split("\n\n")[0])
    p.add_argument("--cmdline", help="boot options to use instead of $XENUBUNTU_OPTIONS or /proc/cmdline")
    p.add_argument("--medium", type=Path, help="the medium's root (default: $XENUBUNTU_MEDIUM, "
                   "xenubuntu.medium=, /cdrom, /run/live/medium)")
    p.add_argument("--runtime-dir", type=Path, default=DEFAULT_RUNTIME_DIR,
                   help=f"guests' sockets and state (default {DEFAULT_RUNTIME_DIR})")
    p.add_argument("--stop-guests-on-exit", action="store_true",
                   help="stop every guest when the daemon exits (default: they keep running)")
    p.add_argument("--no-polkit", action="store_true", help="do not ask polkit: only root may change anything")
    p.add_argument("--no-udev", action="store_true", help="do not watch udev for medium and memory changes")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    args = p.parse_args(argv)
    setup_logging(logging.DEBUG if args.debug else logging.INFO)
    args.runtime_dir.mkdir(parents=True, exist_ok=True)
    config = DaemonConfig(cmdline=_read_cmdline(args), medium=args.medium.absolute() if args.medium else None,
                          runtime_dir=args.runtime_dir.absolute(), stop_guests_on_exit=args.stop_guests_on_exit,
                          use_polkit=not args.no_polkit, use_udev=not args.no_udev)
    return Daemon(config).run()


if __name__ == "__main__":
    sys.exit(main())
