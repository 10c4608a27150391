"""Checking and feeding a statefile to a hypervisor.

QEMU's migration stream (and an xl save image) carries no integrity check: a
flipped RAM byte loads silently, a damaged CPU state reboots the guest, a
corrupt zstd stream is loaded anyway. So the manager never lets the hypervisor
read the medium itself. It checks what it can before starting (presence, size,
compression magic), then reads the file once, hashing it (sha256) and piping it
through ``zstd -dc`` (whose frame checksums it verifies) into a file descriptor
the hypervisor reads. The guest is resumed only after the feed reports the
sha256 and the decompressor's verdict as good.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import resource
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import MediumUnavailable, StatefileCorrupt
from .manifest import StatePart

__all__ = ["ZSTD_MAGIC", "precheck", "FeedResult", "Feeder", "sha256_of", "widen_pipe", "zstd_checks_suffice",
           "batch_scheduling"]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20  # 1 MiB: few system calls, progress still fine-grained for a DVD


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def precheck(path: Path, sf: StatePart, medium_root: Path | None = None) -> None:
    """The checks that cost nothing: the file is there, has its recorded size and
    starts like its compression says.

    :raises MediumUnavailable: the medium itself is gone.
    :raises StatefileCorrupt: the file is missing, empty, truncated, too long or not zstd.
    """
    if medium_root is not None and not medium_root.is_dir():
        raise MediumUnavailable(str(medium_root), "the medium is not mounted")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise StatefileCorrupt(str(path), "missing from the medium") from None
    except OSError as e:
        raise MediumUnavailable(str(path), e.strerror or str(e)) from e
    if st.st_size == 0:
        raise StatefileCorrupt(str(path), "empty (0 bytes)")
    if st.st_size < sf.size:
        raise StatefileCorrupt(str(path), f"truncated: {st.st_size} of {sf.size} bytes")
    if st.st_size > sf.size:
        raise StatefileCorrupt(str(path), f"longer than recorded: {st.st_size} bytes, expected {sf.size}")
    if sf.compression == "zstd":
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError as e:
            raise MediumUnavailable(str(path), e.strerror or str(e)) from e
        if head != ZSTD_MAGIC:
            raise StatefileCorrupt(str(path), "does not start with a zstd frame header")


@dataclass(frozen=True)
class FeedResult:
    """What the feed saw: ``problem`` is None when the stream was whole and true."""

    bytes_read: int
    sha256: str
    problem: str | None
    medium_error: str | None = None
    #: the hypervisor stopped reading before the end: its own exit says why
    reader_gone: bool = False


class Feeder(threading.Thread):
    """Reads a statefile once, hashing it and writing the decompressed stream to ``out_fd``.

    ``out_fd`` is closed by the feeder when it is done (that EOF ends the
    hypervisor's read). Call :meth:`result` after the hypervisor has loaded the
    stream; :meth:`cancel` stops a feed whose reader died.
    """

    def __init__(self, path: Path, sf: StatePart, out_fd: int, progress: Callable[[int, int], None] | None = None,
                 *, verify_sha256: bool = True, batch: bool = False, file_size: int | None = None):
        super().__init__(name=f"feed-{path.name}", daemon=True)
        self.path = path
        self.sf = sf
        #: False where zstd's own checks suffice (:func:`zstd_checks_suffice`): no hashing pass
        self.verify_sha256 = verify_sha256
        #: the decompressor runs as a batch task (:func:`batch_scheduling`), for a reader that does too
        self.batch = batch
        #: ``out_fd`` is a file of this size: runs of zeros are skipped, not written (a RAM
        #: image stays sparse), and the decompressor may write no further (a stream that
        #: decodes to more, a bomb, would fill memory before its sha256 is known to be wrong)
        self.file_size = file_size
        self.out_fd = out_fd  # closed in run(), always
        self.progress = progress
        self._cancel = threading.Event()
        self._result: FeedResult | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def cancel(self) -> None:
        self._cancel.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def discard(self) -> None:
        """Give up a feed that was never started: its end of the pipe is closed."""
        if not self.is_alive() and self._result is None and self.out_fd >= 0:
            os.close(self.out_fd)
            self.out_fd = -1

    def failure(self) -> FeedResult | None:
        """The result, if the feed has already ended badly (without waiting).

        A decompressor that rejects the stream at once leaves the hypervisor waiting
        for input that never comes: the restore asks this while it waits, to end at once.
        """
        result = self._result
        if result is not None and (result.problem is not None or result.medium_error is not None):
            return result
        return None

    def result(self, timeout: float) -> FeedResult:
        """:raises TimeoutError: the feed did not end in time."""
        self.join(timeout)
        if self.is_alive() or self._result is None:
            self.cancel()
            raise TimeoutError(f"feeding {self.path} did not finish within {timeout:.0f} s")
        return self._result

    def run(self) -> None:
        try:
            self._feed()
        except Exception as e:  # never leave result() waiting for a thread that died
            self._result = FeedResult(0, "", f"the feed failed: {e!r}")
            if self.out_fd >= 0:
                os.close(self.out_fd)
                self.out_fd = -1

    def _feed(self) -> None:
        h = hashlib.sha256()
        done = 0
        reader_gone = False
        medium_error: str | None = None
        sink = None
        try:
            if self.sf.compression == "zstd":
                # zstd verifies each frame's content checksum and exits non-zero on damage
                argv = ["zstd", "-dcq", "--no-progress"] + (["--sparse"] if self.file_size is not None else [])
                self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                              stdout=self.out_fd, stderr=subprocess.PIPE)
                if self.batch:
                    batch_scheduling(self._proc.pid)
                if self.file_size is not None:  # before any input: zstd has written nothing yet
                    resource.prlimit(self._proc.pid, resource.RLIMIT_FSIZE, (self.file_size, self.file_size))
                os.close(self.out_fd)  # zstd holds its own copy now
                self.out_fd = -1
                sink = self._proc.stdin
                assert sink is not None  # stdin=PIPE
                widen_pipe(sink.fileno())
            try:
                f = open(self.path, "rb")
            except OSError as e:
                raise _MediumError(e.strerror or str(e)) from e
            with f:
                while not self._cancel.is_set():
                    try:
                        block = f.read(CHUNK)
                    except OSError as e:  # an ejected or failing medium
                        raise _MediumError(e.strerror or str(e)) from e
                    if not block:
                        break
                    done += len(block)
                    if not reader_gone:
                        # once the reader is gone, keep hashing: the diagnosis wants the whole file
                        try:
                            if sink is not None:
                                sink.write(block)
                            else:
                                _write_all(self.out_fd, block)
                        except OSError:
                            reader_gone = True
                            if self._decompressor_failed():
                                break  # its own words are the diagnosis: no need to read on
                    if self.verify_sha256:
                        h.update(block)  # after the write: hashing overlaps the decompression
                    if self.progress is not None:
                        self.progress(done, self.sf.size)
        except _MediumError as e:
            medium_error = str(e)
        finally:
            if sink is not None:
                try:
                    sink.close()
                except OSError:
                    pass
            if self.out_fd >= 0:
                os.close(self.out_fd)
                self.out_fd = -1
        zstd_error: str | None = None
        if self._proc is not None:
            err = b""
            if self._proc.stderr is not None:
                with self._proc.stderr:
                    err = self._proc.stderr.read()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.returncode == -signal.SIGPIPE:
                reader_gone = True  # the hypervisor closed the stream; zstd could not write on
            elif self._proc.returncode == -signal.SIGXFSZ:
                zstd_error = f"it decodes to more than the recorded {self.file_size} bytes"
            elif self._proc.returncode != 0:
                zstd_error = _last_words(err, self._proc.returncode)
        if (self._proc is not None and reader_gone and zstd_error is None and medium_error is None
                and not self._cancel.is_set() and done == self.sf.size):
            # the hypervisor refused the stream before zstd reached its frame checksum: was
            # the stream itself damaged? (a failure path only; the file was just read whole)
            zstd_error = _zstd_test(self.path)
        digest = h.hexdigest() if self.verify_sha256 else ""
        # the most telling diagnosis first
        problem: str | None = None
        if medium_error is not None:
            pass
        elif self._cancel.is_set():
            problem = "the feed was cancelled"
        elif zstd_error is not None and done < self.sf.size:
            problem = f"zstd rejected the stream after {done} of {self.sf.size} bytes: {zstd_error}"
        elif done != self.sf.size:
            problem = f"read {done} bytes, expected {self.sf.size}"
        elif self.verify_sha256 and digest != self.sf.sha256:
            problem = f"sha256 mismatch: got {digest[:16]}..., expected {self.sf.sha256[:16]}..."
        elif zstd_error is not None:
            problem = f"zstd rejected the stream: {zstd_error}"
        self._result = FeedResult(done, digest, problem, medium_error, reader_gone)


    def _decompressor_failed(self) -> bool:
        """Whether zstd ended by itself with an error (not because its reader left)."""
        proc = self._proc
        if proc is None:
            return False
        try:
            status = proc.wait(0.2)  # a closed stdin is zstd's own end, a moment away
        except subprocess.TimeoutExpired:
            return False
        return status not in (0, -signal.SIGPIPE)


def _zstd_test(path: Path) -> str | None:
    """zstd's own verdict on a whole file (``zstd -t``): None when every frame checks."""
    try:
        proc = subprocess.run(["zstd", "-tq", "--no-progress", str(path)], capture_output=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return None  # no verdict: the hypervisor's own words stand
    if proc.returncode == 0:
        return None
    return _last_words(proc.stderr, proc.returncode)


def _last_words(stderr: bytes, status: int) -> str:
    """A tool's last line of complaint, on one line and bounded."""
    words = stderr.decode(errors="replace").strip().splitlines()
    return " ".join(words[-1].split())[:300] if words else f"it exited with status {status}"


class _MediumError(Exception):
    pass


PIPE_BYTES = 1 << 20  # a 1 MiB pipe: a chunk per write instead of 16 wake-ups of the reader


def widen_pipe(fd: int) -> None:
    """Raise a pipe's buffer (64 KiB by default); best effort, the limit is a sysctl."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def batch_scheduling(pid: int) -> None:
    """Run a process of the stream (the decompressor, the hypervisor's reader) as a batch
    task (``SCHED_BATCH``). What it starts later inherits the policy: the caller gives a
    long-lived child (Xen's device model) the normal one back.

    On one CPU (Xen's dom0) the reader, woken by every write into the pipe, would
    otherwise preempt the writer each time: three times the context switches, each a
    page-table switch that a PV dom0 pays in hypercalls. Batch tasks do not preempt
    on wakeup, so each side fills or drains the pipe in one turn. Best effort.
    """
    try:
        os.sched_setscheduler(pid, os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        pass


def zstd_checks_suffice(path: Path, sf: StatePart) -> bool:
    """Whether zstd itself proves the stream whole and true, so no sha256 pass is needed.

    True when the (first and only, as mastering writes it) frame's header promises
    a content checksum and records a content size equal to the manifest's
    ``raw_size``: zstd then fails unless every decoded byte matches the checksum
    and exactly ``raw_size`` bytes come out, and :class:`Feeder` checks that
    exactly ``size`` bytes went in. A header that promises less (or cannot be
    read) leaves the sha256 check in place.
    """
    if sf.compression != "zstd":
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(18)  # magic, descriptor, window, dictionary id (<= 4), content size (<= 8)
    except OSError:
        return False
    if len(head) < 6 or head[:4] != ZSTD_MAGIC:
        return False
    fhd = head[4]
    fcs_flag, single_segment, checksum, did_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    if not checksum:
        return False
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[did_flag]
    width = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if width == 0 or len(head) < pos + width:
        return False  # no content size recorded
    size = int.from_bytes(head[pos:pos + width], "little") + (256 if width == 2 else 0)
    return size == sf.raw_size
