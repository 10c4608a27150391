"""Lazy restores for real: the demo medium's RAM images mapped copy-on-write by a QEMU
that can (Debian 12's backport of QEMU 10), and the stream wherever that cannot be."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xsession.demomedia import lazy_qemu
from xsession.engine import State
from xsession.hypervisor.lazyram import maps_private_readonly
from xsession.hypervisor.qemu import QEMU_BINARY, QemuBackend
from xsession.manifest import MANIFEST_RELPATH, load_manifest

from .buslib import MANAGER_IFACE, MANAGER_PATH
from .guestlib import ask, counters, damage, session_qemu_pid, wait_for
from .test_restore import _one_session_at_a_time, _wait_preloaded

FLAVOUR = "kubuntu"


@pytest.fixture(scope="module")
def qemu10() -> str:
    return lazy_qemu()


def _continues(guest) -> None:
    """The guest counts on from where it was saved, never booting again."""
    answer = ask(guest.console["serial"], "PING lazy")
    saved = int(answer.rsplit("counter=", 1)[1])
    log = wait_for(guest.console["log"], b"COUNTER %d" % (saved + 2))
    seen = counters(log)
    assert seen == list(range(seen[0], seen[0] + len(seen))) and seen[0] in (saved, saved + 1), seen
    assert b"XS-BOOT" not in log, "the guest booted again"


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def test_only_a_qemu_of_8_2_or_later_can_map_a_ram_image(qemu10):
    assert maps_private_readonly(qemu10)
    assert not maps_private_readonly(QEMU_BINARY), "Debian 12's QEMU 7.2 maps the file but its guest stays frozen"
    assert not maps_private_readonly("/nonexistent/qemu-system-x86_64")


def test_a_lazy_restore_runs_on_the_mapped_image_and_continues_where_it_was_saved(manifest, runtime_dir, qemu10):
    flavour = manifest.flavour(FLAVOUR)
    backend = QemuBackend(binary=qemu10)
    assert backend.restores_lazily(flavour)
    guest = backend.restore(flavour, manifest, runtime_dir / FLAVOUR, lambda done, total: None)
    try:
        assert guest.restored_lazily and "lazy" not in guest.note
        _continues(guest)
        # the guest's RAM is the decoded image, mapped private from a file that is gone from
        # the run folder: its memory lives as long as QEMU, nothing is left behind
        assert not (runtime_dir / FLAVOUR / "ram.img").exists()
        maps = Path(f"/proc/{guest.pid}/maps").read_text().splitlines()
        ram = [m for m in maps if m.endswith("ram.img (deleted)")]
        assert ram and all(m.split()[1].endswith("p") for m in ram), ram
        # it holds only what it touched: far less than the guest's memory, which an eager
        # restore fills with every page it loads
        status = _status(guest.pid)
        assert status["RssShmem"] > 0, "the guest runs on the image's own pages"
        assert status["RssAnon"] < flavour.memory_mib * 1024 // 2, status
    finally:
        guest.stop()


def test_a_lazy_and_an_eager_restore_show_the_same_screen(manifest, runtime_dir, qemu10):
    flavour = manifest.flavour(FLAVOUR)
    pictures = []
    for backend in (QemuBackend(binary=qemu10), QemuBackend(binary=qemu10, lazy=False)):
        guest = backend.restore(flavour, manifest, runtime_dir / f"{FLAVOUR}-{len(pictures)}",
                                lambda done, total: None)
        try:
            assert guest.restored_lazily is backend.lazy
            pictures.append(guest.screendump())
        finally:
            guest.stop()
    lazy, eager = pictures
    assert (lazy.width, lazy.height) == (eager.width, eager.height)
    assert lazy.rgb == eager.rgb


@pytest.mark.parametrize("part", ["ram", "devices"])
def test_a_damaged_lazy_image_is_caught_and_the_stream_restores_instead(part, medium, runtime_dir, qemu10):
    manifest = load_manifest(medium / MANIFEST_RELPATH)
    lazy = manifest.flavour(FLAVOUR).statefile.lazy
    damage(manifest.resolve(getattr(lazy, part).path))
    guest = QemuBackend(binary=qemu10).restore(manifest.flavour(FLAVOUR), manifest, runtime_dir / FLAVOUR,
                                               lambda done, total: None)
    try:
        assert not guest.restored_lazily
        assert "the lazy restore failed" in guest.note, guest.note
        assert "sha256 mismatch" in guest.note or "zstd" in guest.note, guest.note
        _continues(guest)
    finally:
        guest.stop()


def test_where_qemu_cannot_map_the_image_the_stream_restores_and_the_plan_holds_no_image(manifest, runtime_dir,
                                                                                       qemu10):
    flavour = manifest.flavour(FLAVOUR)
    old, new = QemuBackend(), QemuBackend(binary=qemu10)
    assert not old.restores_lazily(flavour)
    # a lazy guest's decoded image stays as long as it runs, beside the pages it writes
    assert new.overhead_mib(flavour) == old.overhead_mib(flavour) + flavour.statefile.lazy.held_mib
    guest = old.restore(flavour, manifest, runtime_dir / FLAVOUR, lambda done, total: None)
    try:
        assert not guest.restored_lazily and "lazy" not in guest.note
        _continues(guest)
    finally:
        guest.stop()


def test_the_engine_restores_the_default_lazily_and_the_rest_in_order(manifest, make_engine, qemu10):
    engine = make_engine(manifest, f"xenubuntu.restore=eager xenubuntu.flavour={FLAVOUR}",
                         backend=QemuBackend(binary=qemu10))
    engine.start()
    for name in manifest.names:
        view = engine.wait_state(name, {State.RUNNING, State.FAILED}, 120)
        assert view.state is State.RUNNING and view.origin == "restored", (name, view.reason)
        assert "PONG" in ask(view.console["serial"], "PING engine")
        assert engine._sessions[name].guest.restored_lazily, name


@pytest.mark.parametrize("damaged", [False, True], ids=["whole", "damaged-in-ram"])
def test_a_preloaded_ram_image_starts_the_next_flavour_lazily_and_a_damaged_one_gives_way(damaged, manifest,
                                                                                         make_engine, qemu10):
    """The preload copies what a lazy restore reads (the RAM image, the devices' state); the
    switch decodes from RAM. Damaged there, it is caught, and the stream restores instead."""
    engine = make_engine(manifest, f"xenubuntu.restore=lazy xenubuntu.flavour={FLAVOUR}",
                         backend=QemuBackend(binary=qemu10), fit_check=_one_session_at_a_time, preload=True)
    reasons: list[tuple[str, str]] = []
    engine.subscribe(lambda ev, v: reasons.append((v.name, v.reason)) if ev == "state-changed" else None)
    engine.start()
    assert engine.wait_state(FLAVOUR, {State.RUNNING, State.FAILED}, 60).state is State.RUNNING
    _wait_preloaded(engine, ["ubuntu"])
    lazy = manifest.flavour("ubuntu").statefile.lazy
    image = lazy.ram
    assert engine.running_memory()["ubuntu (preloaded)"] == -(-(image.size + lazy.devices.size) // (1 << 20))
    if damaged:
        with engine._lock:
            fd = os.open(engine._preloads["ubuntu"].sources()[0], os.O_RDWR)
        try:
            byte = os.pread(fd, 1, image.size // 2)
            os.pwrite(fd, bytes([byte[0] ^ 0xFF]), image.size // 2)
        finally:
            os.close(fd)
    engine.stop(FLAVOUR)  # room for one: the next waiting flavour starts, from RAM
    view = engine.wait_state("ubuntu", {State.RUNNING, State.FAILED}, 120)
    assert view.state is State.RUNNING and view.origin == "restored", view.reason
    assert ("ubuntu", "reading the statefile from RAM (preloaded)") in reasons
    guest = engine._sessions["ubuntu"].guest
    assert guest.restored_lazily is not damaged, guest.note
    if damaged:
        assert "the lazy restore failed" in guest.note and "zstd" in guest.note, guest.note
    assert "PONG" in ask(view.console["serial"], "PING preloaded")


def test_mastering_with_a_qemu_that_cannot_split_keeps_the_statefile_and_says_why(tmp_path):
    from xsession.demomedia import CACHE, DEMO
    from xsession.mastering.master import load_spec, master_medium
    spec = load_spec(DEMO / "flavours.yaml")
    spec = type(spec)(default="server", flavours=tuple(f for f in spec.flavours if f.name == "server"),
                      kernel=spec.kernel, cmdline=spec.cmdline, disk_mib=spec.disk_mib)
    lines: list[str] = []
    manifest = master_medium(spec, CACHE / "guests", tmp_path / "medium", report=lines.append,
                             lazy_qemu=QEMU_BINARY)
    sf = manifest.flavour("server").statefile
    assert sf is not None and sf.lazy is None
    assert any("not split for lazy restores" in line and "8.2 or later" in line for line in lines), lines


def test_a_damaged_statefile_does_not_stop_a_lazy_restore_whose_parts_are_whole(medium, runtime_dir, qemu10):
    """The lazy parts are checked on their own: a truncated stream is never read."""
    manifest = load_manifest(medium / MANIFEST_RELPATH)
    damage(manifest.resolve(manifest.flavour(FLAVOUR).statefile.path), truncate_to=1000)
    guest = QemuBackend(binary=qemu10).restore(manifest.flavour(FLAVOUR), manifest, runtime_dir / FLAVOUR,
                                               lambda done, total: None)
    try:
        assert guest.restored_lazily, guest.note
        _continues(guest)
    finally:
        guest.stop()


def _qemu_maps_image(runtime_dir: Path, name: str) -> bool:
    maps = Path(f"/proc/{session_qemu_pid(runtime_dir, name)}/maps").read_text().splitlines()
    return any(m.endswith("ram.img (deleted)") for m in maps)


def test_the_manager_maps_ram_images_where_nothing_merges_and_says_so(xsessiond, client, runtime_dir, qemu10):
    """xenubuntu.lazy=auto (the default) with merging off: the manager's QEMU 10 maps the
    restored session's RAM image, and the plan says why."""
    xsessiond("xenubuntu.restore=off xenubuntu.share=off", env={"XENUBUNTU_QEMU": qemu10})
    memory = client.prop(MANAGER_PATH, MANAGER_IFACE, "Memory")
    assert memory["lazy"].startswith("on: nothing merges"), memory
    client.activate(FLAVOUR)
    assert client.wait_state(FLAVOUR, {"running", "failed"}, 180) == "running"
    assert _qemu_maps_image(runtime_dir, FLAVOUR)


@pytest.mark.parametrize("cmdline, with_qemu10, reason", [
    ("xenubuntu.lazy=off", True, "off: xenubuntu.lazy=off"),
    # Debian 12's own QEMU cannot map: the stream, whatever the option says
    ("xenubuntu.lazy=on", False, "off: this QEMU cannot map"),
])
def test_the_manager_streams_when_told_or_when_its_qemu_cannot_map(cmdline, with_qemu10, reason, xsessiond, client,
                                                                   runtime_dir, qemu10):
    xsessiond(f"xenubuntu.restore=off xenubuntu.share=off {cmdline}",
              env={"XENUBUNTU_QEMU": qemu10} if with_qemu10 else {})
    assert client.prop(MANAGER_PATH, MANAGER_IFACE, "Memory")["lazy"].startswith(reason)
    client.activate(FLAVOUR)
    assert client.wait_state(FLAVOUR, {"running", "failed"}, 180) == "running"
    assert not _qemu_maps_image(runtime_dir, FLAVOUR)


def test_where_pages_are_merged_the_manager_streams(xsessiond, client, qemu10):
    """Merged pages are anonymous ones: with KSM on, a streamed guest ends smaller."""
    xsessiond("xenubuntu.restore=off xenubuntu.share=auto", env={"XENUBUNTU_QEMU": qemu10})
    memory = client.prop(MANAGER_PATH, MANAGER_IFACE, "Memory")
    assert memory["sharing"].startswith("on:") and memory["lazy"].startswith("off: identical pages are merged"), memory
