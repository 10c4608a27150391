"""Installing a flavour: the guest's request (the channel protocol, fuzzed), jobs,
target disks on real loop devices, the install onto a loop device and its cancel.
The whole path from inside a restored guest is in test_install_e2e.py."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import pyudev
from hypothesis import given, settings
from hypothesis import strategies as st

from xsession.errors import InvalidState
from xsession.guestchannel import MAX_LINE, ChannelError, Heartbeat, InstallRequest, Ready, parse_line
from xsession.hardware import MediumInfo
from xsession.install import installer, targets
from xsession.install.errors import (HostUnfit, InstallFailed, NoSuchTarget, TargetInUse, TargetIsLiveMedium,
                                     TargetTooSmall)
from xsession.install.jobs import Jobs, JobState
from xsession.install.protocol import ReplayGuard, Replayed, parse_reply, reply_line

MiB = 2**20


# --- the protocol -------------------------------------------------------------------------

def test_an_install_request_is_one_exact_line():
    assert parse_line(b"xenubuntu1 install-request 0123abcd") == InstallRequest("0123abcd")
    for bad in (b"xenubuntu1 install-request 0123abc",             # too short an ID
                b"xenubuntu1 install-request 0123ABCD",            # not lower-case hex
                b"xenubuntu1 install-request 0123abcd /dev/sda",   # a guest names no disk
                b"xenubuntu1 install-request 0123abcd kubuntu",    # ... nor a flavour
                b"xenubuntu1 install-request " + b"a" * 33,
                b"xenubuntu1 install-request 0123abcd ",
                b"xenubuntu2 install-request 0123abcd",
                b"xenubuntu1 install 0123abcd done"):              # dom0's words, not a guest's
        with pytest.raises(ChannelError):
            parse_line(bad)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda tail: b"xenubuntu1 install-request " + tail, st.binary(max_size=200))))
def test_any_line_is_a_known_message_or_a_channel_error(line):
    try:
        message = parse_line(line)
    except ChannelError:
        return
    assert len(line) < MAX_LINE
    assert isinstance(message, (Ready, Heartbeat, InstallRequest))
    if isinstance(message, InstallRequest):
        assert line == b"xenubuntu1 install-request " + message.request_id.encode()


@given(st.text("0123456789abcdef", min_size=8, max_size=32),
       st.sampled_from(["pending", "running", "done", "failed", "cancelled", "refused"]),
       st.one_of(st.none(), st.integers(-5, 200)))
def test_replies_read_back_as_sent(request_id, state, percent):
    line = reply_line(request_id, state, percent)
    assert len(line) < MAX_LINE and line.endswith(b"\n")
    rid, st_, pc = parse_reply(line.decode())
    assert (rid, st_) == (request_id, state)
    assert pc == (None if percent is None else max(0, min(100, percent)))


def test_replayed_ids_are_refused_and_the_memory_is_bounded():
    guard = ReplayGuard(keep=3)
    guard.admit("aaaaaaaa")
    with pytest.raises(Replayed):
        guard.admit("aaaaaaaa")
    for rid in ("bbbbbbbb", "cccccccc", "dddddddd"):
        guard.admit(rid)
    guard.admit("aaaaaaaa")  # forgotten after ``keep`` others: the memory cannot grow without end


# --- jobs -----------------------------------------------------------------------------------

def test_jobs_one_open_per_session_replays_refused_confirm_only_when_pending():
    ran = threading.Event()
    jobs = Jobs(lambda job, target, report, cancel: (report(5, 10), ran.set()))
    events: list[tuple[str, str]] = []
    jobs.subscribe(lambda ev, v: events.append((ev, v.state.value)))
    job = jobs.request("kubuntu", "kubuntu", "11112222")
    assert job.state is JobState.PENDING and job.target == ""
    with pytest.raises(ChannelError, match="open already"):
        jobs.request("kubuntu", "kubuntu", "33334444")
    with pytest.raises(ChannelError, match="replay"):
        jobs.request("kubuntu", "kubuntu", "11112222")
    assert len(jobs.views()) == 1  # refusals changed nothing
    other = jobs.request("server", "server", "11112222")  # IDs are per session
    jobs.cancel(other.number)
    assert jobs.view(other.number).state is JobState.CANCELLED
    with pytest.raises(InvalidState):
        jobs.confirm(other.number, "/dev/loop9")
    jobs.confirm(job.number, "/dev/loop9")
    done = jobs.wait(job.number, 10)
    assert ran.is_set() and done.state is JobState.DONE and done.target == "/dev/loop9" and done.progress == 1.0
    assert ("added", "pending") in events and ("changed", "running") in events and ("changed", "done") in events
    with pytest.raises(InvalidState):
        jobs.cancel(job.number)


def test_a_failing_install_is_a_failed_job_with_its_reason():
    def fail(job, target, report, cancel):
        raise InstallFailed("partition", "sgdisk exited with status 4", installer.SAFE_STATE)
    jobs = Jobs(fail)
    job = jobs.request("ubuntu", "ubuntu", "abcdef01")
    jobs.confirm(job.number, "/dev/loop9")
    end = jobs.wait(job.number, 10)
    assert end.state is JobState.FAILED and "sgdisk exited with status 4" in end.error and "wiped" in end.error


# --- the check before writing -------------------------------------------------------------------

def test_the_host_check_names_what_is_missing_with_numbers():
    assert installer.host_problems(4096 * MiB, set(installer.CPU_FLAGS), 256, 300 * MiB, 200 * MiB) == []
    problems = installer.host_problems(128 * MiB, {"fpu", "sse"}, 256, 100 * MiB, 200 * MiB)
    assert any("128 MiB" in p and "256 MiB" in p for p in problems)
    assert any("100 MiB" in p and "200 MiB" in p for p in problems)
    assert any("lm" in p and "7 of the 9" in p for p in problems)
    with pytest.raises(HostUnfit, match="128 MiB"):
        src = installer.Source("x", "X", Path(__file__), Path(__file__), 256)
        installer.check_host(128 * MiB, "flags\t: fpu sse\n", src, 10 * MiB)


# --- real loop devices --------------------------------------------------------------------------

@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[callable]:
    """Loop devices over sparse files (with partition scanning); detached at the end."""
    made: list[str] = []

    def make(size_mib: int) -> str:
        image = tmp_path / f"disk{len(made)}.img"
        with open(image, "wb") as f:
            f.truncate(size_mib * MiB)
        dev = subprocess.run(["losetup", "--find", "--show", "--partscan", str(image)], check=True,
                             capture_output=True, text=True).stdout.strip()
        made.append(dev)
        return dev

    yield make
    for dev in made:
        subprocess.run(["sh", "-c", f"grep -o '^{dev}p\\?[0-9]* [^ ]*' /proc/mounts | cut -d' ' -f2 | "
                                    "xargs -r umount"], capture_output=True)
        subprocess.run(["losetup", "--detach", dev], capture_output=True)


@pytest.fixture
def demo_source(demo_medium: Path) -> installer.Source:
    root = demo_medium / "xenubuntu"
    return installer.Source("kubuntu", "Kubuntu", root / "pool" / "vmlinuz",
                            root / "flavours" / "kubuntu" / "initrd.cpio", 256)


def test_targets_loop_offered_mounted_small_and_live_medium_refused(loop_disk, tmp_path):
    needed = 200 * MiB
    free, small, busy = loop_disk(300), loop_disk(100), loop_disk(300)
    subprocess.run(["mkfs.ext4", "-q", busy], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", busy, str(mnt)], check=True)
    try:
        context = pyudev.Context()
        offered = [d.device for d in targets.candidates(context, None, needed)]
        assert free in offered and small not in offered and busy not in offered
        assert targets.check_target(context, free, None, needed).size == 300 * MiB
        with pytest.raises(TargetTooSmall) as small_err:
            targets.check_target(context, small, None, needed)
        assert small_err.value.size == 100 * MiB and small_err.value.needed == needed
        assert "100 MiB" in str(small_err.value) and "200 MiB" in str(small_err.value)
        with pytest.raises(TargetInUse, match="mounted"):
            targets.check_target(context, busy, None, needed)
        with pytest.raises(NoSuchTarget):
            targets.check_target(context, "/etc/passwd", None, needed)
        # the live medium: the disk udev names as the medium's is never offered nor accepted
        disk = next(d for d in targets.disks(context) if d.device == free)
        medium = MediumInfo(path="/run/live/medium", kind="usb", speed="fast", device=free, sys_path=disk.sys_path)
        assert free not in [d.device for d in targets.candidates(context, medium, needed)]
        with pytest.raises(TargetIsLiveMedium):
            targets.check_target(context, free, medium, needed)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_mounted_partition_makes_its_disk_busy(loop_disk, tmp_path):
    dev = loop_disk(300)
    subprocess.run(["sgdisk", "--new=1:2048:+50M", dev], check=True, capture_output=True)
    subprocess.run(["partx", "--update", dev], check=True)
    subprocess.run(["mkfs.ext4", "-q", f"{dev}p1"], check=True)
    mnt = tmp_path / "p1"
    mnt.mkdir()
    subprocess.run(["mount", f"{dev}p1", str(mnt)], check=True)
    try:
        with pytest.raises(TargetInUse, match=f"{dev}p1"):
            targets.check_target(pyudev.Context(), dev, None, 10 * MiB)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_disk_in_use_as_swap_is_refused(loop_disk):
    dev = loop_disk(64)
    subprocess.run(["mkswap", dev], check=True, capture_output=True)
    subprocess.run(["swapon", dev], check=True)
    try:
        with pytest.raises(TargetInUse, match="swap"):
            targets.check_target(pyudev.Context(), dev, None, MiB)
        assert dev not in [d.device for d in targets.candidates(pyudev.Context(), None, MiB)]
    finally:
        subprocess.run(["swapoff", dev], check=True)


def _partition_table(dev: str) -> str:
    return subprocess.run(["sgdisk", "--print", dev], capture_output=True, text=True).stdout


def test_install_onto_a_loop_device_then_cancel_halfway_leaves_nothing_bootable(loop_disk, demo_source, tmp_path):
    dev = loop_disk(300)
    ident = installer.new_identity("kubuntu")
    reports: list[tuple[int, int]] = []
    installer.run(demo_source, dev, ident, lambda d, t: reports.append((d, t)), threading.Event())
    assert reports[-1][0] == reports[-1][1] and all(a[0] <= b[0] for a, b in zip(reports, reports[1:], strict=False))
    table = _partition_table(dev)
    assert "EF02" in table and "EF00" in table and "8304" in table, table
    blkid = subprocess.run(["blkid", "-o", "export", f"{dev}p3"], capture_output=True, text=True).stdout
    assert f"UUID={ident.root_uuid}" in blkid and "TYPE=ext4" in blkid
    assert f"UUID={ident.esp_uuid}" in subprocess.run(["blkid", "-o", "export", f"{dev}p2"], capture_output=True,
                                                      text=True).stdout
    mnt = tmp_path / "root"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "ro", f"{dev}p3", str(mnt)], check=True)
    try:
        assert (mnt / "etc/machine-id").read_text().strip() == ident.machine_id
        assert (mnt / "etc/hostname").read_text().strip() == ident.hostname
        fstab = (mnt / "etc/fstab").read_text()
        assert f"UUID={ident.root_uuid} /" in fstab and f"UUID={ident.esp_uuid} /boot/efi" in fstab
        assert (mnt / "boot/initrd.img").read_bytes() == demo_source.initrd.read_bytes()
        assert (mnt / "boot/grub/i386-pc/core.img").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    efi = subprocess.run(["mdir", "-i", f"{dev}p2", "::EFI/BOOT"], capture_output=True, text=True)
    assert "BOOTX64" in efi.stdout, efi.stdout + efi.stderr
    # the boot code is in the first sector (GRUB's boot.img)
    with open(dev, "rb") as f:
        assert f.read(512)[510:] == b"\x55\xaa"

    # again, cancelled halfway: after the copy, before GRUB
    cancel = threading.Event()

    def hook(step: installer.Step) -> None:
        if step.name == "install GRUB for BIOS":
            cancel.set()

    with pytest.raises(InstallFailed) as err:
        installer.run(demo_source, dev, installer.new_identity("kubuntu"), lambda d, t: None, cancel, hook)
    assert err.value.dbus_name == "Cancelled" and err.value.disk_state == installer.SAFE_STATE
    assert "8304" not in _partition_table(dev)
    assert subprocess.run(["wipefs", "--no-act", "--noheadings", dev], capture_output=True,
                          text=True).stdout.strip() == ""
    with open(dev, "rb") as f:
        first = f.read(1024 * 1024)
    assert first[510:512] != b"\x55\xaa" and b"EFI PART" not in first
    assert not os.path.exists(f"{dev}p3")


def test_a_guest_that_never_reads_its_port_cannot_hold_up_dom0(tmp_path):
    """dom0's answers are written without waiting: a full channel drops them."""
    import socket
    import time

    from xsession.guestchannel import ChannelReader
    from xsession.install.protocol import reply_line

    path = tmp_path / "guest.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    reader = ChannelReader("kubuntu", path, "kubuntu")
    try:
        peer, _ = server.accept()  # the "QEMU" side: it never reads
        deadline = time.monotonic() + 10
        while reader._sock is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        line = reply_line("0123abcd", "running", 50)
        results: list[bool] = []
        sender = threading.Thread(target=lambda: results.extend(reader.send(line) for _ in range(100_000)),
                                  daemon=True)
        sender.start()
        sender.join(120)  # a liveness bound, not a speed: a blocking send would never return
        assert not sender.is_alive(), "send blocked on a guest that does not read"
        assert results[0] is True and results[-1] is False  # the socket's buffer filled, then lines dropped
        peer.close()
    finally:
        reader.close()
        server.close()


def test_a_running_job_cancelled_halfway_ends_cancelled_with_the_disk_wiped(loop_disk, demo_source):
    dev = loop_disk(300)
    jobs: Jobs

    def hook(step: installer.Step) -> None:
        if step.name == "install GRUB for BIOS":
            jobs.cancel(1)  # as Job.Cancel does, while the install runs

    jobs = Jobs(lambda job, target, report, cancel: installer.run(
        demo_source, target, installer.new_identity(job.flavour), report, cancel, hook))
    job = jobs.request("kubuntu", "kubuntu", "feedc0de")
    jobs.confirm(job.number, dev)
    end = jobs.wait(job.number, 120)
    assert end.state is JobState.CANCELLED and installer.SAFE_STATE in end.error, end
    assert 0 < end.progress < 1
    assert "8304" not in _partition_table(dev)
