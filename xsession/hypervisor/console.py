"""Watching a guest's console log, the one sign of life every backend has."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["wait_for_text"]


def wait_for_text(path: Path, needle: str, timeout: float, alive: Callable[[], bool], start: int = 0,
                  alive_every: float = 0.0, poll: float = 0.05) -> bool:
    """Poll a growing log from byte ``start`` until ``needle`` appears.

    False when the deadline passes or ``alive()`` says the guest is gone (asked at
    most every ``alive_every`` seconds: on Xen it costs an ``xl`` call).
    """
    deadline = time.monotonic() + timeout
    pos = start
    tail = b""
    want = needle.encode()
    next_alive_check = 0.0
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            pos += len(chunk)
            tail = (tail + chunk)[-(len(want) + 65536):]
            if want in tail:
                return True
        now = time.monotonic()
        if now >= next_alive_check:
            if not alive():
                return False
            next_alive_check = now + alive_every
        time.sleep(poll)
    return False
