"""The confirmation dialog of an install a guest asked for.

It says which session asked and what would be installed, lists the disks the
daemon offers (``ListInstallTargets``: never the live medium, a mounted disk or
one too small), and does nothing until the person picks a disk and presses
Install (``Job.Confirm``, which polkit may ask a password for). Then it shows
the job's progress, rate and expected end until it ends. "Refuse" cancels the
request (``Job.Cancel``); closing the dialog leaves it pending.
"""

from __future__ import annotations

import logging

import time

import gi

gi.require_version("Gtk", "3.0")
from gi.repository import Gtk  # noqa: E402

from .client import Job, SessionsClient  # noqa: E402

__all__ = ["InstallDialog", "describe_disk", "describe_progress"]


log = logging.getLogger(__name__)

def describe_disk(device: str, size: int, model: str) -> str:
    gib = size / 2**30
    size_text = f"{gib:.1f} GiB" if gib >= 1 else f"{size / 2**20:.0f} MiB"
    return f"{device}  {size_text}" + (f"  {model}" if model else "")


def describe_progress(job: Job, now: float | None = None) -> str:
    """``37 %, 12.5 MiB/s, about 20 s left`` while it runs; the outcome once it ended."""
    if job.state == "done":
        return f"Installed onto {job.target}."
    if job.state in ("failed", "cancelled"):
        return f"The install {'failed' if job.state == 'failed' else 'was cancelled'}: {job.error}"
    if job.state == "pending":
        return "Waiting for you to pick a disk."
    text = f"{job.progress * 100:.0f} %"
    if job.rate:
        text += f", {job.rate / 2**20:.1f} MiB/s"
    if job.expected_end:
        left = max(0.0, job.expected_end / 1e6 - (time.time() if now is None else now))
        text += f", about {left:.0f} s left"
    return text


class InstallDialog(Gtk.Dialog):
    """One job's confirmation and progress. Responses: ``Install`` confirms, ``Refuse`` cancels."""

    def __init__(self, parent: Gtk.Window | None, client: SessionsClient, path: str):
        job = client.jobs[path]
        session = client.sessions.get(job.session)
        title = session.title if session is not None and session.title else job.flavour
        super().__init__(title=f"Install {title}?", transient_for=parent, modal=False)
        self.client = client
        self.path = path
        self.set_default_size(520, 320)
        self.add_button("Not now", Gtk.ResponseType.CLOSE)
        self.refuse_button = self.add_button("Refuse", Gtk.ResponseType.REJECT)
        self.install_button = self.add_button("Install", Gtk.ResponseType.ACCEPT)
        self.install_button.get_style_context().add_class("destructive-action")
        self.install_button.set_sensitive(False)
        box = self.get_content_area()
        box.set_spacing(8)
        box.set_border_width(12)
        self.intro = Gtk.Label(xalign=0, wrap=True, label=(
            f"The {title} session asks to install {title} onto a disk of this computer. "
            "Everything on the disk you pick is erased."))
        box.pack_start(self.intro, False, False, 0)
        self.disks = Gtk.ListBox(selection_mode=Gtk.SelectionMode.SINGLE)
        self.disks.connect("row-selected", lambda _l, row: self.install_button.set_sensitive(
            row is not None and self.client.jobs.get(self.path, job).state == "pending"))
        box.pack_start(self.disks, True, True, 0)
        self.status = Gtk.Label(xalign=0, wrap=True, selectable=True, label="Looking for disks ...")
        box.pack_start(self.status, False, False, 0)
        self.progress = Gtk.ProgressBar(show_text=False)
        self.progress.set_no_show_all(True)
        box.pack_start(self.progress, False, False, 0)
        self.devices: list[str] = []
        self.connect("response", self._on_response)
        # the line a benchmark (and a person reading the journal) looks for
        self.connect("map-event", lambda _d, _e: log.info("install dialog shown for %s", path))
        self._signals = [client.connect("job-changed", lambda _c, p, _ch: p == self.path and self.update()),
                         client.connect("job-removed", lambda _c, p: p == self.path and self.destroy())]
        self.connect("destroy", lambda _d: [client.disconnect(h) for h in self._signals])
        client.install_targets(job.flavour, self._got_disks)
        self.show_all()
        self.update()

    def _got_disks(self, disks: list[tuple[str, int, str]]) -> None:
        for child in self.disks.get_children():
            self.disks.remove(child)
        self.devices = [d for d, _, _ in disks]
        for device, size, model in disks:
            row = Gtk.ListBoxRow()
            row.add(Gtk.Label(label=describe_disk(device, size, model), xalign=0, margin=6))
            self.disks.add(row)
        self.disks.show_all()
        if not disks:
            self.status.set_text("No disk can take it: the live medium, disks in use and disks too small "
                                 "are never offered.")
        else:
            self.update()

    def select(self, device: str) -> None:
        """Pick ``device`` in the list (as a click on its row does)."""
        self.disks.select_row(self.disks.get_row_at_index(self.devices.index(device)))

    @property
    def selected(self) -> str:
        row = self.disks.get_selected_row()
        return self.devices[row.get_index()] if row is not None else ""

    def update(self) -> None:
        job = self.client.jobs.get(self.path)
        if job is None:
            return
        self.status.set_text(describe_progress(job))
        running = job.state == "running"
        self.progress.set_visible(running or job.state == "done")
        self.progress.set_fraction(job.progress)
        self.disks.set_sensitive(job.state == "pending")
        self.install_button.set_sensitive(job.state == "pending" and bool(self.selected))
        self.refuse_button.set_sensitive(job.state in ("pending", "running"))
        if running:
            self.refuse_button.set_label("Cancel")

    def _on_response(self, _dialog: Gtk.Dialog, response: int) -> None:
        if response == Gtk.ResponseType.ACCEPT and self.selected:
            self.install_button.set_sensitive(False)
            self.client.job_call(self.path, "Confirm", self.selected)
        elif response == Gtk.ResponseType.REJECT:
            self.client.job_call(self.path, "Cancel")
        elif response in (Gtk.ResponseType.CLOSE, Gtk.ResponseType.DELETE_EVENT):
            self.hide()  # the job stays as it is; the chooser can show it again
