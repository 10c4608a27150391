"""Install jobs on D-Bus, in the manner of udisks2's ``Job`` objects.

    /org/xenubuntu/Sessions1/job/N    org.xenubuntu.Sessions1.Job

A job appears (``InterfacesAdded`` on the manager) when a guest asks, and is
withdrawn (``InterfacesRemoved``) once it is one of the older finished jobs.
``Confirm(s disk)`` and ``Cancel()`` are authorized as ``administer`` (polkit);
the Manager's ``ListInstallTargets(s flavour)`` lists the disks udev offers.
:class:`SessionsService` passes its Manager calls and its object list here
(:meth:`manager_call`, :meth:`managed_objects`): the install is its own concern.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from gi.repository import Gio, GLib

from ..errors import XSessionError
from .jobs import JobView
from .manager import InstallManager

if TYPE_CHECKING:
    from ..bus import Authorizer

__all__ = ["JOB_IFACE", "JOB_PATH", "job_path", "job_properties", "InstallService", "install_service"]

log = logging.getLogger(__name__)

JOB_IFACE = "org.xenubuntu.Sessions1.Job"
JOB_PATH = "/org/xenubuntu/Sessions1/job"
#: a progress bar needs no more than this many updates a second
PROGRESS_INTERVAL_S = 0.1
_PROGRESS_ONLY = frozenset({"Progress", "BytesDone", "BytesTotal", "Rate", "ExpectedEndTime"})


def job_path(number: int) -> str:
    return f"{JOB_PATH}/{number}"


def job_properties(v: JobView) -> dict[str, Any]:
    from ..bus import session_path
    return {
        "Number": v.number,
        "Session": session_path(v.session),
        "Flavour": v.flavour,
        "State": v.state.value,
        "Target": v.target,
        "Progress": float(v.progress),
        "BytesDone": v.bytes_done,
        "BytesTotal": v.bytes_total,
        "Rate": v.rate,
        "ExpectedEndTime": v.expected_end_us,
        "Error": v.error,
        "Created": float(v.created),
    }


class InstallService:
    """The Job objects of an :class:`InstallManager` on a connection (main loop)."""

    def __init__(self, con: Gio.DBusConnection, install: InstallManager, authorizer: Authorizer):
        from ..bus import _interfaces
        self.con = con
        self.install = install
        self.authorizer = authorizer
        self._iface = _interfaces()[JOB_IFACE]
        self._regs: dict[int, int] = {}
        self._published: dict[int, dict[str, Any]] = {}
        self._last_signal: dict[int, float] = {}
        self._lock = threading.Lock()
        self._context = GLib.MainContext.ref_thread_default()

    def publish(self) -> None:
        for view in self.install.jobs.views():
            self._add(view)
        self.install.jobs.subscribe(self._on_job)

    def close(self) -> None:
        with self._lock:
            regs, self._regs = self._regs, {}
        for reg in regs.values():
            self.con.unregister_object(reg)

    # -- events (any thread) ------------------------------------------------------------
    def _on_job(self, event: str, view: JobView) -> None:
        if event == "added":
            # registered in the main loop: GDBus dispatches calls to the registering thread's context
            self._context.invoke_full(GLib.PRIORITY_DEFAULT, lambda: self._add(view) and False)
        elif event == "removed":
            self._context.invoke_full(GLib.PRIORITY_DEFAULT, lambda: self._remove(view.number) and False)
        else:
            self._changed(view)

    def _add(self, view: JobView) -> bool:
        from ..bus import MANAGER_PATH, OBJECT_MANAGER_IFACE
        with self._lock:
            if view.number in self._regs:
                return False
            path = job_path(view.number)
            self._regs[view.number] = self.con.register_object(path, self._iface, self._on_call,
                                                               self._get_property, None)
            props = job_properties(view)
            self._published[view.number] = props
        self._emit(MANAGER_PATH, OBJECT_MANAGER_IFACE, "InterfacesAdded",
                   GLib.Variant("(oa{sa{sv}})", (path, {JOB_IFACE: self._typed(props)})))
        # what changed between the event and its registration in the main loop
        self._changed(self.install.jobs.view(view.number))
        return False

    def _remove(self, number: int) -> bool:
        from ..bus import MANAGER_PATH, OBJECT_MANAGER_IFACE
        with self._lock:
            reg = self._regs.pop(number, None)
            self._published.pop(number, None)
        if reg is not None:
            self.con.unregister_object(reg)
            self._emit(MANAGER_PATH, OBJECT_MANAGER_IFACE, "InterfacesRemoved",
                       GLib.Variant("(oas)", (job_path(number), [JOB_IFACE])))
        return False

    def _changed(self, view: JobView) -> None:
        props = job_properties(view)
        with self._lock:
            old = self._published.get(view.number)
            if old is None:
                return  # not registered yet: _add announces it
            changed = {k: v for k, v in props.items() if old.get(k) != v}
            now = time.monotonic()
            if not changed or (changed.keys() <= _PROGRESS_ONLY
                               and now - self._last_signal.get(view.number, 0.0) < PROGRESS_INTERVAL_S
                               and view.progress < 1.0):
                return
            self._published[view.number] = props
            self._last_signal[view.number] = now
        self._emit(job_path(view.number), "org.freedesktop.DBus.Properties", "PropertiesChanged",
                   GLib.Variant("(sa{sv}as)", (JOB_IFACE, self._typed(changed), [])))
        if "State" in changed and view.state.finished:
            self._emit(job_path(view.number), JOB_IFACE, "Completed",
                       GLib.Variant("(bs)", (view.state.value == "done", view.error)))

    def _emit(self, path: str, iface: str, signal: str, args: GLib.Variant) -> None:
        from ..bus import emit
        emit(self.con, path, iface, signal, args)

    def _typed(self, props: dict[str, Any]) -> dict[str, GLib.Variant]:
        from ..bus import typed_properties
        return typed_properties(self._iface, props)

    def _get_property(self, con: Gio.DBusConnection, sender: str, path: str, iface: str,
                      prop: str) -> GLib.Variant:
        view = self.install.jobs.view(int(path.rsplit("/", 1)[1]))
        return self._typed({prop: job_properties(view)[prop]})[prop]

    # -- calls ----------------------------------------------------------------------------
    def _on_call(self, con: Gio.DBusConnection, sender: str, path: str, iface: str, method: str,
                 params: GLib.Variant, invocation: Gio.DBusMethodInvocation) -> None:
        from ..bus import ACTION_ADMINISTER, InvalidArgs, _return_error
        try:
            number = int(path.rsplit("/", 1)[1])
            view = self.install.jobs.view(number)
            jobs = self.install.jobs
            if method == "Confirm":
                device = str(params.unpack()[0])
                self._authorized(invocation, sender, ACTION_ADMINISTER, f"Confirm job {number} onto {device}",
                                 lambda: self._confirm(view, device))
            elif method == "Cancel":
                self._authorized(invocation, sender, ACTION_ADMINISTER, f"Cancel job {number}",
                                 lambda: jobs.cancel(number))
            else:
                raise InvalidArgs(f"no method {iface}.{method}")
        except Exception as e:
            _return_error(invocation, e)

    def _confirm(self, view: JobView, device: str) -> None:
        """The target is checked now (udev, mounts); the host is checked again before writing."""
        self.install.check_target(view.flavour, device)
        self.install.jobs.confirm(view.number, device)

    def _authorized(self, invocation: Gio.DBusMethodInvocation, sender: str, action: str, what: str,
                    act: Any) -> None:
        from ..bus import authorized_call

        authorized_call(self.authorizer, invocation, sender, action, True, act, what)

    # -- the Manager's part ------------------------------------------------------------------
    def manager_call(self, method: str, params: GLib.Variant, invocation: Gio.DBusMethodInvocation) -> bool:
        """Answer a Manager method of the install; False when it is not one."""
        if method == "ListInstallTargets":
            flavour = str(params.unpack()[0])
            install = self.install

            def run() -> None:  # udev and the mount table: off the main loop
                from ..bus import _return_error
                try:
                    disks = [d.as_tuple() for d in install.candidates(flavour)]
                    invocation.return_value(GLib.Variant("(a(sts))", (disks,)))
                except Exception as e:
                    _return_error(invocation, e)

            threading.Thread(target=run, name="bus-targets", daemon=True).start()
            return True
        if method == "ListJobs":
            invocation.return_value(GLib.Variant("(a(ussso))", ([
                (v.number, v.session, v.flavour, v.state.value, job_path(v.number))
                for v in self.install.jobs.views()],)))
            return True
        return False

    def managed_objects(self) -> dict[str, dict[str, dict[str, GLib.Variant]]]:
        with self._lock:
            numbers = list(self._regs)
        out = {}
        for n in numbers:
            try:
                out[job_path(n)] = {JOB_IFACE: self._typed(job_properties(self.install.jobs.view(n)))}
            except XSessionError:
                continue
        return out


def install_service(con: Gio.DBusConnection, engine: Any, authorizer: Authorizer,
                    medium: Any) -> InstallService:
    """The install of ``engine`` published on ``con`` (main loop); ``medium()`` gives the live medium."""
    service = InstallService(con, InstallManager(engine, medium), authorizer)
    service.publish()
    return service
