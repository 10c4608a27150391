"""The real flavours (Debian's Xfce, LXQt live ISO, Samba + Radicale server):
built through the machine-wide cache, cold booted under QEMU (TCG) with the
guest port, and a damaged cache entry found and built again.

Builds take minutes the first time and seconds once cached. Boots run one at
a time: under TCG on two shared cores a desktop takes about a minute to its
session, so the waits below are generous but bounded.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from xsession.demomedia import DEMO, REAL_FLAVOURS, ensure_real_flavour

BUILD = DEMO / "build-flavour.sh"
# Seconds from QEMU's start to "ready": measured ~50 s (Xfce), ~60 s (LXQt
# live), ~25 s (server) on two shared cores; another job on the machine can
# double that, so four to six times the measurement.
READY_TIMEOUT = {"xubuntu": 300.0, "lubuntu": 360.0, "server": 180.0}
LINE_RE = re.compile(rb"^xenubuntu1 (ready|heartbeat) ([A-Za-z0-9_.-]+)$")


def progress(line: str) -> None:
    print(line, flush=True)


@pytest.fixture(scope="module", params=REAL_FLAVOURS)
def flavour(request) -> tuple[str, Path]:
    name = request.param
    return name, ensure_real_flavour(name, report=progress)


def manifest_entries(entry: Path) -> dict[str, tuple[str, int]]:
    lines = (entry / "MANIFEST").read_text().splitlines()
    assert lines[-1] == "# complete"
    return {name: (digest, int(size)) for digest, size, name in (line.split() for line in lines[:-1])}


def test_build(flavour):
    name, entry = flavour
    meta = json.loads((entry / "flavour.json").read_text())
    assert meta["name"] == name
    assert entry.name == f"{name}-{meta['key']}"
    assert meta["title"] and meta["description"].endswith(".")
    assert meta["memory_mib"] == {"xubuntu": 1024, "lubuntu": 1024, "server": 512}[name]
    assert "init_on_free=1" in meta["cmdline"] and "console=ttyS0" in meta["cmdline"]
    files = manifest_entries(entry)
    for key in ("kernel", "initrd", "disk" if meta["source"] == "disk" else "iso"):
        assert (entry / meta[key]).stat().st_size == files[meta[key]][1]
    if name == "lubuntu":
        assert meta["source"] == "iso" and meta["cmdline"].startswith("boot=live")
    else:
        assert meta["source"] == "disk" and meta["cmdline"].startswith("root=/dev/vda")
    # the recipe key did not change since the build: asking again finds it at once
    again = subprocess.run([str(BUILD), "--check", name], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(entry)


# --- booting ------------------------------------------------------------------------------

class Guest:
    """A QEMU guest of a real flavour: its console log and its host-side sockets."""

    def __init__(self, proc: subprocess.Popen, rundir: Path, t0: float):
        self.proc, self.rundir, self.t0 = proc, rundir, t0
        self.guest_sock = rundir / "guest.sock"
        self.qga_sock = rundir / "qga.sock"

    def connect(self, path: Path, timeout: float = 30.0) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(path))
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.1)

    def console(self) -> str:
        try:
            return (self.rundir / "console.log").read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return ""

    def agent(self, command: str, arguments: dict | None = None, timeout: float = 60.0):
        """One QEMU guest agent command (after a guest-sync, which skips stale replies)."""
        with self.connect(self.qga_sock) as s:
            s.settimeout(timeout)
            f = s.makefile("rwb")
            token = int(time.monotonic() * 1000) % 2**31
            for cmd in ({"execute": "guest-sync", "arguments": {"id": token}},
                        {"execute": command, **({"arguments": arguments} if arguments else {})}):
                f.write(json.dumps(cmd).encode() + b"\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if cmd["execute"] != "guest-sync" or reply.get("return") == token:
                        break
            if "error" in reply:
                raise RuntimeError(f"{command}: {reply['error']}")
            return reply["return"]

    def run(self, *argv: str) -> str:
        """A command's output, run in the guest by the QEMU guest agent."""
        import base64
        pid = self.agent("guest-exec", {"path": argv[0], "arg": list(argv[1:]), "capture-output": True})["pid"]
        for _ in range(300):
            st = self.agent("guest-exec-status", {"pid": pid})
            if st["exited"]:
                return base64.b64decode(st.get("out-data", "")).decode()
            time.sleep(0.1)
        raise TimeoutError(f"{argv} did not end in the guest")


