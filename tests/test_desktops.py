"""Real flavours (Debian desktops, a server, a live ISO) restored for real under QEMU
(TCG): the saved screen, a heartbeat that goes on, a fresh clock and random generator,
a session disk that keeps its writes to itself, the live ISO attached, a cold boot
when the statefile is damaged.

The flavours are built from Debian's packages and the medium mastered once per
machine (a machine-wide cache; see ``xsession.demomedia``): the first run of this
file on a fresh machine takes several minutes, later ones start at once.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import pytest

from xsession.demomedia import lazy_qemu
from xsession.engine import State
from xsession.hypervisor.qemu import QemuBackend, QemuGuest
from xsession.manifest import MANIFEST_RELPATH, Manifest, load_manifest
from xsession.mastering.master import MASTERING_VMGENID
from xsession.screen import colours, read_png, same_picture, to_png
from xsession.statefile import sha256_of

from .conftest import ARTIFACTS, linked_copy
from .guestlib import damage

FLAVOURS = ("xubuntu", "lubuntu", "server")
#: a restored desktop under emulation answers within seconds; a cold boot takes about a minute
HEARTBEAT_S = 60.0



@pytest.fixture
def dmedium(desktop_medium: Path, tmp_path: Path) -> Path:
    """A private copy (hard links) of the desktop medium that a test may damage."""
    return linked_copy(desktop_medium, tmp_path / "dmedium")


@pytest.fixture
def dmanifest(desktop_medium: Path) -> Manifest:
    return load_manifest(desktop_medium / MANIFEST_RELPATH)


def _restore(backend: QemuBackend, manifest: Manifest, name: str, rundir: Path) -> QemuGuest:
    guest = backend.restore(manifest.flavour(name), manifest, rundir, lambda d, t: None)
    assert isinstance(guest, QemuGuest)
    return guest


def _in_guest(guest: QemuGuest, script: str, timeout: float = 60.0) -> str:
    with guest.agent(timeout=30.0) as agent:
        status, out, err = agent.run(["/bin/sh", "-c", script], timeout=timeout)
    assert status == 0, f"{script!r}: {status} {err[-300:]!r}"
    return out.decode(errors="replace")


@pytest.mark.parametrize("way", ["stream", "lazy"])
@pytest.mark.parametrize("name", FLAVOURS)
def test_a_restored_flavour_shows_its_saved_screen_and_lives_on(name, way, dmanifest, runtime_dir):
    """Each way: the stream (Debian 12's QEMU) and lazily, the RAM image mapped (QEMU 10)."""
    flavour = dmanifest.flavour(name)
    assert flavour.readiness == "channel" and flavour.still and flavour.machine.vmgenid
    backend = QemuBackend(binary=lazy_qemu()) if way == "lazy" else QemuBackend()
    guest = _restore(backend, dmanifest, name, runtime_dir / name)
    try:
        assert guest.restored_lazily is (way == "lazy"), guest.note
        screen = guest.screendump()
        still = read_png(dmanifest.resolve(flavour.still).read_bytes())
        if flavour.name != "server":  # the server's screen is a text console
            assert colours(still) > 16, "a blank still"
        # the screen the person meets is the one saved (a clock or a cursor may have moved)
        if not same_picture(screen, still, tolerance=0.02):
            shots = ARTIFACTS / "desktops"
            shots.mkdir(parents=True, exist_ok=True)
            (shots / f"{name}-{way}-restored.png").write_bytes(to_png(screen))
            raise AssertionError(f"{name}: the restored screen differs from the still (kept in {shots})")
        assert guest.note == "", guest.note  # freshened: clock set, network renewed
        assert guest.channel is not None
        first = guest.channel.wait_heartbeat(0, HEARTBEAT_S, guest.is_alive)
        assert first is not None and first > 1, "no heartbeat after the restore, or it started again"
        assert guest.channel.wait_heartbeat(first, 15.0, guest.is_alive) is not None, "the heartbeat stopped"
        assert guest.channel.refused == 0
        # inside: what its recipe built (a live system on its CD, an installed root, the services)
        mounts = _in_guest(guest, "cat /proc/mounts")
        if flavour.source == "iso":
            assert re.search(r"^/dev/sr0 /run/live/medium iso9660 ro[ ,]", mounts, re.M), mounts
            assert re.search(r"^overlay / overlay", mounts, re.M), mounts
        else:
            assert re.search(r"^/dev/vda / ext4 rw", mounts, re.M), mounts
        if name == "server":
            listening = _in_guest(guest, "ss -Htln")
            assert ":445 " in listening and ":5232 " in listening, listening
        else:  # the desktop user's own session sends the messages
            assert "user" in _in_guest(guest, "ps -o user= -C xenubuntu-agent")
    finally:
        guest.stop()


def test_the_clock_and_the_random_generator_are_fresh_after_each_restore(dmanifest, runtime_dir):
    """Every user restores the same RAM: the clock must be the host's, and the random
    generator reseeded. QEMU gives each restore a new VM generation ID (not the one the
    statefile was saved with); Debian's kernel reseeds when it changes."""
    reads, generations = [], []
    for i in range(2):
        guest = _restore(QemuBackend(), dmanifest, "server", runtime_dir / f"server-{i}")
        try:
            generations.append(guest.qmp.execute("query-vm-generation-id")["guid"].lower())
            before = time.time()
            out = _in_guest(guest, "date +%s.%N; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'")
            after = time.time()
            guest_time, random_hex = out.split()
            assert before - 1.0 <= float(guest_time) <= after + 1.0, (before, guest_time, after)
            reads.append(random_hex)
        finally:
            guest.stop()
    assert reads[0] != reads[1], "two restores of the same statefile drew the same random bytes"
    assert len(set(generations)) == 2 and MASTERING_VMGENID not in generations, generations


def test_without_freshening_the_guest_keeps_the_saved_generation_and_clock(dmanifest, runtime_dir):
    """The control: restored with the generation ID it was saved with and without the
    agent setting its clock, the guest keeps the saved generation, and its clock is the
    save's: at most the few seconds it has run since the restore past the mastering."""
    import datetime
    backend = QemuBackend(vmgenid_guid=MASTERING_VMGENID, freshen=False)
    guest = _restore(backend, dmanifest, "server", runtime_dir / "stale")
    try:
        assert guest.qmp.execute("query-vm-generation-id")["guid"].lower() == MASTERING_VMGENID
        guest_time = float(_in_guest(guest, "date +%s.%N"))
    finally:
        guest.stop()
    mastered = datetime.datetime.fromisoformat(dmanifest.created.replace("Z", "+00:00")).timestamp()
    assert guest_time < mastered + 60, (guest_time, mastered)  # saved before the manifest was written
    if time.time() - mastered > 120:  # an older medium: the stale clock is plainly behind
        assert guest_time < time.time() - 60


def test_writes_stay_in_the_session_overlay_and_reset_brings_back_the_pristine_flavour(dmedium, make_engine,
                                                                                     runtime_dir):
    manifest = load_manifest(dmedium / MANIFEST_RELPATH)
    flavour = manifest.flavour("server")
    assert flavour.disk is not None and flavour.disk.saved_overlay is not None
    saved = manifest.resolve(flavour.disk.saved_overlay)
    base = manifest.resolve(flavour.disk.base)
    before = (sha256_of(saved), base.stat().st_mtime_ns, base.stat().st_size)
    engine = make_engine(manifest, "xenubuntu.restore=off")
    engine.activate("server")
    assert engine.wait_state("server", {State.RUNNING, State.FAILED}, 120).state is State.RUNNING
    guest = engine._sessions["server"].guest  # the engine's own guest, for its agent
    assert isinstance(guest, QemuGuest)
    _in_guest(guest, "dd if=/dev/urandom of=/root/written-in-session bs=1M count=8 && sync")
    overlay = runtime_dir / "sessions" / "server" / "disk.qcow2"
    assert overlay.stat().st_size > 8 << 20, "the write did not land in the session's overlay"
    assert (sha256_of(saved), base.stat().st_mtime_ns, base.stat().st_size) == before
    engine.reset("server")
    assert engine.wait_state("server", {State.RUNNING, State.FAILED}, 120).state is State.RUNNING
    guest = engine._sessions["server"].guest
    assert isinstance(guest, QemuGuest)
    assert _in_guest(guest, "test -e /root/written-in-session && echo there || echo gone").strip() == "gone"
    assert (sha256_of(saved), base.stat().st_mtime_ns, base.stat().st_size) == before


def test_the_live_iso_flavour_restores_with_its_iso_attached(dmanifest, runtime_dir):
    flavour = dmanifest.flavour("lubuntu")
    assert flavour.source == "iso" and flavour.iso and flavour.disk is None
    guest = _restore(QemuBackend(), dmanifest, "lubuntu", runtime_dir / "lubuntu")
    try:
        blocks = guest.qmp.execute("query-block")
        cd = next(b for b in blocks if b.get("device") == "cd0" or "cd0" in b.get("qdev", ""))
        assert cd["inserted"]["ro"] and cd["inserted"]["file"] == str(dmanifest.resolve(flavour.iso))
        # the live system keeps reading its squashfs from the CD after the restore
        out = _in_guest(guest, "head -c 4 /run/live/medium/live/filesystem.squashfs")
        assert out == "hsqs", out
    finally:
        guest.stop()


def test_a_damaged_statefile_of_a_real_flavour_cold_boots_it(dmedium, make_engine):
    damage(dmedium / "xenubuntu/flavours/server/state.zst")
    engine = make_engine(load_manifest(dmedium / MANIFEST_RELPATH), "xenubuntu.restore=off")
    engine.activate("server")
    view = engine.wait_state("server", {State.RUNNING, State.FAILED}, 600)
    assert view.state is State.RUNNING and view.origin == "cold-booted", view.reason
    assert "sha256 mismatch" in view.reason or "zstd rejected the stream" in view.reason, view.reason
    guest = engine._sessions["server"].guest
    assert isinstance(guest, QemuGuest) and guest.channel is not None and guest.channel.ready.is_set()


def test_a_live_iso_we_did_not_build_is_ready_when_its_screen_settles(dmanifest, runtime_dir):
    """A distribution's live ISO says nothing to us: it boots through its own boot loader
    and counts as ready once its screen stopped changing. The LXQt ISO stands in for one:
    no kernel given, no guest channel, readiness by the screen."""
    lubuntu = dmanifest.flavour("lubuntu")
    # a user-mode NIC: the backend here has no internal network, and a live system whose
    # NIC is plugged into nothing waits for DHCP on a still, black screen
    foreign = dataclasses.replace(
        lubuntu, name="foreign", statefile=None, readiness="screen",
        machine=dataclasses.replace(lubuntu.machine, guest_channel=False, nic="user"),
        cold_boot=dataclasses.replace(lubuntu.cold_boot, kernel=None, initrd=None, ready_line=""))
    manifest = dataclasses.replace(dmanifest, flavours=(foreign,), default="foreign")
    guest = QemuBackend().cold_boot(foreign, manifest, runtime_dir / "foreign")
    try:
        assert guest.channel is None
        log = (runtime_dir / "foreign" / "console.log").read_text(errors="replace")
        assert "GNU GRUB" in log, "it did not boot through the ISO's own boot loader"
        assert colours(guest.screendump()) > 16, "ready before the desktop was painted"
    finally:
        guest.stop()


@pytest.mark.parametrize("name", ["server", "xubuntu"])
def test_install_this_flavour_from_inside_asks_dom0_and_shows_the_answer(name, dmanifest, make_engine):
    """The server's command and the desktop's menu entry (its Exec, as the desktop's user)
    reach dom0 through the agent and the channel as a pending job; the answer comes back."""
    from xsession.install.manager import InstallManager

    engine = make_engine(dmanifest, "xenubuntu.restore=off")
    install = InstallManager(engine, medium=lambda: None)
    engine.activate(name)
    assert engine.wait_state(name, {State.RUNNING, State.FAILED}, 120).state is State.RUNNING
    guest = engine._sessions[name].guest
    assert isinstance(guest, QemuGuest)
    if name == "server":
        command = "nohup xenubuntu-install > /root/install.out 2>&1 &"
        out = "/root/install.out"
    else:
        entry = _in_guest(guest, "cat /usr/share/applications/xenubuntu-install.desktop")
        assert "Name=Install this flavour" in entry
        exec_line = next(line.split("=", 1)[1] for line in entry.splitlines() if line.startswith("Exec="))
        command = (f"su user -c 'XDG_RUNTIME_DIR=/run/user/$(id -u user) nohup {exec_line} "
                   "> /tmp/install.out 2>&1 &'")
        out = "/tmp/install.out"
    _in_guest(guest, command)
    deadline = time.monotonic() + 30
    while not install.jobs.views():
        assert time.monotonic() < deadline, "no install job from the guest"
        time.sleep(0.1)
    job, = install.jobs.views()
    assert (job.session, job.flavour, job.state.value) == (name, name, "pending")
    for shown in ("Waiting for the confirmation in dom0", "cancelled in dom0"):
        deadline = time.monotonic() + 30
        while shown not in (said := _in_guest(guest, f"cat {out}")):
            assert time.monotonic() < deadline, said
            time.sleep(0.5)
        if shown.startswith("Waiting"):
            install.jobs.cancel(job.number)


def test_what_an_install_copies_comes_from_the_medium_as_mastered(dmanifest, make_engine):
    """A disk flavour: its base image on the medium (not a session's overlay), its kernel and
    initramfs; a live ISO's root cannot be installed, and says so."""
    from xsession.install.errors import InstallFailed
    from xsession.install.manager import InstallManager

    install = InstallManager(make_engine(dmanifest, "xenubuntu.restore=off"), medium=lambda: None)
    server = install.source("server")
    flavour = dmanifest.flavour("server")
    assert flavour.disk is not None
    assert server.root_image == dmanifest.resolve(flavour.disk.base)
    assert server.root_image_size > server.root_image.stat().st_size // 2
    assert server.kernel == dmanifest.resolve(flavour.cold_boot.kernel)
    assert install.needed("server") > server.root_image_size
    with pytest.raises(InstallFailed, match="live ISO"):
        install.source("lubuntu")
