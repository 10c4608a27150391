"""Talking to demo guests in tests: their serial console and their output."""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

COUNTER_RE = re.compile(rb"COUNTER (\d+)")


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