@contextmanager
def booted(entry: Path, rundir: Path, through_grub: bool = False) -> Iterator[Guest]:
    """Cold boot of a built flavour: direct kernel boot with its cmdline (or, for
    an ISO, the ISO's own GRUB); a disk flavour's image behind a throw-away
    overlay (the cache stays untouched), an ISO flavour's ISO on a read-only CD drive."""
    meta = json.loads((entry / "flavour.json").read_text())
    kernel = ["-kernel", str(entry / meta["kernel"]), "-initrd", str(entry / meta["initrd"]),
              "-append", meta["cmdline"]]
    if through_grub:
        assert meta["source"] == "iso"
        kernel = ["-boot", "d"]
    media: list[str]
    if meta["source"] == "disk":
        overlay = rundir / "overlay.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(entry / meta["disk"]), str(overlay)], check=True)
        media = ["-drive", f"file={overlay},format=qcow2,if=virtio"]
    else:
        media = ["-drive", f"file={entry / meta['iso']},media=cdrom,if=none,id=cd0,readonly=on",
                 "-device", "ide-cd,drive=cd0,bus=ide.0"]
    cmd = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg",
        # -erms: TCG runs "rep stosb" slowly, and Linux uses it to clear pages when ERMS is offered
        "-cpu", "max,-smap,-erms", "-smp", "2", "-m", str(meta["memory_mib"]),
        *kernel, *media,
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=xsg,path={rundir / 'guest.sock'},server=on,wait=off",
        "-device", f"virtserialport,chardev=xsg,name={meta['guest_port']}",
        "-chardev", f"socket,id=qga,path={rundir / 'qga.sock'},server=on,wait=off",
        "-device", f"virtserialport,chardev=qga,name={meta['agent_port']}",
        "-serial", f"file:{rundir / 'console.log'}", "-display", "none", "-vga", "std",
        "-nic", "none", "-no-reboot",
    ]
    log = open(rundir / "qemu.log", "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        yield Guest(proc, rundir, t0)
    finally:
        proc.kill()
        proc.wait(30)
        log.close()


def read_messages(guest: Guest, sock: socket.socket, until, timeout: float) -> list[tuple[float, str, str]]:
    """(seconds since start, kind, value) of every line the guest sent, until ``until(messages)``."""
    deadline = time.monotonic() + timeout
    messages: list[tuple[float, str, str]] = []
    buf = b""
    sock.settimeout(1.0)
    while not until(messages):
        if time.monotonic() > deadline:
            raise TimeoutError(f"guest said {messages[-5:]} within {timeout:.0f} s; console:\n{guest.console()}")
        if guest.proc.poll() is not None:
            raise RuntimeError(f"QEMU exited ({guest.proc.returncode}); console:\n{guest.console()}")
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        if not chunk:
            raise RuntimeError("the guest port's socket closed")
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            assert len(line) < 128, line
            m = LINE_RE.match(line)
            assert m, f"not a guest message: {line!r}"
            messages.append((time.monotonic() - guest.t0, m[1].decode(), m[2].decode()))
    return messages


def alive(messages) -> bool:
    """ready, then at least two increasing heartbeats"""
    beats = [int(v) for _, k, v in messages if k == "heartbeat"]
    return any(k == "ready" for _, k, _ in messages) and len(beats) >= 2 and beats == sorted(set(beats))


def test_cold_boot(flavour, runtime_dir):
    name, entry = flavour
    with booted(entry, runtime_dir) as guest, guest.connect(guest.guest_sock) as sock:
        messages = read_messages(guest, sock, alive, READY_TIMEOUT[name])
        ready = [(t, v) for t, k, v in messages if k == "ready"]
        assert ready[0][1] == name
        kinds = [k for _, k, _ in messages]
        assert kinds.index("ready") < kinds.index("heartbeat"), "heartbeats come after ready"
        print(f"{name}: ready {ready[0][0]:.1f} s after QEMU started")
        # the QEMU guest agent answers on its own port
        mounts = guest.run("/bin/cat", "/proc/mounts")
        if name == "lubuntu":
            # a live system: root on the squashfs of the CD, the CD read-only
            assert re.search(r"^/dev/sr0 /run/live/medium iso9660 ro[ ,]", mounts, re.M), mounts
            assert re.search(r"^overlay / overlay", mounts, re.M), mounts
        else:
            assert re.search(r"^/dev/vda / ext4 rw", mounts, re.M), mounts
        if name == "server":
            listening = guest.run("/bin/ss", "-Htln")
            assert ":445 " in listening and ":5232 " in listening, listening
        else:
            # the desktop user's session sends the messages
            assert "user" in guest.run("/bin/ps", "-o", "user=", "-C", "xenubuntu-agent")


def test_iso_boots_through_its_grub(runtime_dir):
    """The live ISO boots on its own too (BIOS, GRUB's default entry after 3 s)."""
    entry = ensure_real_flavour("lubuntu", report=progress)
    with booted(entry, runtime_dir, through_grub=True) as guest, guest.connect(guest.guest_sock) as sock:
        messages = read_messages(guest, sock, alive, READY_TIMEOUT["lubuntu"] + 30)
        assert ("ready", "lubuntu") in [(k, v) for _, k, v in messages]
        assert "GNU GRUB" in (runtime_dir / "console.log").read_text(errors="replace")
        cmdline = guest.run("/bin/cat", "/proc/cmdline")
        assert "boot=live" in cmdline and "init_on_free=1" in cmdline


def test_damaged_cache_entry_is_built_again():
    name = "server"  # the quickest to rebuild
    entry = ensure_real_flavour(name, report=progress)
    check = lambda: subprocess.run([str(BUILD), "--check", name], capture_output=True, text=True, timeout=300)
    assert check().returncode == 0
    # without its completion stamp (the MANIFEST, written last) the entry does not count
    manifest = entry / "MANIFEST"
    saved = manifest.read_bytes()
    manifest.unlink()
    try:
        assert check().returncode != 0
    finally:
        manifest.write_bytes(saved)
    assert check().returncode == 0
    # a truncated file is found; the next build removes the entry and builds it again
    kernel = entry / "vmlinuz"
    size = kernel.stat().st_size
    os.truncate(kernel, size // 2)
    assert check().returncode != 0
    lines: list[str] = []
    again = ensure_real_flavour(name, report=lambda line: (lines.append(line), progress(line)))
    assert again == entry
    assert any("damaged" in line for line in lines), lines
    assert kernel.stat().st_size == size
    assert check().returncode == 0
