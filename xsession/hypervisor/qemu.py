"""The QEMU backend: restore, cold boot, save, adopt; QMP through :mod:`qemu.qmp`.

Facts that shape it (QEMU 7.2):

* A stream loads only into the identical guest-visible machine, so every
  command line comes from :func:`qemu_argv` and the manifest's
  :class:`~xsession.manifest.MachineConfig`; display and chardev options are
  host-side and may differ (VNC is added at restore).
* The stream has no integrity check, so the manager feeds it itself
  (:class:`~xsession.statefile.Feeder`) through ``-incoming fd:N`` and resumes
  the guest only after the feed was verified.
* A guest that reboots is a failure after a restore (damaged CPU state resets
  silently), so QEMU runs with ``-no-reboot`` and SHUTDOWN/RESET events are watched.
* ``max-bandwidth`` defaults to 32 MiB/s even for a stopped guest: raised before saving.

Per session, ``rundir`` holds: ``qmp.sock``, ``serial.sock`` (the guest's
serial console; everything it prints is also in ``console.log``),
``vnc.sock``, ``disk.qcow2`` (the session's overlay), ``qemu.log`` (QEMU's
own output) and ``guest.json`` (what a restarted manager needs to adopt it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import HypervisorError, MediumUnavailable, NetworkError, StatefileCorrupt
from ..manifest import Flavour, LazyImage, MachineConfig, Manifest, StatePart
from ..cpumodel import HostCpu, check_model, read_cpuinfo
from ..diskchain import check_chain
from ..netplan import guest_mac
from ..guestchannel import PORT_NAME as CHANNEL_PORT
from .qga import PORT_NAME as AGENT_PORT
from .qga import AgentError, GuestAgent
from ..screen import blank, colours, digest, settled, to_png
from ..statefile import Feeder, precheck, sha256_of, widen_pipe
from .base import HostMemory, Progress
from .bootstub import boot_files_for_restore
from .lazyram import RAM_ID, RamFile, decode_ram_image, held_mib, maps_private_readonly
from .console import wait_for_text
from .qemuguest import QemuGuest

__all__ = ["QemuBackend", "QemuGuest", "qemu_argv", "SaveResult", "probe_kvm", "QEMU_BINARY"]

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
#: TCG's translation cache; host-side only (not in the stream), capped because the
#: 1 GiB default would count against the memory plan of a small machine.
TCG_TB_MIB = 64
#: QEMU's own memory per guest beyond guest RAM, measured (RSS minus touched guest RAM)
#: on a 256 MiB guest: ~40 MiB of QEMU itself plus the TCG cache under TCG.
QEMU_OVERHEAD_MIB = 48
#: a restore reads the statefile at medium speed: allow 2 MB/s (a slow DVD) plus start-up
RESTORE_BASE_TIMEOUT_S = 30.0
RESTORE_BYTES_PER_S = 2_000_000
SAVE_TIMEOUT_S = 120.0
#: a screen that has not changed for this long after it last changed has settled
SETTLE_QUIET_S = 10.0  # under emulation a panel can come seconds after the wallpaper
SETTLE_QUIET_PLAIN_S = 20.0
#: ... and while nothing but the screen tells that the system is up: an X server shows a black
#: screen with a cursor, unchanged, until the desktop paints (measured on a quiet host: 20 s
#: for a live ISO's LXQt under emulation, longer under load), as long as a text mode's silence
SETTLE_QUIET_PLAIN_SCREEN_ONLY_S = 90.0
SETTLE_QUIET_TEXT_MODE_S = 90.0
#: the VGA text mode's screen (80x25 characters of 9x16)
TEXT_MODE = (720, 400)
#: a screen with this many colours in a sample is painted (a desktop), not blank or text
PAINTED_COLOURS = 16
SETTLE_SAMPLE_S = 0.5
#: at mastering, how long a desktop that said it is ready may take to paint itself
SETTLE_AFTER_READY_S = 120.0


def qemu_argv(name: str, machine: MachineConfig, manifest: Manifest, flavour: Flavour, rundir: Path,
              disk: Path | None, *, incoming: str | None = None, vnc: bool = True,
              accel: str | None = None, disk_backing: Path | None = None,
              vmgenid_guid: str = "auto", netdev: str | None = None, ram: RamFile | None = None) -> list[str]:
    """The one place a QEMU command line is built, for saving, restoring and cold booting alike.

    Guest-visible parts come only from ``machine`` and the flavour's boot files; the
    rest (monitor, serial backend, VNC, pid file) is host-side and may vary.
    ``ram``: the guest's RAM as a file (:mod:`.lazyram`), which the guest does not see.
    """
    accel = accel or machine.accel
    accel_opt = f"tcg,tb-size={TCG_TB_MIB}" if accel == "tcg" else accel
    cb = flavour.cold_boot
    argv = [
        QEMU_BINARY,
        "-name", f"guest={name},process=xsession-{name}",
        "-machine", machine.machine_type + (f",memory-backend={RAM_ID}" if ram is not None else ""),
        "-accel", accel_opt,
        "-cpu", machine.cpu,
        "-m", str(machine.memory_mib),
        "-smp", str(machine.vcpus),
        "-nodefaults", "-no-user-config", "-no-reboot",
        "-vga", machine.vga,
    ]
    if cb.kernel is not None and cb.initrd is not None:
        argv += ["-kernel", str(manifest.resolve(cb.kernel)), "-initrd", str(manifest.resolve(cb.initrd)),
                 "-append", cb.cmdline]
    else:
        argv += ["-boot", "order=d"]  # the live ISO's own boot loader
    argv += [
        "-chardev", f"socket,id=serial0,path={_q(rundir / 'serial.sock')},server=on,wait=off,"
                    f"logfile={_q(rundir / 'console.log')}",
        "-serial", "chardev:serial0",
        "-chardev", f"socket,id=qmp,path={_q(rundir / 'qmp.sock')},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-pidfile", str(rundir / "qemu.pid"),
        "-display", "none",
    ]
    if disk is not None and machine.disk_bus != "none":
        drive = f"file={_q(disk)},if=none,id=disk0,format=qcow2,cache=writeback"
        if disk_backing is not None:  # a copied overlay names its backing relative to the medium
            drive += f",backing.driver=qcow2,backing.file.filename={_q(disk_backing)}"
        argv += ["-drive", drive]
        argv += ["-device", "virtio-blk-pci,drive=disk0" if machine.disk_bus == "virtio" else "ide-hd,drive=disk0"]
    if machine.cdrom:
        iso = f"file={_q(manifest.resolve(flavour.iso))}," if flavour.iso is not None else ""
        argv += ["-drive", f"{iso}if=none,id=cd0,media=cdrom,readonly=on,format=raw",
                 "-device", "ide-cd,drive=cd0,bus=ide.1,unit=0"]
    if machine.guest_channel:
        argv += ["-device", "virtio-serial-pci,id=vser0",
                 "-chardev", f"socket,id=xsguest,path={_q(rundir / 'guest.sock')},server=on,wait=off",
                 "-device", f"virtserialport,bus=vser0.0,chardev=xsguest,name={CHANNEL_PORT}",
                 "-chardev", f"socket,id=qga,path={_q(rundir / 'qga.sock')},server=on,wait=off",
                 "-device", f"virtserialport,bus=vser0.0,chardev=qga,name={AGENT_PORT}"]
    if machine.vmgenid:
        argv += ["-device", f"vmgenid,id=vmgenid0,guid={vmgenid_guid}"]
    if machine.nic == "user":
        # DHCP and the host only: restrict=on gives the guest no route out
        argv += ["-netdev", "user,id=net0,restrict=on",
                 "-device", f"virtio-net-pci,netdev=net0,mac={guest_mac(name)}"]
    elif machine.nic == "internal":
        # the same NIC whatever it is plugged into (host-side): dom0's bridge, or nothing
        # when the network is off
        if netdev is not None:
            argv += ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=net0,mac={guest_mac(name)}"]
        else:
            argv += ["-device", f"virtio-net-pci,mac={guest_mac(name)}"]
    if vnc:
        argv += ["-vnc", f"unix:{_q(rundir / 'vnc.sock')}"]
    if ram is not None:
        argv += ram.argv()
    if incoming is not None:
        argv += ["-incoming", incoming]
    return argv


def _q(path: Path | str) -> str:
    """QEMU option values double their commas."""
    return str(path).replace(",", ",,")


#: run in the guest before a save: dirty pages written, caches dropped, the random generator drawn from
PREPARE_FOR_SAVE = "sync; echo 3 > /proc/sys/vm/drop_caches; head -c 64 /dev/urandom > /dev/null; sync"
#: run in the guest after a restore: its DHCP lease is renewed on every wired link
RENEW_NETWORK = 'for i in /sys/class/net/e*; do [ -e "$i" ] && networkctl renew "${i##*/}"; done; true'
#: after the caches are dropped for a save, what a restore runs first is run once, and the
#: guest idles a moment: the programs and files a restored guest needs in its first seconds
#: are then in the statefile, not read from the medium with a seek each (from a DVD, about
#: 50 seeks, 5 s, before the desktop answered)
WARM_AFTER_DROP_S = 3.0


def freshen_script(flavour: Flavour, clock_offset_s: float) -> str:
    """The one command a restored guest runs through its agent: its clock moved by
    ``clock_offset_s`` to the host's, and a network renewal where it has a NIC (each agent
    command costs a process start, a third of a second under emulation, more under load:
    a time given absolute would be that late; guest-set-time would start hwclock too)."""
    script = f"date -u -s '{clock_offset_s:+.6f} seconds' >/dev/null"
    if flavour.machine.nic != "none":
        script += "; " + RENEW_NETWORK
    return script


#: the guest's clock is read this many times; the quickest answer tells its offset best
CLOCK_READS = 3


def clock_offset(agent: GuestAgent, reads: int = CLOCK_READS) -> float:
    """How far the guest's clock is behind the host's, in seconds: the agent reads it in
    its own process, and the host's time is taken halfway through the quickest round trip
    (so the error is at most half of it).

    :raises AgentError: the agent's answer is not a time.
    """
    best: tuple[float, float] | None = None
    for _ in range(reads):
        sent = time.time()
        guest_ns = agent.execute("guest-get-time")
        answered = time.time()
        if not isinstance(guest_ns, int) or isinstance(guest_ns, bool) or not 0 <= guest_ns < 1 << 63:
            raise AgentError("guest-get-time: not a time")
        if best is None or answered - sent < best[0]:
            best = (answered - sent, (sent + answered) / 2 - guest_ns / 1e9)
    assert best is not None
    return best[1]


@dataclass(frozen=True)
class SaveResult:
    path: Path
    size: int
    sha256: str
    raw_size: int


def probe_kvm(flavour: Flavour, manifest: Manifest, workdir: Path, timeout: float = 10.0) -> bool:
    """Whether KVM can really boot a standard kernel here.

    ``/dev/kvm`` can belong to a nested-virtualization module that opens fine but
    never gets a standard kernel past its decompressor, so only a boot counts.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    workdir.mkdir(parents=True, exist_ok=True)
    argv = qemu_argv("kvm-probe", flavour.machine, manifest, flavour, workdir, None, vnc=False, accel="kvm")
    with open(workdir / "qemu.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        return wait_for_text(workdir / "console.log", flavour.cold_boot.ready_line, timeout,
                             lambda: proc.poll() is None)
    finally:
        proc.kill()
        proc.wait()


