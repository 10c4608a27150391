"""Restoring the demo flavours for real (QEMU TCG): continuity, order, bad input, failures."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from xsession.engine import State
from xsession.errors import InvalidState, NotEnoughMemory
from xsession.hypervisor.qemu import QemuBackend
from xsession.manifest import MANIFEST_RELPATH, load_manifest
from xsession.statefile import sha256_of

from .guestlib import ask, counters, damage, read_log, wait_for

RUNNING = {State.RUNNING}
SETTLED = {State.RUNNING, State.FAILED}


def test_restored_guest_continues_where_it_was_saved(manifest, runtime_dir):
    backend = QemuBackend()
    flavour = manifest.flavour("kubuntu")
    guest = backend.restore(flavour, manifest, runtime_dir / "kubuntu", lambda d, t: None)
    try:
        answer = ask(guest.console["serial"], "PING one")
        assert "flavour=kubuntu" in answer
        saved_counter = int(answer.rsplit("counter=", 1)[1])
        assert saved_counter >= 1, "the guest was saved after it had counted"
        log = wait_for(guest.console["log"], b"COUNTER %d" % (saved_counter + 2))
        seen = counters(log)
        assert seen[0] in (saved_counter, saved_counter + 1), f"counter restarted: {seen}"
        assert seen == list(range(seen[0], seen[0] + len(seen))), f"counter not continuous: {seen}"
        assert b"XS-BOOT" not in log and b"XS-READY" not in log, "the guest booted again"
        # the disk overlay that existed at save time came along: one boot recorded
        disk = ask(guest.console["serial"], "sh:dd if=/dev/vda bs=512 count=1 2>/dev/null | head -n1",
                   expect=b"OUT XSDISK")
        assert disk == "OUT XSDISK kubuntu boots=1"
    finally:
        guest.stop()
    assert not guest.is_alive()


def _restore_order(engine) -> list[str]:
    order: list[str] = []
    engine.subscribe(lambda ev, v: order.append(v.name) if ev == "state-changed" and v.state is State.RESTORING
                     else None)
    return order


def test_lazy_restores_the_default_first_then_the_rest_in_priority_order(manifest, make_engine):
    engine = make_engine(manifest, "xenubuntu.flavour=xubuntu xenubuntu.restore=lazy")
    order = _restore_order(engine)
    engine.start()
    for name in engine.names:
        engine.wait_state(name, SETTLED, 120)
    assert order == ["xubuntu", "kubuntu", "ubuntu", "server"]
    views = engine.sessions()
    assert [v.name for v in views] == order
    for v in views:
        assert v.state is State.RUNNING and v.origin == "restored", v
        assert v.bytes_done == v.bytes_total > 0 and v.progress == 1.0
        assert v.console["vnc"].startswith("unix:")
        assert "PONG" in ask(v.console["serial"], "PING x")


def test_a_request_jumps_the_queue(manifest, make_engine):
    engine = make_engine(manifest, "xenubuntu.restore=eager", max_parallel=1)
    order = _restore_order(engine)
    progress: list[str] = []
    engine.subscribe(lambda ev, v: progress.append(v.name) if ev == "progress" else None)
    engine.start()
    engine.activate("server")
    assert engine.wait_idle(120)
    assert order == ["kubuntu", "server", "ubuntu", "xubuntu"]
    assert progress and set(progress) == set(order)


def test_off_restores_nothing_until_asked(manifest, make_engine):
    engine = make_engine(manifest, "xenubuntu.restore=off")
    engine.start()
    assert engine.wait_idle(5)
    assert {v.state for v in engine.sessions()} == {State.AVAILABLE}
    engine.activate("ubuntu")
    assert engine.wait_state("ubuntu", SETTLED, 60).state is State.RUNNING
    assert {v.name for v in engine.sessions() if v.state is State.RUNNING} == {"ubuntu"}


def _rewrite_manifest(medium: Path, edit) -> None:
    path = medium / MANIFEST_RELPATH
    data = yaml.safe_load(path.read_text())
    edit(data)
    tmp = path.with_name("manifest.new")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def _statefile(medium: Path, name: str) -> Path:
    return medium / "xenubuntu" / "flavours" / name / "state.zst"


def _corrupt_zstd_frame_keep_sha(medium: Path) -> None:
    """Damage compressed data, then record the damaged file's sha256 and size, so only
    zstd's own frame checksum can notice."""
    path = _statefile(medium, "server")
    damage(path, offset=path.stat().st_size // 3, count=64)

    def edit(data):
        for f in data["flavours"]:
            if f["name"] == "server":
                f["statefile"]["sha256"] = sha256_of(path)
    _rewrite_manifest(medium, edit)


def _damage_frame_header_keep_sha(medium: Path) -> None:
    """Bytes 4-11 (the frame header): zstd gives up at once; the feed must end the
    restore at once too, in zstd's words (QEMU would wait for input forever)."""
    path = _statefile(medium, "server")
    damage(path, offset=4, count=8)

    def edit(data):
        for f in data["flavours"]:
            if f["name"] == "server":
                f["statefile"]["sha256"] = sha256_of(path)
    _rewrite_manifest(medium, edit)


def _link_out_of_the_medium(target: str):
    def spoil(medium: Path) -> None:
        path = _statefile(medium, "server")
        path.unlink()
        path.symlink_to(target)
    return spoil


def _link_to_a_copy_outside(medium: Path) -> None:
    """A true statefile, but outside the medium: still refused."""
    path = _statefile(medium, "server")
    outside = medium.parent / "outside-state.zst"
    os.replace(path, outside)
    path.symlink_to(outside)


BAD_STATEFILES = {
    "damaged-frame-header": (_damage_frame_header_keep_sha, "zstd rejected the stream after"),
    "link-to-etc-passwd": (_link_out_of_the_medium("/etc/passwd"), "leads out of the medium"),
    "link-to-a-copy-outside": (_link_to_a_copy_outside, "leads out of the medium"),
    "truncated": (lambda m: damage(_statefile(m, "server"), truncate_to=_statefile(m, "server").stat().st_size // 2),
                  "truncated"),
    "empty": (lambda m: damage(_statefile(m, "server"), empty=True), "empty"),
    "missing": (lambda m: _statefile(m, "server").unlink(), "missing"),
    "flipped-bytes": (lambda m: damage(_statefile(m, "server")), "sha256 mismatch"),
    "corrupt-zstd-frame": (_corrupt_zstd_frame_keep_sha, "zstd"),
}


@pytest.mark.parametrize("kind", sorted(BAD_STATEFILES))
def test_a_bad_statefile_is_detected_and_the_flavour_cold_boots(kind, medium, make_engine):
    spoil, words = BAD_STATEFILES[kind]
    spoil(medium)
    manifest = load_manifest(medium / MANIFEST_RELPATH)
    engine = make_engine(manifest, "xenubuntu.restore=off")
    states: list[tuple[State, str]] = []
    engine.subscribe(lambda ev, v: states.append((v.state, v.reason)) if ev == "state-changed" else None)
    engine.activate("server")
    view = engine.wait_state("server", SETTLED, 180)
    assert view.state is State.RUNNING, view.reason
    assert view.origin == "cold-booted"
    assert words in view.reason, view.reason
    assert "watchdog" not in view.reason and "passwd" not in view.reason
    if kind.startswith("link"):  # nothing of the outside file shows: not its name, not its size
        assert not any(ch.isdigit() for ch in view.reason.split("leads out")[0].split("flavours/server")[-1])
    assert [s for s, _ in states][-2:] == [State.BOOTING, State.RUNNING]
    log = read_log(view.console["log"])
    assert b"XS-BOOT flavour=server" in log  # it really booted afresh
    assert b"DISK boots=2" in log  # over the disk as it was saved (one boot at mastering)
    assert "PONG" in ask(view.console["serial"], "PING after-cold-boot")


def test_a_stream_that_qemu_refuses_falls_back_with_qemus_words(medium, make_engine):
    """Machine and saved_with changed together (the manifest agrees with itself, the
    stream does not): QEMU refuses to load, the reason quotes it, the flavour cold-boots."""
    def edit(data):
        for f in data["flavours"]:
            if f["name"] == "ubuntu":
                f["machine"]["memory_mib"] = 320
                f["statefile"]["saved_with"]["memory_mib"] = 320
                del f["statefile"]["lazy"]  # its RAM image has the size it was saved with
    _rewrite_manifest(medium, edit)
    engine = make_engine(load_manifest(medium / MANIFEST_RELPATH), "xenubuntu.restore=off")
    engine.activate("ubuntu")
    view = engine.wait_state("ubuntu", SETTLED, 180)
    assert view.state is State.RUNNING and view.origin == "cold-booted"
    assert "mismatch" in view.reason.lower() or "migration" in view.reason.lower(), view.reason


def test_a_guest_that_reboots_is_noticed(manifest, make_engine):
    engine = make_engine(manifest, "xenubuntu.restore=off")
    engine.activate("kubuntu")
    view = engine.wait_state("kubuntu", SETTLED, 60)
    import socket
    with socket.socket(socket.AF_UNIX) as s:  # kept open: QEMU drops unread input of a closed client
        s.connect(view.console["serial"])
        s.sendall(b"sh:reboot -f\n")
        view = engine.wait_state("kubuntu", {State.FAILED}, 30)
    assert "reset" in view.reason, view.reason


def test_a_guest_whose_hypervisor_dies_is_noticed(manifest, make_engine, runtime_dir):
    engine = make_engine(manifest, "xenubuntu.restore=off")
    engine.activate("server")
    engine.wait_state("server", SETTLED, 60)
    pid = int((runtime_dir / "sessions" / "server" / "qemu.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    view = engine.wait_state("server", {State.FAILED}, 30)
    assert "signal 9 (SIGKILL)" in view.reason, view.reason
    # the rest keeps working: the session can be activated again
    engine.activate("server")
    assert engine.wait_state("server", SETTLED, 60).state is State.RUNNING


def test_pause_resume_stop_and_reset(manifest, make_engine):
    engine = make_engine(manifest, "xenubuntu.restore=off")
    engine.activate("xubuntu")
    view = engine.wait_state("xubuntu", SETTLED, 60)
    first = int(ask(view.console["serial"], "PING a").rsplit("counter=", 1)[1])
    wait_for(view.console["log"], b"COUNTER", timeout=15)
    engine.pause("xubuntu")
    assert engine.session("xubuntu").state is State.PAUSED
    before = counters(read_log(view.console["log"]))
    time.sleep(2.5)
    assert counters(read_log(view.console["log"])) == before, "a paused guest kept counting"
    with pytest.raises(InvalidState) as e:
        engine.pause("xubuntu")
    assert "paused" in str(e.value) and "running" in str(e.value)
    engine.resume("xubuntu")
    wait_for(view.console["log"], b"COUNTER %d" % (max(before) + 1), timeout=15)
    # reset: back to the pristine statefile, counting from the saved value again
    later = int(ask(view.console["serial"], "PING b").rsplit("counter=", 1)[1])
    assert later > first
    engine.reset("xubuntu")
    view = engine.wait_state("xubuntu", SETTLED, 60)
    assert view.state is State.RUNNING and view.origin == "restored"
    again = int(ask(view.console["serial"], "PING c").rsplit("counter=", 1)[1])
    assert again < later
    engine.stop("xubuntu")
    assert engine.session("xubuntu").state is State.STOPPED
    assert engine.session("xubuntu").console == {}
    with pytest.raises(InvalidState):
        engine.resume("xubuntu")


def test_a_request_that_does_not_fit_is_refused_and_names_what_could_be_stopped(manifest, make_engine):
    def budget_fit(flavour, running):
        need, free = flavour.memory_mib + 112, 400 - sum(running.values())
        if need > free:
            raise NotEnoughMemory(flavour.name, need, free, sorted(running))

    engine = make_engine(manifest, "xenubuntu.restore=off", fit_check=budget_fit)
    engine.activate("server")
    engine.wait_state("server", SETTLED, 60)
    with pytest.raises(NotEnoughMemory) as e:
        engine.activate("kubuntu")
    assert e.value.needed_mib == 368 and e.value.could_stop == ("server",)
    assert "server" in str(e.value)
    assert engine.session("kubuntu").state is State.AVAILABLE
    engine.stop("server")
    engine.activate("kubuntu")
    assert engine.wait_state("kubuntu", SETTLED, 60).state is State.RUNNING


def test_a_missing_medium_fails_the_restore_and_it_is_retried_when_the_medium_returns(medium, make_engine):
    manifest = load_manifest(medium / MANIFEST_RELPATH)
    engine = make_engine(manifest, "xenubuntu.restore=off")
    away = medium.with_name("medium-away")
    medium.rename(away)
    try:
        engine.activate("server")
        view = engine.wait_state("server", {State.FAILED}, 30)
        assert "medium" in view.reason and "retried" in view.reason
    finally:
        away.rename(medium)
    engine.medium_returned()
    view = engine.wait_state("server", RUNNING, 60)
    assert view.origin == "restored"


def test_shutdown_leaves_no_process_behind(manifest, make_engine, runtime_dir):
    from .guestlib import qemu_pids_under
    engine = make_engine(manifest, "xenubuntu.restore=eager", max_parallel=2)
    engine.start()
    engine.wait_state("kubuntu", RUNNING, 60)
    engine.shutdown(stop_guests=True)  # while others may still restore
    assert qemu_pids_under(runtime_dir) == []
    assert all(v.state is not State.RUNNING for v in engine.sessions())


def test_a_kvm_statefile_on_a_host_where_kvm_does_not_work_cold_boots_under_tcg(medium, make_engine):
    """KVM is used only where a probe boot shows it works (a nested module can open
    /dev/kvm and still never boot a kernel)."""
    def edit(data):
        for f in data["flavours"]:
            if f["name"] == "server":
                f["machine"]["accel"] = "kvm"
                f["statefile"]["saved_with"]["accel"] = "kvm"
    _rewrite_manifest(medium, edit)
    engine = make_engine(load_manifest(medium / MANIFEST_RELPATH), "xenubuntu.restore=off")
    engine.activate("server")
    view = engine.wait_state("server", SETTLED, 180)
    assert view.state is State.RUNNING, view.reason
    if not engine.backend.kvm_usable(engine.manifest.flavour("server"), engine.manifest):
        assert view.origin == "cold-booted" and "KVM cannot run a guest on this host" in view.reason
        assert "tb-size" in " ".join(_argv_of(view)), "the cold boot must fall back to TCG"
    assert "PONG" in ask(view.console["serial"], "PING kvm")


def _argv_of(view) -> list[str]:
    import json
    return json.loads((Path(view.console["serial"]).parent / "guest.json").read_text())["argv"]


@pytest.mark.kvm
def test_a_flavour_mastered_under_kvm_restores_under_kvm(tmp_path, runtime_dir):
    from xsession.demomedia import CACHE, DEMO
    from xsession.mastering.master import load_spec, master_medium
    spec = load_spec(DEMO / "flavours.yaml")
    spec = type(spec)(default="server", flavours=tuple(f for f in spec.flavours if f.name == "server"),
                      kernel=spec.kernel, cmdline=spec.cmdline, disk_mib=spec.disk_mib)
    manifest = master_medium(spec, CACHE / "guests", tmp_path / "kvm-medium", accel="kvm", report=lambda _line: None)
    guest = QemuBackend().restore(manifest.flavour("server"), manifest, runtime_dir / "server", lambda d, t: None)
    try:
        assert "flavour=server" in ask(guest.console["serial"], "PING kvm")
    finally:
        guest.stop()


def test_a_restore_that_outlives_its_watchdog_is_abandoned_and_the_flavour_cold_boots(manifest, make_engine,
                                                                                     monkeypatch):
    """The watchdog's deadline scales with the statefile's size; squeezed to nothing,
    the restore is given up (QEMU stopped, nothing left running) and the flavour cold-boots."""
    import xsession.hypervisor.qemu as qemu
    monkeypatch.setattr(qemu, "RESTORE_BASE_TIMEOUT_S", 0.0)
    monkeypatch.setattr(qemu, "RESTORE_BYTES_PER_S", 10 ** 12)
    engine = make_engine(manifest, "xenubuntu.restore=off")
    engine.activate("server")
    view = engine.wait_state("server", SETTLED, 120)
    assert view.state is State.RUNNING and view.origin == "cold-booted", view.reason
    assert "watchdog" in view.reason, view.reason


def test_while_the_medium_is_out_queued_restores_wait_and_go_on_when_it_returns(manifest, make_engine):
    engine = make_engine(manifest, "xenubuntu.restore=off")
    engine.medium_removed("the disc was ejected")
    assert "the disc was ejected" in engine.warnings
    engine.activate("server")
    time.sleep(1.0)  # a dispatch would have started it by now
    assert engine.session("server").state is State.QUEUED
    engine.medium_returned()
    assert "the disc was ejected" not in engine.warnings
    assert engine.wait_state("server", SETTLED, 60).state is State.RUNNING


def test_a_memory_check_that_breaks_fails_that_session_and_the_queue_goes_on(manifest, make_engine):
    from xsession.errors import HypervisorError

    def fit(flavour, running):
        if flavour.name == "ubuntu":
            raise HypervisorError("xl info", "exited with status 1", "libxl: cannot talk to Xen")

    engine = make_engine(manifest, "xenubuntu.restore=eager", fit_check=fit)
    engine.start()
    assert engine.wait_idle(120)
    states = {v.name: v.state for v in engine.sessions()}
    assert states == {"kubuntu": State.RUNNING, "ubuntu": State.FAILED, "xubuntu": State.RUNNING,
                      "server": State.RUNNING}
    assert "memory check failed" in engine.session("ubuntu").reason
    assert "cannot talk to Xen" in engine.session("ubuntu").reason


def _qcow2_over(path: Path, backing: str) -> None:
    import subprocess
    path.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", backing, "-u", str(path), "16M"],
                   check=True)


@pytest.mark.parametrize("backing", ["/etc/passwd", "../../../../../../etc/passwd", "json:{}"])
def test_a_disk_whose_backing_file_leads_out_of_the_medium_is_never_opened(backing, medium, make_engine):
    """A qcow2 header names its backing file; QEMU would open it with our rights."""
    _qcow2_over(medium / "xenubuntu/flavours/server/disk-base.qcow2", backing)
    engine = make_engine(load_manifest(medium / MANIFEST_RELPATH), "xenubuntu.restore=off")
    engine.activate("server")
    view = engine.wait_state("server", SETTLED, 120)
    assert view.state is State.FAILED, view.reason
    assert "leads out of the medium" in view.reason and "passwd" not in view.reason, view.reason


# --- preloading: statefiles copied into RAM while idle ------------------------------------

def _one_session_at_a_time(flavour, running):
    """A machine with room for one session (preloads are small: they fit beside it)."""
    from xsession.errors import NotEnoughMemory
    sessions = [n for n in running if not n.endswith("(preloaded)")]
    if sessions and flavour.name not in sessions:
        raise NotEnoughMemory(flavour.name, flavour.memory_mib, 0, sessions)


def _wait_preloaded(engine, names, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not all(engine.session(n).preloaded for n in names):
        assert time.monotonic() < deadline, {n: engine.preload_status(n) for n in names}
        time.sleep(0.05)


def test_waiting_flavours_are_preloaded_in_priority_order_and_start_from_ram(manifest, make_engine):
    engine = make_engine(manifest, "xenubuntu.restore=lazy xenubuntu.flavour=kubuntu",
                         fit_check=_one_session_at_a_time, preload=True)
    order: list[str] = []
    engine.subscribe(lambda ev, v: order.append(v.name) if ev == "preloaded" and v.preloaded else None)
    engine.start()
    assert engine.wait_state("kubuntu", SETTLED, 60).state is State.RUNNING
    _wait_preloaded(engine, ["ubuntu", "xubuntu", "server"])
    assert order == ["ubuntu", "xubuntu", "server"]
    assert not engine.session("kubuntu").preloaded
    held = engine.running_memory()
    assert {"ubuntu (preloaded)", "xubuntu (preloaded)", "server (preloaded)"} <= set(held)
    assert held["ubuntu (preloaded)"] == -(-manifest.flavour("ubuntu").statefile.size // (1 << 20))

    reasons: list[tuple[str, str]] = []
    engine.subscribe(lambda ev, v: reasons.append((v.name, v.reason)) if ev == "state-changed" else None)
    engine.stop("kubuntu")  # room for one: lazy restores the next waiting flavour, from RAM
    view = engine.wait_state("ubuntu", SETTLED, 60)
    assert view.state is State.RUNNING and view.origin == "restored", view.reason
    assert ("ubuntu", "reading the statefile from RAM (preloaded)") in reasons
    assert not engine.session("ubuntu").preloaded and "ubuntu (preloaded)" not in engine.running_memory()
    assert engine.session("xubuntu").preloaded
    assert "PONG" in ask(view.console["serial"], "PING from-ram")


def test_a_preload_yields_the_medium_to_a_restore_and_goes_on(manifest, make_engine, tmp_path):
    """A person's request while a preload reads: the restore gets the medium, the preload
    waits between chunks, then finishes."""
    engine = make_engine(manifest, "xenubuntu.restore=off", preload=True)
    # preload one flavour, slowly enough to be caught in the middle: a request comes meanwhile
    import xsession.preload as preload_module
    real_chunk = preload_module.CHUNK
    preload_module.CHUNK = 64 << 10
    try:
        with engine._lock:  # what the idle dispatcher does, by hand: restore=off preloads nothing by itself
            engine._next_preload()
        deadline = time.monotonic() + 30
        while engine.preload_status("kubuntu")[0] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        engine.activate("server")
        assert engine.wait_state("server", SETTLED, 60).state is State.RUNNING
        _wait_preloaded(engine, ["kubuntu"])
        copied, size, pauses = engine.preload_status("kubuntu")
        assert copied == size and pauses >= 1, (copied, size, pauses)
    finally:
        preload_module.CHUNK = real_chunk


@pytest.mark.parametrize("where", ["ram", "medium"])
def test_a_preloaded_statefile_damaged_in_ram_or_on_the_medium_is_caught(where, medium, make_engine):
    if where == "medium":
        damage(_statefile(medium, "ubuntu"))
    engine = make_engine(load_manifest(medium / MANIFEST_RELPATH), "xenubuntu.restore=lazy xenubuntu.flavour=kubuntu",
                         fit_check=_one_session_at_a_time, preload=True)
    engine.start()
    engine.wait_state("kubuntu", SETTLED, 60)
    _wait_preloaded(engine, ["ubuntu"])
    if where == "ram":
        with engine._lock:
            fd = os.open(engine._preloads["ubuntu"].sources()[0], os.O_RDWR)
        try:
            byte = os.pread(fd, 1, 5000)
            os.pwrite(fd, bytes([byte[0] ^ 0xFF]), 5000)
        finally:
            os.close(fd)
    engine.stop("kubuntu")  # lazy then restores ubuntu, the next in order, from its preload
    view = engine.wait_state("ubuntu", SETTLED, 120)
    assert view.state is State.RUNNING and view.origin == "cold-booted", view.reason
    assert "sha256 mismatch" in view.reason or "zstd" in view.reason, view.reason
