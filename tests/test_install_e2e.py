"""The install from inside a restored demo guest to a disk that boots on its own.

A guest's request travels its real channel (virtio-serial) to xsessiond on a
private bus; it appears as a pending Job; hostile lines from inside the guest
are refused and change nothing; only an administrator confirms; the install
writes to a loop device; then the disk image boots in QEMU as a whole machine,
with BIOS and with EFI (OVMF), to the demo flavour's ready line with its new
identity.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from gi.repository import GLib

from xsession.bus import MANAGER_IFACE, MANAGER_PATH, introspection_xml
from xsession.install.dbus import JOB_IFACE

from .buslib import HELPER_USER, NOBODY, Client, ctl, gdbus, interface_members
from .guestlib import ask, wait_for

ERROR = "org.xenubuntu.Sessions1.Error."
MiB = 2**20
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
#: GRUB under OVMF could not load the demo kernel in 256 MiB here ("out of memory")
WHOLE_MACHINE_MIB = 512


def _jobs(client: Client) -> list[tuple[int, str, str, str, str]]:
    return client.call(MANAGER_PATH, MANAGER_IFACE, "ListJobs")[0]


def _job(client: Client, path: str) -> dict:
    return client.call(path, "org.freedesktop.DBus.Properties", "GetAll", GLib.Variant("(s)", (JOB_IFACE,)))[0]


def _wait_jobs(client: Client, count: int, timeout: float = 30.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = _jobs(client)
        if len(jobs) >= count:
            return jobs
        time.sleep(0.05)
    raise TimeoutError(f"{count} jobs not seen in {timeout} s: {_jobs(client)}")


def _in_guest(serial: str, command: str) -> None:
    ask(serial, f"sh:{command}", expect=b"PONG sh", timeout=30)


PORT = ("$(for p in /sys/class/virtio-ports/*; do [ $(cat $p/name) = org.xenubuntu.guest.0 ] && "
        "echo /dev/${p##*/}; done)")


def boot_whole_machine(image: Path, rundir: Path, firmware: str, timeout: float = 240.0,
                       ready: bytes = b"XS-READY") -> str:
    """Boot the disk image alone (no -kernel), BIOS or EFI; its serial output up to ``ready``."""
    log = rundir / f"whole-{firmware}.log"
    argv = ["qemu-system-x86_64", "-machine", "q35" if firmware == "efi" else "pc", "-accel", "tcg",
            "-m", str(WHOLE_MACHINE_MIB), "-nodefaults", "-no-reboot", "-display", "none",
            "-serial", f"file:{log}", "-drive", f"file={image},format=raw,if=virtio,snapshot=on",
            "-name", f"whole-{firmware},process=qemu-{rundir}"]
    if firmware == "efi":
        vars_copy = rundir / "OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        argv += ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                 "-drive", f"if=pflash,format=raw,file={vars_copy}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return wait_for(log, ready, timeout).decode(errors="replace")
    finally:
        proc.kill()
        proc.wait(10)


def test_a_request_from_inside_a_restored_guest_installs_a_disk_that_boots(
        polkitd, xsessiond, client, loops, runtime_dir, tmp_path):
    daemon = xsessiond()
    client.activate("kubuntu")
    client.wait_state("kubuntu", {"running"})
    serial = client.session("kubuntu")["Console"]["serial"]
    console_log = Path(serial).parent / "console.log"

    # the person in the guest asks; dom0 shows a pending job of that session and flavour
    asked = ask(serial, "install", expect=b"INSTALL asked", timeout=30)
    request_id = asked.split("id=")[1]
    (number, session, flavour, state, path), = _wait_jobs(client, 1)
    assert (session, flavour, state) == ("kubuntu", "kubuntu", "pending")
    job = _job(client, path)
    assert job["Session"] == f"{MANAGER_PATH}/session/kubuntu" and job["Target"] == "" and job["Progress"] == 0
    # the job object publishes exactly the Job interface of the XML; the object manager lists it
    published = interface_members(client.call(path, "org.freedesktop.DBus.Introspectable", "Introspect")[0])
    assert published[JOB_IFACE] == interface_members(introspection_xml())[JOB_IFACE]
    objects = client.call(MANAGER_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")[0]
    assert objects[path][JOB_IFACE]["State"] == "pending"
    wait_for(console_log, b"INSTALL pending", 30)
    listed = ctl(polkitd, "jobs")
    assert listed.returncode == 0 and "kubuntu" in listed.stdout and "pending" in listed.stdout, listed

    # the disks offered: a free loop device, never a mounted one
    free, image = loops(300)
    busy, _ = loops(300)
    subprocess.run(["mkfs.ext4", "-q", busy], check=True)
    mnt = tmp_path / "busy"
    mnt.mkdir()
    subprocess.run(["mount", busy, str(mnt)], check=True)
    try:
        offered = [d for d, _, _ in client.call(MANAGER_PATH, MANAGER_IFACE, "ListInstallTargets",
                                                GLib.Variant("(s)", ("kubuntu",)))[0]]
        assert free in offered and busy not in offered
        assert client.error(path, JOB_IFACE, "Confirm", GLib.Variant("(s)", (busy,))) == f"{ERROR}TargetInUse"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert client.error(path, JOB_IFACE, "Confirm", GLib.Variant("(s)", ("/dev/null",))) == f"{ERROR}NoSuchTarget"

    # no one but an administrator confirms: nobody, nor a user who may manage sessions
    for user in (NOBODY, HELPER_USER):
        for method, args in (("Confirm", (free,)), ("Cancel", ())):
            refused = gdbus(polkitd, "call", "--dest", "org.xenubuntu.Sessions1", "--object-path", path,
                            "--method", f"{JOB_IFACE}.{method}", *args, user=user)
            assert refused.returncode != 0 and f"{ERROR}NotAuthorized" in refused.stderr, (user, refused.stderr)
    assert _job(client, path)["State"] == "pending"

    # confirmed (xsessionctl, as root): it runs to the end; the guest is told and shows it
    done = ctl(polkitd, "install", "confirm", str(number), free, "--quiet")
    assert done.returncode == 0 and "done" in done.stdout, (done.stdout, done.stderr, daemon.log_text()[-3000:])
    job = _job(client, path)
    assert job["State"] == "done" and job["Target"] == free and job["Progress"] == 1.0 and job["Error"] == ""
    assert job["BytesTotal"] > 0 and job["Rate"] > 0
    log = wait_for(console_log, b"INSTALL done", 30)
    assert re.search(rb"INSTALL running \d+", log), log[-500:]

    # hostile lines from inside the guest, through the real channel: all refused, nothing changes
    replay = f"xenubuntu1 install-request {request_id}"
    _in_guest(serial, f"echo '{replay}' > {PORT}")                                  # a replay
    _in_guest(serial, f"echo 'xenubuntu1 install-request 1234abcd /dev/sda' > {PORT}")  # names a disk
    _in_guest(serial, f"head -c 600 /dev/zero | tr '\\\\0' a > {PORT}")                # oversized, no newline
    _in_guest(serial, f"for i in $(seq 60); do echo 'xenubuntu1 heartbeat 1'; done > {PORT}")  # a flood
    time.sleep(1.0)
    assert [j[0] for j in _jobs(client)] == [number]
    text = daemon.log_text()
    assert "was used before (a replay)" in text and "an unknown or malformed xenubuntu1 message" in text
    assert "floods its channel" in text
    assert client.state("kubuntu") == "running"

    # a second request is a new pending job; cancelled before it starts, the disk is untouched
    ask(serial, "install", expect=b"INSTALL asked", timeout=30)
    jobs = _wait_jobs(client, 2)
    second = jobs[-1][4]
    assert ctl(polkitd, "install", "cancel", str(jobs[-1][0])).returncode == 0
    assert _job(client, second)["State"] == "cancelled"
    wait_for(console_log, b"INSTALL cancelled", 30)

    client.call(f"{MANAGER_PATH}/session/kubuntu", "org.xenubuntu.Sessions1.Session", "Stop")  # one TCG guest at a time

    # the disk alone boots, BIOS then EFI, with its own identity
    subprocess.run(["partx", "--update", free], capture_output=True)
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["mount", "-o", "ro", f"{free}p3", str(root)], check=True)
    try:
        hostname = (root / "etc/hostname").read_text().strip()
        machine_id = (root / "etc/machine-id").read_text().strip()
    finally:
        subprocess.run(["umount", str(root)], check=True)
    assert re.fullmatch(r"kubuntu-[0-9a-f]{6}", hostname) and re.fullmatch(r"[0-9a-f]{32}", machine_id)
    subprocess.run(["losetup", "--detach", free], check=True)
    for firmware in ("bios", "efi"):
        out = boot_whole_machine(image, runtime_dir, firmware)
        assert f"XS-INSTALLED hostname={hostname} machine-id={machine_id} fstab=2" in out, (firmware, out[-800:])
        assert "XS-READY flavour=kubuntu" in out
        assert "DISK boots" not in out  # the installed system leaves its boot sector alone