class QemuBackend:
    """QEMU (TCG, or KVM where the manifest says so and it works)."""

    name = "qemu"

    def __init__(self, binary: str = QEMU_BINARY, vmgenid_guid: str = "auto", freshen: bool = True,
                 boot_stub: bool = True, lazy: bool = True):
        """``vmgenid_guid``: the VM generation ID a guest gets; ``auto``, a new one each
        time, is what makes every restored guest reseed its random generator.
        ``freshen``: set a restored guest's clock and renew its network (off only to
        measure QEMU alone, or to show what a restore without it leaves).
        ``boot_stub``: a restore gives QEMU stubs for the kernel and initrd it never
        runs (:mod:`.bootstub`); off only to measure what reading them costs.
        ``lazy``: restore lazily where the medium and this QEMU can (:meth:`restores_lazily`)."""
        self.binary = binary
        self.lazy = lazy
        self.vmgenid_guid = vmgenid_guid
        self.freshen = freshen
        self.boot_stub = boot_stub
        self._aborting = threading.Event()
        self._host_cpu: HostCpu | None = None
        self._kvm: bool | None = None  # probed once, on first need
        self._kvm_lock = threading.Lock()
        #: dom0's internal network (:class:`~xsession.network.InternalNetwork`), when the medium has one:
        #: it gives each session with an ``internal`` NIC its tap
        self.network: Any = None

    def host_cpu(self) -> HostCpu:
        """This host's CPU, as ``/proc/cpuinfo`` tells (read once)."""
        if self._host_cpu is None:
            self._host_cpu = read_cpuinfo()
        return self._host_cpu

    def abort(self) -> None:
        """End every restore and cold boot in flight (the manager is shutting down): each
        stops its guest and raises at once instead of running to its watchdog."""
        self._aborting.set()

    def _check_abort(self, what: str) -> None:
        if self._aborting.is_set():
            raise HypervisorError(what, "cancelled: the manager is shutting down")

    def kvm_usable(self, flavour: Flavour, manifest: Manifest) -> bool:
        """Whether KVM really boots a guest here (probed once with this flavour's kernel)."""
        with self._kvm_lock:
            if self._kvm is None:
                workdir = Path(tempfile.mkdtemp(prefix="xs-kvm-"))
                try:
                    self._kvm = probe_kvm(flavour, manifest, workdir)
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
            return self._kvm

    def _accel_for(self, flavour: Flavour, manifest: Manifest) -> str:
        if flavour.machine.accel == "kvm" and not self.kvm_usable(flavour, manifest):
            return "tcg"
        return flavour.machine.accel

    # -- memory ----------------------------------------------------------------
    def host_memory(self) -> HostMemory:
        info = _meminfo()
        return HostMemory(total_mib=info.get("MemTotal", 0) // 1024, free_mib=info.get("MemAvailable", 0) // 1024)

    def overhead_mib(self, flavour: Flavour) -> int:
        """QEMU itself, TCG's cache, and a lazy restore's decoded RAM image: its pages stay
        while the guest's written pages become copies of their own (never over-committed)."""
        extra = TCG_TB_MIB if flavour.machine.accel == "tcg" else 0
        lazy = self._lazy_image(flavour)
        return QEMU_OVERHEAD_MIB + extra + (lazy.held_mib if lazy is not None else 0)

    def in_dom0_mib(self, flavour: Flavour) -> int:
        """0: QEMU's sessions run on the host itself, which no balloon shrinks."""
        return 0

    # -- launching ---------------------------------------------------------------
    def _prepare(self, flavour: Flavour, manifest: Manifest, rundir: Path,
                 cold: bool = False) -> tuple[Path | None, Path | None]:
        """A clean run folder and a fresh session overlay over the medium's disk.

        A restore runs over the disk as it was saved (it matches the saved RAM). A cold
        boot of an installed system (``source: disk``) runs over its clean base instead:
        the saved disk holds a file system that was mounted when it was saved, whose
        check at boot may ask for a reboot (which ``-no-reboot`` makes a failure).

        Returns the overlay and, when it was copied from the medium's template,
        the backing file QEMU must be told about.
        """
        rundir.mkdir(parents=True, exist_ok=True)
        for stale in ("qmp.sock", "serial.sock", "vnc.sock", "guest.sock", "qga.sock", "console.log", "qemu.pid",
                      "guest.json", "disk.qcow2"):
            (rundir / stale).unlink(missing_ok=True)
        if flavour.disk is None or flavour.machine.disk_bus == "none":
            return None, None
        from_base = cold and flavour.source == "disk"
        backing = manifest.resolve(flavour.disk.base if from_base else flavour.disk.saved_overlay or flavour.disk.base)
        if not backing.is_file():
            raise MediumUnavailable(str(backing), "the flavour's disk is missing from the medium")
        check_chain(backing, manifest.root)  # every file QEMU would open stays on the medium
        overlay = rundir / "disk.qcow2"
        if flavour.disk.session_template is not None and not from_base:
            template = manifest.resolve(flavour.disk.session_template)
            check_chain(template, manifest.root)
            try:
                shutil.copyfile(template, overlay)
                return overlay, backing.resolve()
            except OSError as e:
                log.warning("%s: cannot copy the session disk template (%s); creating one", flavour.name, e)
        _run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing.resolve()),
                   str(overlay)], "create the session's disk overlay")
        return overlay, None

    def _launch(self, flavour: Flavour, manifest: Manifest, rundir: Path,
                disk: tuple[Path | None, Path | None] | Path, *,
                incoming_fd: int | None = None, vnc: bool = True, accel: str | None = None,
                mode: str, ram: RamFile | None = None) -> QemuGuest:
        """Start QEMU; with ``ram`` it waits (``-incoming defer``) for :meth:`_start_incoming`."""
        overlay, backing = disk if isinstance(disk, tuple) else (disk, None)
        netdev = None
        if flavour.machine.nic == "internal" and self.network is not None:
            try:
                netdev = self.network.attach(flavour.name)
            except NetworkError as e:  # the session runs, unplugged, and says why
                logging.getLogger(__name__).warning("%s: runs without the internal network: %s", flavour.name,
                                                    e, extra={"SESSION": flavour.name})
        incoming = None if incoming_fd is None else "defer" if ram is not None else f"fd:{incoming_fd}"
        argv = qemu_argv(flavour.name, flavour.machine, manifest, flavour, rundir, overlay,
                         incoming=incoming, vnc=vnc, accel=accel, disk_backing=backing,
                         vmgenid_guid=self.vmgenid_guid, netdev=netdev, ram=ram)
        argv[0] = self.binary
        if incoming_fd is not None and self.boot_stub:
            try:
                argv = boot_files_for_restore(argv, rundir)
            except OSError as e:
                raise MediumUnavailable(str(flavour.cold_boot.kernel), f"cannot read the kernel's header: {e}") from e
        with open(rundir / "qemu.log", "wb") as log:
            try:
                # own session: guests outlive a manager that stops or crashes
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        pass_fds=() if incoming_fd is None else (incoming_fd,),
                                        start_new_session=True)
            except OSError as e:
                raise HypervisorError(f"start {self.binary}", e.strerror or str(e)) from e
        guest = QemuGuest(flavour.name, rundir, proc, proc.pid)
        if flavour.machine.guest_channel:
            guest.attach_channel(flavour.name)
        try:
            guest.write_record(argv, mode)
        except OSError as e:
            guest.stop()
            raise HypervisorError(f"start {flavour.name}", f"cannot record the guest in {rundir}: {e}") from e
        return guest

    # -- restore -----------------------------------------------------------------
    def restore(self, flavour: Flavour, manifest: Manifest, rundir: Path, progress: Progress,
                sources: Sequence[Path] | None = None) -> QemuGuest:
        """Restore the flavour's statefile; the guest runs when this returns.

        Lazily (:mod:`.lazyram`) where the medium has the flavour's RAM image and this
        QEMU can map it, else from the stream. ``sources``: copies of :meth:`preload_parts`
        preloaded into RAM. A lazy restore that fails, a damaged image included, gives
        way to the stream on the medium; the guest's ``restored_lazily`` and ``note``
        tell which ran and why.

        :raises StatefileCorrupt: size, zstd or sha256 check failed (before or during the feed).
        :raises MediumUnavailable: the statefile or disk could not be read.
        :raises HypervisorError: QEMU refused the stream or died; its own words included.
        """
        sf = flavour.statefile
        if sf is None:
            raise StatefileCorrupt(flavour.name, "the flavour has no statefile")
        lazily = self.restores_lazily(flavour)
        if self._accel_for(flavour, manifest) != flavour.machine.accel:
            # a KVM stream does not load under TCG: the guest must cold-boot
            raise HypervisorError(f"restore {flavour.name}",
                                  "the statefile was saved under KVM, and KVM cannot run a guest on this host")
        if flavour.machine.accel == "kvm":
            # a model that needs a flag this CPU lacks would fail in the guest: refuse, cold boot
            check_model(sf.saved_with.cpu, self.host_cpu())
        refused = ""
        if lazily:
            try:
                guest = self._restore_lazily(flavour, manifest, rundir, progress, sources)
                guest.restored_lazily = True
                return self._resume(guest, flavour)
            except (StatefileCorrupt, MediumUnavailable, HypervisorError) as e:
                if self._aborting.is_set():
                    raise
                refused = f"the lazy restore failed ({e}); restored from the stream"
                log.warning("%s: %s", flavour.name, refused, extra={"SESSION": flavour.name})
        # the copy of the statefile, where one was preloaded; a lazy restore's copies are of its parts
        path = sources[0] if sources and not lazily else manifest.resolve(sf.path)
        guest = self._load(flavour, manifest, rundir, path, sf, progress)
        guest = self._resume(guest, flavour)
        guest.note = "; ".join(n for n in (refused, guest.note) if n)
        return guest

    def restores_lazily(self, flavour: Flavour) -> bool:
        """Whether a restore of ``flavour`` maps its RAM image: the medium has one, this
        QEMU can map it, and lazy restores are on."""
        return self._lazy_image(flavour) is not None

    def _lazy_image(self, flavour: Flavour) -> LazyImage | None:
        """The flavour's RAM image and devices' state where a restore maps them, else None."""
        sf = flavour.statefile
        if self.lazy and sf is not None and sf.lazy is not None and maps_private_readonly(self.binary):
            return sf.lazy
        return None

    def preload_parts(self, flavour: Flavour) -> tuple[StatePart, ...]:
        """The RAM image and the devices' state where the flavour restores lazily, else the statefile."""
        assert flavour.statefile is not None
        lazy = self._lazy_image(flavour)
        return (lazy.ram, lazy.devices) if lazy is not None else (flavour.statefile,)

    def _restore_lazily(self, flavour: Flavour, manifest: Manifest, rundir: Path, progress: Progress,
                        copies: Sequence[Path] | None) -> QemuGuest:
        """Decode the RAM image into the run folder, map it, load the devices' state.

        The image's file is removed once QEMU maps it: its memory lives as long as the
        guest, and nothing is left behind. The run folder belongs in memory (tmpfs).
        """
        lazy = self._lazy_image(flavour)
        assert lazy is not None
        total = lazy.ram.size + lazy.devices.size
        rundir.mkdir(parents=True, exist_ok=True)
        image = rundir / "ram.img"
        try:
            ram_path, devices_path = copies or (manifest.resolve(lazy.ram.path), manifest.resolve(lazy.devices.path))
            decode_ram_image(ram_path, lazy.ram, image, manifest.root, lambda done, _: progress(done, total))
            ram = RamFile(image, flavour.memory_mib, writable=False)
            return self._load(flavour, manifest, rundir, devices_path, lazy.devices,
                              lambda done, _: progress(lazy.ram.size + done, total), ram=ram, ignore_shared=True)
        finally:
            image.unlink(missing_ok=True)

    def _resume(self, guest: QemuGuest, flavour: Flavour) -> QemuGuest:
        try:
            guest.resume()
            if self.freshen:
                guest.note = self._freshen(guest, flavour)
            return guest
        except BaseException:
            guest.stop()
            raise

    def _load(self, flavour: Flavour, manifest: Manifest, rundir: Path, path: Path, part: StatePart,
              progress: Progress, *, ram: RamFile | None = None, ignore_shared: bool = False) -> QemuGuest:
        """Start QEMU on the stream in ``path``; returns the guest loaded, checked and paused.

        ``ram``: the guest's RAM as a file; ``ignore_shared``: the stream does not carry
        it (a lazy restore's devices' state).
        """
        precheck(path, part, manifest.root)
        deadline = time.monotonic() + RESTORE_BASE_TIMEOUT_S + part.size / RESTORE_BYTES_PER_S
        read_fd, write_fd = os.pipe()
        widen_pipe(write_fd)
        feeder = Feeder(path, part, write_fd, progress)  # closes write_fd, started or not
        try:
            disk = self._prepare(flavour, manifest, rundir)
            guest = self._launch(flavour, manifest, rundir, disk, incoming_fd=read_fd, mode="restore", ram=ram)
        except BaseException:
            feeder.discard()
            raise
        finally:
            os.close(read_fd)  # QEMU has its own copy
        try:
            try:
                guest.connect(max(1.0, deadline - time.monotonic()))
                if ram is not None:
                    self._start_incoming(guest, read_fd, ignore_shared)
            except BaseException as e:
                feeder.discard()
                if isinstance(e, HypervisorError) and guest.wait_exit(2.0) and guest.exit_reason:
                    raise HypervisorError(f"restore {flavour.name}", guest.exit_reason) from None
                raise
            # QEMU answers its monitor once its machine is made, its disks opened: only now
            # does the feed read the statefile, so that on a seek-bound medium the disks'
            # headers are not read between its blocks (a 1 MiB pipe is all an earlier start
            # could have filled anyway)
            feeder.start()
            failure: HypervisorError | None = None
            try:
                loaded = self._wait_loaded(guest, deadline, feeder, self._aborting)
            except HypervisorError as e:
                if self._aborting.is_set():
                    raise
                if not guest.wait_exit(2.0):
                    if time.monotonic() >= deadline:
                        raise TimeoutError(str(e)) from None  # reported as the watchdog's
                    # QEMU is stuck (or slow to exit under load): end it, and let the
                    # feed, which reads the file to its end, judge the statefile first
                    guest.stop()
                    failure = e
                loaded = False  # QEMU refused the stream: its words are in exit_reason
            result = feeder.result(max(1.0, deadline - time.monotonic()))
            if result.medium_error is not None:
                raise MediumUnavailable(str(path), f"reading the statefile failed: {result.medium_error}")
            if result.problem is not None:
                raise StatefileCorrupt(str(path), result.problem)
            if failure is not None:
                raise failure
            if not loaded:
                raise HypervisorError(f"restore {flavour.name}", guest.exit_reason or "QEMU did not load the stream")
            if ignore_shared:  # a save of this guest must carry its RAM again
                self._set_ignore_shared(guest, False)
            return guest
        except TimeoutError as e:
            feeder.cancel()
            guest.stop()
            raise HypervisorError(f"restore {flavour.name}", f"watchdog: {e}") from None
        except BaseException:
            feeder.cancel()
            guest.stop()
            raise

    @staticmethod
    def _set_ignore_shared(guest: QemuGuest, on: bool) -> None:
        guest.qmp.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": "x-ignore-shared", "state": on}]})

    def _start_incoming(self, guest: QemuGuest, fd: int, ignore_shared: bool) -> None:
        """Start a deferred incoming migration from ``fd`` (QEMU's inherited copy of it)."""
        if ignore_shared:
            self._set_ignore_shared(guest, True)
        guest.qmp.execute("migrate-incoming", {"uri": f"fd:{fd}"})

    @staticmethod
    def _wait_loaded(guest: QemuGuest, deadline: float, feeder: Feeder, aborting: threading.Event) -> bool:
        """Poll until the incoming stream is loaded (the guest waits, paused); False if QEMU died
        or the feed failed (QEMU then waits for input that never comes: its verdict is the feed's).

        :raises TimeoutError: the watchdog's deadline passed.
        """
        while time.monotonic() < deadline:
            if aborting.is_set():
                raise HypervisorError(f"restore {guest.name}", "cancelled: the manager is shutting down")
            if not guest.is_alive() or feeder.failure() is not None:
                return False
            try:
                status = guest.status(timeout=max(0.5, deadline - time.monotonic()))
            except HypervisorError:
                if not guest.wait_exit(0.5):
                    raise
                return False
            if status in ("paused", "postmigrate", "prelaunch"):
                return True
            if status == "running":  # a stream saved while running: pause to check it first
                guest.pause()
                return True
            if status not in ("inmigrate", "restore-vm"):
                raise HypervisorError(f"restore {guest.name}", f"unexpected state {status!r} while loading")
            time.sleep(0.005)
        raise TimeoutError("the stream was not loaded before the deadline")

    # -- cold boot -----------------------------------------------------------------
    def cold_boot(self, flavour: Flavour, manifest: Manifest, rundir: Path, accel: str | None = None) -> QemuGuest:
        """Boot the flavour from its kernel and initrd; returns once it printed its ready line.

        :raises MediumUnavailable: the kernel, initrd or disk is missing.
        :raises HypervisorError: QEMU died or the guest was not ready in time.
        """
        cb = flavour.cold_boot
        for rel in (cb.kernel, cb.initrd, flavour.iso):
            if rel is not None and not manifest.resolve(rel).is_file():
                raise MediumUnavailable(str(manifest.resolve(rel)), "needed for a cold boot but missing")
        disk = self._prepare(flavour, manifest, rundir, cold=True)
        accel = accel or self._accel_for(flavour, manifest)
        guest = self._launch(flavour, manifest, rundir, disk, accel=accel, mode="boot")
        try:
            guest.connect(10.0)
            self._wait_ready(guest, flavour, f"cold boot {flavour.name}")
            return guest
        except BaseException:
            guest.stop()
            raise

    # -- readiness and freshness ----------------------------------------------------------
    def _wait_ready(self, guest: QemuGuest, flavour: Flavour, what: str) -> None:
        """Until the flavour is ready as its manifest says: its console's ready line, the
        guest agent's ``ready`` on the channel, or a settled screen.

        :raises HypervisorError: QEMU died, the manager is shutting down, or not ready in time.
        """
        cb = flavour.cold_boot
        alive = lambda: guest.is_alive() and not self._aborting.is_set()  # noqa: E731
        if flavour.readiness == "channel" and guest.channel is not None:
            ok = guest.channel.wait_ready(cb.timeout_s, alive)
        elif flavour.readiness == "screen":
            ok = self._wait_settled(guest, cb.timeout_s, alive, plain_quiet_s=SETTLE_QUIET_PLAIN_SCREEN_ONLY_S)
        else:
            ok = wait_for_text(guest.rundir / "console.log", cb.ready_line, cb.timeout_s, alive)
        if not ok:
            self._check_abort(what)
            why = guest.exit_reason if not guest.is_alive() else f"not ready within {cb.timeout_s:.0f} s"
            raise HypervisorError(what, why or "QEMU exited")

    @staticmethod
    def _wait_settled(guest: QemuGuest, timeout: float, alive: Callable[[], bool],
                      plain_quiet_s: float = SETTLE_QUIET_PLAIN_S) -> bool:
        """Until the screen changed and then stayed the same: for :data:`SETTLE_QUIET_S` once
        it is painted (many colours), for ``plain_quiet_s`` while it is plain (a black screen
        before the desktop paints itself, or a text console that stays one; longer when
        nothing else says that the system is up),
        and for :data:`SETTLE_QUIET_TEXT_MODE_S` in the PC's text mode, which a booting
        kernel shows, silent, for as long as it loads (a running system has left it).
        A blank screen (nothing but a cursor) never counts as settled, however long it
        stays: on a loaded host a live system's kernel and X server show one for minutes."""
        deadline = time.monotonic() + timeout
        samples: list[tuple[float, str]] = []
        painted = text_mode = empty = False
        while time.monotonic() < deadline and alive():
            try:
                picture = guest.screendump()
                samples.append((time.monotonic(), digest(picture)))
                painted = colours(picture) >= PAINTED_COLOURS
                text_mode = (picture.width, picture.height) == TEXT_MODE
                empty = not painted and blank(picture)
            except HypervisorError:
                if not guest.is_alive():
                    return False
            quiet = (SETTLE_QUIET_S if painted else SETTLE_QUIET_TEXT_MODE_S if text_mode
                     else plain_quiet_s)
            if not empty and settled(samples, quiet):
                return True
            samples = samples[-int(2 * max(quiet, plain_quiet_s) / SETTLE_SAMPLE_S):] if len(samples) > 400 else samples
            time.sleep(SETTLE_SAMPLE_S)
        return False

    @staticmethod
    def _freshen(guest: QemuGuest, flavour: Flavour) -> str:
        """After a restore, before the session counts as running: every user of the medium
        restores the same RAM, so the guest gets the host's time and renews its network (its
        random generator was reseeded by the VM generation ID that QEMU changed).

        :returns: a note for the session's reason when something could not be done.
        """
        if flavour.readiness != "channel":
            # our agent (channel readiness) and qemu-guest-agent come together in a flavour;
            # one that only has the port (the demo guests: install requests) has no agent
            return ""
        try:
            with guest.agent() as agent:
                offset = clock_offset(agent)
                status, _, err = agent.run(["/bin/sh", "-c", freshen_script(flavour, offset)], timeout=10.0)
            if status != 0:
                raise AgentError(f"setting the clock said {err[-200:].decode(errors='replace')}")
        except AgentError as e:
            log.warning("%s: restored, but not freshened: %s", guest.name, e, extra={"SESSION": guest.name})
            return f"its clock may be old: {e}"
        return ""

    # -- adoption --------------------------------------------------------------------
    def adopt(self, name: str, rundir: Path) -> QemuGuest | None:
        """Reattach to a QEMU a previous manager started in ``rundir``; None if it is gone."""
        try:
            record = json.loads((rundir / "guest.json").read_text())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if str(rundir / "qmp.sock").encode() not in b"\0".join(cmdline):
            return None  # the pid was reused by another process
        guest = QemuGuest(name, rundir, None, pid)
        if (rundir / "guest.sock").exists():
            guest.attach_channel(name)
        try:
            guest.connect(5.0)
        except HypervisorError:
            guest.detach()
            return None
        return guest

    # -- saving (mastering) ------------------------------------------------------------
    def boot_for_save(self, flavour: Flavour, manifest: Manifest, rundir: Path, disk: Path | None) -> QemuGuest:
        """Cold boot with the given disk (the overlay that will travel with the statefile)."""
        rundir.mkdir(parents=True, exist_ok=True)
        for stale in ("qmp.sock", "serial.sock", "guest.sock", "qga.sock", "console.log"):
            (rundir / stale).unlink(missing_ok=True)
        guest = self._launch(flavour, manifest, rundir, disk, vnc=False, mode="master")
        try:
            guest.connect(10.0)
            self._wait_ready(guest, flavour, f"boot {flavour.name} for mastering")
            return guest
        except BaseException:
            guest.stop()
            raise

    def settle(self, guest: QemuGuest, flavour: Flavour, timeout: float = SETTLE_AFTER_READY_S) -> bool:
        """Until the screen has settled (a desktop paints itself seconds after its session
        said it runs); False if it still changes after ``timeout`` (a clock, an animation)."""
        return self._wait_settled(guest, timeout, guest.is_alive)

    def prepare_for_save(self, guest: QemuGuest, flavour: Flavour | None = None) -> None:
        """Through the guest agent: write dirty pages, drop the page cache (freed pages are
        zeroed with ``init_on_free``, so they compress to nothing), and draw from the random
        generator so that it was reseeded just before the save. Then run what a restore
        runs first (:func:`freshen_script`) and idle :data:`WARM_AFTER_DROP_S`, so that the
        guest's first seconds after a restore read nothing from the medium.

        A flavour whose agent does not answer is saved as it is (a bigger statefile).
        """
        try:
            with guest.agent(timeout=30.0) as agent:
                status, _, err = agent.run(["/bin/sh", "-c", PREPARE_FOR_SAVE], timeout=120.0)
                if status != 0:
                    log.warning("%s: preparing for the save said %s", guest.name, err[:200])
                if flavour is not None:
                    status, _, err = agent.run(["/bin/sh", "-c", freshen_script(flavour, clock_offset(agent))],
                                               timeout=60.0)
                    if status != 0:
                        log.warning("%s: the restore's first command said %s", guest.name, err[:200])
            time.sleep(WARM_AFTER_DROP_S)
        except AgentError as e:
            log.warning("%s: saved without dropping its caches: %s", guest.name, e)

    def save_lazy_image(self, flavour: Flavour, manifest: Manifest, rundir: Path, level: int = 3) -> LazyImage:
        """Split the flavour's statefile for a lazy restore: its RAM as an image, its devices' state alone.

        The statefile is loaded (and checked) into a RAM file that QEMU writes through,
        then the devices' state is saved without the RAM; the guest never runs in
        between, so the two match exactly. Both go next to the statefile; the image is
        decoded once more, as a restore will, to check it and to measure what it holds.
        Needs a QEMU that maps lazily (:func:`.lazyram.maps_private_readonly`).
        """
        sf = flavour.statefile
        assert sf is not None
        if not maps_private_readonly(self.binary):
            raise HypervisorError(f"split {flavour.name}",
                                  f"{self.binary} cannot map a RAM image (QEMU 8.2 or later can)")
        rel = Path(sf.path).parent
        fdir = manifest.resolve(str(rel))
        rundir.mkdir(parents=True, exist_ok=True)
        image = rundir / "ram.img"
        image.unlink(missing_ok=True)
        try:
            guest = self._load(flavour, manifest, rundir, manifest.resolve(sf.path), sf, lambda done, total: None,
                               ram=RamFile(image, flavour.memory_mib, writable=True))
            try:
                self._set_ignore_shared(guest, True)
            except BaseException:
                guest.stop()
                raise
            devices = self.save(guest, fdir / "lazy-devices.zst", level=level)  # QEMU quits
            ram_path = fdir / "lazy-ram.zst"
            _run_tool(["zstd", "-q", f"-{level}", "-T0", "--check", "-f", str(image), "-o", str(ram_path)],
                      "compress the RAM image", timeout=SAVE_TIMEOUT_S * 10)
            ram = StatePart(path=str(rel / ram_path.name), size=ram_path.stat().st_size, sha256=sha256_of(ram_path),
                            compression="zstd", raw_size=image.stat().st_size)
            decode_ram_image(ram_path, ram, image)
            held = held_mib(image)
        finally:
            image.unlink(missing_ok=True)
        return LazyImage(ram=ram, devices=StatePart(path=str(rel / devices.path.name), size=devices.size,
                                                    sha256=devices.sha256, compression="zstd",
                                                    raw_size=devices.raw_size), held_mib=held)

    def save(self, guest: QemuGuest, dest: Path, compress: bool = True, level: int = 3,
             still: Path | None = None) -> SaveResult:
        """Stop the guest and write its state to ``dest`` (zstd with frame checksums), then quit it.

        ``still``: where to write the screen as it is saved (PNG), taken once the guest
        stopped, so that it is exactly the screen a restore starts with.

        :raises HypervisorError: the migration failed or timed out.
        """
        guest.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        guest.qmp.execute("stop")
        if still is not None:
            still.write_bytes(to_png(guest.screendump()))
        part = dest.with_name(dest.name + ".part")
        read_fd, write_fd = os.pipe()
        out = open(part, "wb")
        zstd = None
        relayed = False  # once the relay runs, it owns (and closes) read_fd
        try:
            if compress:
                zstd = subprocess.Popen(["zstd", "-q", f"-{level}", "-T0", "--check", "-c"],
                                        stdin=subprocess.PIPE, stdout=out, stderr=subprocess.PIPE)
            raw = {"n": 0}

            def relay() -> None:  # counts the raw stream on its way to zstd
                sink = zstd.stdin if zstd is not None else out
                with os.fdopen(read_fd, "rb", buffering=0) as src:
                    while block := src.read(1 << 20):
                        raw["n"] += len(block)
                        sink.write(block)
                if zstd is not None:
                    zstd.stdin.close()

            t = threading.Thread(target=relay, name=f"save-{guest.name}", daemon=True)
            t.start()
            relayed = True
            guest.qmp.send_fd(write_fd, "statefile")
            os.close(write_fd)
            write_fd = -1
            guest.qmp.execute("migrate", {"uri": "fd:statefile"})
            deadline = time.monotonic() + SAVE_TIMEOUT_S
            while True:
                info = guest.qmp.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise HypervisorError(f"save {guest.name}", f"migration {status}: {info.get('error-desc', '')}")
                if time.monotonic() > deadline:
                    raise HypervisorError(f"save {guest.name}", f"migration not done within {SAVE_TIMEOUT_S:.0f} s")
                time.sleep(0.01)
            guest.stop()  # QEMU closes the stream when it quits at the latest
            t.join(60)
            if zstd is not None:
                err = zstd.stderr.read() if zstd.stderr else b""
                zstd.wait(60)
                if zstd.returncode != 0:
                    raise HypervisorError("zstd", f"status {zstd.returncode}", err.decode(errors="replace"))
            out.flush()
            os.fsync(out.fileno())
        except BaseException:
            guest.stop()  # a failed save leaves nothing running and nothing half-written
            if zstd is not None and zstd.poll() is None:
                zstd.kill()
                zstd.wait()
            part.unlink(missing_ok=True)
            raise
        finally:
            if write_fd >= 0:
                os.close(write_fd)
            if not relayed:
                os.close(read_fd)
            if zstd is not None and zstd.stderr is not None:
                zstd.stderr.close()
            out.close()
        part.replace(dest)
        return SaveResult(path=dest, size=dest.stat().st_size, sha256=sha256_of(dest), raw_size=raw["n"])


def _meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0])
    return out


def _run_tool(argv: list[str], what: str, timeout: float = 30.0) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, timeout=timeout, text=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HypervisorError(what, str(e)) from e
    if p.returncode != 0:
        raise HypervisorError(what, f"{argv[0]} exited with status {p.returncode}", p.stderr)
    return p.stdout
