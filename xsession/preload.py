"""Preloading a compressed statefile from the medium into RAM.

On a seek-bound medium (a DVD: ~20 MB/s, ~100 ms a seek) the bytes read decide
how long a person waits. While the manager is idle, the flavours that are not
running yet get their compressed statefile read into memory, one sequential read
at a time, so that starting one later reads RAM instead of the disc. A preload
yields the medium at once to a restore that needs it (it pauses between chunks)
and goes on afterwards.

The copy lives in an anonymous memory file (``memfd``): it is fed to the
hypervisor exactly as the file on the medium would be, through the same verified
feed, so a copy damaged in RAM is caught by the same checks (sha256, zstd's frame
checksums) and never restored silently.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["Preload", "CHUNK"]

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # between chunks a preload looks whether a restore wants the medium


class Preload:
    """One statefile being copied into RAM, in a thread of its own.

    ``medium_free`` is waited on before each chunk: it is cleared while a restore
    reads the medium. ``done(preload)`` is called once, from the thread, when the
    copy is complete, failed or was cancelled.
    """

    def __init__(self, name: str, path: Path, size: int, medium_free: threading.Event,
                 done: Callable[[Preload], None]):
        self.name = name
        self.path = path
        self.size = size
        self.copied = 0
        self.pauses = 0
        self.error: str | None = None
        self._medium_free = medium_free
        self._done = done
        self._cancel = threading.Event()
        self._fd = os.memfd_create(f"xsession-preload-{name}", os.MFD_CLOEXEC)  # closed by release()
        self._thread = threading.Thread(target=self._run, name=f"preload-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def complete(self) -> bool:
        return self.error is None and self.copied == self.size and not self._cancel.is_set()

    @property
    def mib(self) -> int:
        return -(-self.size // (1 << 20))

    def source(self) -> Path:
        """The copy, as a path this process can open (for the verified feed)."""
        return Path(f"/proc/{os.getpid()}/fd/{self._fd}")

    def cancel(self) -> None:
        self._cancel.set()

    def release(self) -> None:
        """Cancel and free the memory (idempotent)."""
        self._cancel.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5.0)
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def _run(self) -> None:
        try:
            with open(self.path, "rb", buffering=0) as src:
                while self.copied < self.size:
                    if not self._medium_free.is_set():
                        self.pauses += 1
                        while not self._medium_free.wait(0.2):  # a restore reads the medium: let it
                            if self._cancel.is_set():
                                return
                    if self._cancel.is_set():
                        return
                    block = src.read(min(CHUNK, self.size - self.copied))
                    if not block:
                        self.error = f"the statefile ended after {self.copied} of {self.size} bytes"
                        return
                    os.pwrite(self._fd, block, self.copied)
                    self.copied += len(block)
        except OSError as e:
            self.error = e.strerror or str(e)
        finally:
            if self.error is not None:
                log.warning("%s: preload failed: %s", self.name, self.error, extra={"SESSION": self.name})
            self._done(self)
