"""Preloading what a restore reads from the medium into RAM.

On a seek-bound medium (a DVD: ~20 MB/s, ~100 ms a seek) the bytes read decide
how long a person waits. While the manager is idle, the flavours that are not
running yet get their compressed statefile read into memory, one sequential read
at a time, so that starting one later reads RAM instead of the disc: the
statefile, or a lazy restore's RAM image and devices' state (the backend names
them, ``Backend.preload_parts``). A preload
yields the medium at once to a restore that needs it (it pauses between chunks)
and goes on afterwards.

Each copy lives in an anonymous memory file (``memfd``): it is fed to the
hypervisor exactly as the file on the medium would be, through the same verified
feed, so a copy damaged in RAM is caught by the same checks (sha256, zstd's frame
checksums) and never restored silently.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["Preload", "CHUNK"]

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # between chunks a preload looks whether a restore wants the medium


class Preload:
    """Files a restore reads, copied into RAM one after the other, in a thread of its own.

    ``medium_free`` is waited on before each chunk: it is cleared while a restore
    reads the medium. ``done(preload)`` is called once, from the thread, when the
    copy is complete, failed or was cancelled.
    """

    def __init__(self, name: str, files: Sequence[tuple[Path, int]], medium_free: threading.Event,
                 done: Callable[[Preload], None]):
        self.name = name
        self.files = tuple(files)
        self.size = sum(size for _, size in self.files)
        self.copied = 0
        self.pauses = 0
        self.error: str | None = None
        self._medium_free = medium_free
        self._done = done
        self._cancel = threading.Event()
        # closed by release()
        self._fds = [os.memfd_create(f"xsession-preload-{name}-{i}", os.MFD_CLOEXEC) for i in range(len(self.files))]
        self._thread = threading.Thread(target=self._run, name=f"preload-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def complete(self) -> bool:
        return self.error is None and self.copied == self.size and not self._cancel.is_set()

    @property
    def mib(self) -> int:
        return -(-self.size // (1 << 20))

    def sources(self) -> tuple[Path, ...]:
        """The copies, in the order of ``files``, as paths this process can open (for the verified feed)."""
        return tuple(Path(f"/proc/{os.getpid()}/fd/{fd}") for fd in self._fds)

    def cancel(self) -> None:
        self._cancel.set()

    def release(self) -> None:
        """Cancel and free the memory (idempotent)."""
        self._cancel.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5.0)
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def _run(self) -> None:
        try:
            for fd, (path, size) in zip(list(self._fds), self.files, strict=True):
                if not self._copy(path, size, fd):
                    return
        except OSError as e:
            self.error = e.strerror or str(e)
        finally:
            if self.error is not None:
                log.warning("%s: preload failed: %s", self.name, self.error, extra={"SESSION": self.name})
            self._done(self)

    def _copy(self, path: Path, size: int, fd: int) -> bool:
        """One file into its memory file; False when cancelled or failed."""
        done = 0
        with open(path, "rb", buffering=0) as src:
            while done < size:
                if not self._medium_free.is_set():
                    self.pauses += 1
                    while not self._medium_free.wait(0.2):  # a restore reads the medium: let it
                        if self._cancel.is_set():
                            return False
                if self._cancel.is_set():
                    return False
                block = src.read(min(CHUNK, size - done))
                if not block:
                    self.error = f"{path.name} ended after {done} of {size} bytes"
                    return False
                os.pwrite(fd, block, done)
                done += len(block)
                self.copied += len(block)
        return True
