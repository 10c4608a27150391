"""Talking to demo guests in tests: their serial console and their output."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

COUNTER_RE = re.compile(rb"COUNTER (\d+)")


def session_qemu_pid(runtime_dir: Path, name: str) -> int:
    """The pid of the QEMU that the manager runs for session ``name`` (its run record)."""
    return int(json.loads((runtime_dir / "sessions" / name / "guest.json").read_text())["pid"])


def qemu_pids_under(folder: Path) -> list[int]:
    """QEMU processes whose command line mentions ``folder``."""
    pids = []
    needle = str(folder).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd and needle in cmd:
            pids.append(int(entry.name))
    return pids


def converse(serial_sock: str | Path, line: str, answered, timeout: float, what: str):
    """Write a line on a guest's serial console, then read its complete lines until
    ``answered(lines)`` gives something other than None; that is returned."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(serial_sock))
        s.sendall(line.encode() + b"\n")
        buf = b""
        while time.monotonic() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
            result = answered(buf.split(b"\n")[:-1])  # complete lines only
            if result is not None:
                return result
    raise TimeoutError(f"no {what} from {serial_sock} within {timeout} s; got {buf[-300:]!r}")


def ask(serial_sock: str, line: str, expect: bytes = b"PONG", timeout: float = 15.0) -> str:
    """Write a line on the guest's serial console and return what it answered."""
    return converse(serial_sock, line, lambda lines: next(
        (ln.decode(errors="replace").strip() for ln in lines if ln.startswith(expect)), None), timeout, repr(expect))


def read_log(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return b""


def counters(log: bytes) -> list[int]:
    return [int(m) for m in COUNTER_RE.findall(log)]


def wait_for(log_path: str | Path, pattern: bytes, timeout: float = 30.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = read_log(log_path)
        if pattern in data:
            return data
        time.sleep(0.05)
    raise TimeoutError(f"{pattern!r} not in {log_path} within {timeout} s")


def damage(path: Path, offset: int | None = None, count: int = 16, truncate_to: int | None = None,
           empty: bool = False) -> None:
    """Damage a (hard-linked) file without touching the other links: rewrite it as a new file."""
    data = bytearray(path.read_bytes())
    if empty:
        data = bytearray()
    elif truncate_to is not None:
        data = data[:truncate_to]
    else:
        start = len(data) // 2 if offset is None else offset
        for i in range(start, start + count):
            data[i] ^= 0xFF
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)


# --- the office: a demo medium with one, and a demo guest speaking on its channel ------------

def with_office(medium: Path, server: str, desktops: list[str]) -> Path:
    """Give a (hard-linked) medium copy an ``office`` section; the manifest is replaced,
    never changed in place, so the cached medium stays as it is."""
    import yaml

    manifest = medium / "xenubuntu" / "manifest.yaml"
    data = yaml.safe_load(manifest.read_text())
    data["office"] = {"server": server, "desktops": desktops}
    tmp = manifest.with_name("manifest.yaml.new")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, manifest)
    return medium


#: the demo guest's channel device (its virtio-serial port's name)
GUEST_PORT = ("$(for p in /sys/class/virtio-ports/*; do [ $(cat $p/name) = org.xenubuntu.guest.0 ] && "
              "echo /dev/${p##*/}; done)")


def in_guest(serial: str | Path, command: str, timeout: float = 30.0) -> list[str]:
    """Run a shell command in a demo guest (its console's ``sh:``); the lines it printed."""
    lines = converse(serial, f"sh:{command}",
                     lambda ls: ls if any(ln.startswith(b"PONG sh") for ln in ls) else None, timeout, "PONG sh")
    return [ln[4:].decode(errors="replace").strip() for ln in lines if ln.startswith(b"OUT ")]


def open_channel(serial: str | Path) -> None:
    """Hold the guest's channel open in the background, as an agent would: what dom0 writes
    is appended to /run/from-dom0, what is written into the fifo /run/to-dom0 goes to dom0
    (:func:`to_dom0`). The port has one opener at a time, so everything goes through it."""
    in_guest(serial, f"P={GUEST_PORT}; mkfifo /run/to-dom0; : > /run/from-dom0; "
                     "(exec 5<>$P; cat <&5 >> /run/from-dom0 & while :; do cat /run/to-dom0 >&5; done) "
                     ">/dev/null 2>&1 </dev/null &")


def to_dom0(serial: str | Path, line: str) -> None:
    """One line from inside the guest to dom0, through its real channel (see :func:`open_channel`)."""
    in_guest(serial, f"echo '{line}' > /run/to-dom0")


def from_dom0(serial: str | Path) -> list[str]:
    """Every line dom0 wrote to the guest's channel so far."""
    return in_guest(serial, "cat /run/from-dom0")


def until(check, timeout: float = 30.0, what: str = "the condition"):
    """Poll ``check()`` until it gives something true; that is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not happen within {timeout} s")


class Speaker:
    """A demo guest speaking to dom0 on its real channel, its heartbeats numbered;
    ``last_seq()`` is the last heartbeat dom0 heard from it (the engine's reader, or
    the Session's ``Heartbeat`` property).

    QEMU drops what a guest writes on its port while dom0's end of the socket is not
    connected yet (right after a restore), so :meth:`connect` first repeats a heartbeat
    until dom0 heard one; from then on nothing is lost.
    """

    def __init__(self, serial: str | Path, last_seq: Callable[[], int], name: str = "the guest"):
        self.serial, self.last_seq, self.name = serial, last_seq, name
        self.seq = 0
        open_channel(serial)

    def say(self, line: str) -> None:
        to_dom0(self.serial, line)

    def heartbeat(self) -> int:
        """One heartbeat, returned once dom0 took it (and so acted on it)."""
        self.seq += 1
        self.say(f"xenubuntu1 heartbeat {self.seq}")
        until(lambda: self.last_seq() >= self.seq, 30, f"heartbeat {self.seq} of {self.name}")
        return self.seq

    def connect(self) -> Speaker:
        def heard() -> bool:
            self.seq += 1
            self.say(f"xenubuntu1 heartbeat {self.seq}")
            time.sleep(0.3)
            return self.last_seq() > 0
        until(heard, 30, f"{self.name}'s channel to connect")
        self.heartbeat()
        return self

    def heard(self) -> list[str]:
        """Every line dom0 wrote to the guest's channel so far."""
        return from_dom0(self.serial)
