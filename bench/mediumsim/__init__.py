"""Slow media for tests and benchmarks: a file or a whole medium folder that reads
like a DVD, a USB 2 stick or a fast disk.

    from bench.mediumsim import slow_medium

    with slow_medium(statefile, "dvd") as slow:          # a file: a slowed copy of it
        before = slow.stats()
        data = slow.path.read_bytes()
        print(slow.stats() - before)                     # reads, bytes, seeks, ...

    with slow_medium(medium_root, "usb2") as slow:       # a folder: the same tree, slowed
        load_manifest(slow / MANIFEST_RELPATH)

    with slow_medium(path, profile("dvd", rate=10e6, seek=0.15)) as slow: ...

How: nbdkit serves the file through ``plugin.py`` (the timing model is
``model.py``, pure); ``nbdfuse`` shows that NBD export as a file in a FUSE
mount. A folder is first made into a squashfs image (data stored
uncompressed, so each file lies in one contiguous run, as on a DVD's ISO 9660
file system, which this kernel may not have), the image is served and
exposed that way, attached to a read-only loop device and mounted. So every
read of every file, its metadata too, passes the drive model in the order and
sizes the kernel issues it, and the medium's own layout decides what is a seek.

Page cache: a benchmark must read cold. The loop device reads its backing
file with direct I/O (no second copy of the image in the page cache), FUSE
drops a file's pages at each open (nbdfuse does not ask to keep them), and
:meth:`SlowMedium.drop_caches` drops what is left with
``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file of the mounted tree and
on the image, plus ``BLKFLSBUF`` on the loop device: no machine-wide
``drop_caches``. A fresh ``slow_medium`` is cold too.

Everything started is ended by its process id, unmounted and detached when the
``with`` block ends, also when it raises; a FUSE mount is never left behind
(``fusermount3 -u``, lazily if busy, then checked against the mount table).
Needs root for the folder form (loop device, mount); the file form needs only
``/dev/fuse``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from .model import PROFILES, STATS_SIZE, Profile, Stats, profile, unpack_stats

__all__ = ["slow_medium", "SlowMedium", "MediumSimError", "Profile", "Stats", "profile", "PROFILES",
           "make_image", "mounts_under", "loops_of"]

PLUGIN = Path(__file__).resolve().parent / "plugin.py"
START_TIMEOUT_S = 30.0
BLKFLSBUF = 0x1261  # linux/fs.h: flush a block device's buffers


class MediumSimError(RuntimeError):
    """A slowed medium could not be set up or torn down; ``log`` holds the tools' words."""

    def __init__(self, what: str, why: str, log: str = "") -> None:
        super().__init__(what, why, log)
        self.what, self.why, self.log = what, why, log

    def __str__(self) -> str:
        tail = f"\n{self.log.strip()[-2000:]}" if self.log.strip() else ""
        return f"{self.what}: {self.why}{tail}"


@dataclass
class SlowMedium:
    """A slowed file or folder, valid inside its ``with`` block.

    ``path`` is what to read (the slowed file, or the mounted copy of the
    folder); ``image`` the file the drive serves (the nbdfuse file).
    """

    path: Path
    profile: Profile
    image: Path
    stats_file: Path
    loop: str | None = None
    #: the processes serving it (nbdkit, nbdfuse), ended with the ``with`` block
    pids: tuple[int, ...] = ()

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, other: str | os.PathLike[str]) -> Path:
        return self.path / other

    def stats(self) -> Stats:
        """The drive's counters since it started (mounting included); subtract two snapshots
        for what happened in between."""
        for _ in range(1000):
            with open(self.stats_file, "rb") as f:
                first = f.read(STATS_SIZE)
                f.seek(0)
                second = f.read(STATS_SIZE)
            stats, seq = unpack_stats(first)
            if first == second and seq % 2 == 0:
                return stats
            time.sleep(0.001)
        raise MediumSimError(str(self.stats_file), "the counters keep changing")

    def drop_caches(self) -> None:
        """Forget every cached page of the medium, so the next reads go to the drive."""
        if self.path.is_dir():
            for dirpath, _dirs, files in os.walk(self.path):
                for name in files:
                    p = os.path.join(dirpath, name)
                    if not os.path.islink(p):
                        _fadvise_dontneed(p)
        if self.loop is not None:
            fd = os.open(self.loop, os.O_RDONLY)
            try:
                fcntl.ioctl(fd, BLKFLSBUF, 0)
            finally:
                os.close(fd)
        _fadvise_dontneed(self.image)


def _fadvise_dontneed(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_image(folder: Path, image: Path) -> Path:
    """A squashfs image of ``folder``, its data stored uncompressed: each file one
    contiguous run, small files packed together, metadata ahead of the data.

    :raises MediumSimError: mksquashfs failed.
    """
    argv = ["mksquashfs", str(folder), str(image), "-noappend", "-noI", "-noD", "-noF", "-noX", "-no-xattrs",
            "-all-root", "-no-progress", "-quiet", "-processors", "1"]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise MediumSimError(f"making a squashfs image of {folder}", f"mksquashfs exited {r.returncode}",
                             r.stdout + r.stderr)
    return image


@contextmanager
def slow_medium(path: str | os.PathLike[str], kind: str | Profile = "dvd", *,
                workdir: str | os.PathLike[str] | None = None, trace: bool = False,
                mount: bool = False) -> Iterator[SlowMedium]:
    """``path`` (a file, or a folder) as read from a slow medium of ``kind``
    (a name in :data:`PROFILES` or a :class:`Profile`).

    A file is shown as ``SlowMedium.path``, a file of the same name in a
    temporary folder; a folder as a read-only mount of a squashfs image of it
    (made in the temporary folder). ``trace`` keeps one line per drive request
    in ``trace.log`` there (offset, length, seek, gap, delay, arrival).
    ``mount``: ``path`` is a squashfs image already (:func:`make_image`), to be
    served and mounted like a folder; several runs can share one image.

    :raises MediumSimError: a tool failed to start or to stop.
    """
    prof = PROFILES[kind] if isinstance(kind, str) else kind
    src = Path(path).resolve()
    if not src.exists():
        raise FileNotFoundError(src)
    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="medsim-", dir=workdir))
        stack.callback(_remove_workdir, tmp)  # runs last, once nothing is mounted there
        mount = mount or src.is_dir()
        if src.is_dir():
            served = make_image(src, tmp / "medium.sqfs")
        else:
            served = src
        stats_file = tmp / "stats"
        sock = tmp / "nbd.sock"
        argv = ["nbdkit", "-f", "-r", "--exit-with-parent", "-U", str(sock), "-P", str(tmp / "nbdkit.pid"),
                "python", str(PLUGIN), f"file={served}", f"stats={stats_file}", *prof.args()]
        if trace:
            argv.append(f"trace={tmp / 'trace.log'}")
        nbdkit = _start(argv, tmp / "nbdkit.log")
        stack.callback(_end, nbdkit, "nbdkit", tmp / "nbdkit.log")
        _wait_for(lambda: (tmp / "nbdkit.pid").exists() and stats_file.exists(), nbdkit, "nbdkit",
                  tmp / "nbdkit.log")

        drive = tmp / "drive"
        drive.mkdir()
        image = drive / served.name
        # -s: one FUSE thread, so requests reach the drive in the order the kernel issued them
        fuse = _start(["nbdfuse", "-r", "-s", "-C", "1", "-P", str(tmp / "nbdfuse.pid"), str(image),
                       "--unix", str(sock)], tmp / "nbdfuse.log")
        stack.callback(_unmount_fuse, drive, fuse, tmp / "nbdfuse.log")
        _wait_for(lambda: (tmp / "nbdfuse.pid").exists() and image.exists(), fuse, "nbdfuse", tmp / "nbdfuse.log")

        slow = SlowMedium(image, prof, image, stats_file, pids=(nbdkit.pid, fuse.pid))
        if mount:
            slow.loop = _attach_loop(image)
            stack.callback(_detach_loop, slow.loop)
            root = tmp / "medium"
            root.mkdir()
            _run(["mount", "-t", "squashfs", "-o", "ro", slow.loop, str(root)], f"mounting {slow.loop}")
            stack.callback(_unmount, root)
            slow.path = root
        yield slow


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        # its own session: a Ctrl-C meant for the caller does not pull the medium away mid-cleanup
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)


def _wait_for(ready, proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc.poll() is not None:
            raise MediumSimError(f"starting {name}", f"it exited with status {proc.returncode}", _read(log))
        if time.monotonic() > deadline:
            raise MediumSimError(f"starting {name}", f"not ready within {START_TIMEOUT_S:.0f} s", _read(log))
        time.sleep(0.02)


def _read(log: Path) -> str:
    try:
        return log.read_text(errors="replace")
    except OSError:
        return ""


def _end(proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
    """SIGTERM, then SIGKILL; by the process we started, never by name."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def mounts_under(folder: Path) -> list[str]:
    """Mount points at or below ``folder``, from the mount table."""
    prefix = str(folder).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _unmount_fuse(drive: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Unmount the nbdfuse file (nbdfuse then exits by itself), lazily if something still
    holds it; end nbdfuse if it does not go; check nothing is left mounted."""
    try:
        if mounts_under(drive):
            r = subprocess.run(["fusermount3", "-u", str(drive)], capture_output=True, text=True)
            if r.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(drive)], capture_output=True, text=True)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            _end(proc, "nbdfuse", log)
    finally:
        if mounts_under(drive):
            subprocess.run(["fusermount3", "-u", "-z", str(drive)], capture_output=True)
        if mounts_under(drive):
            raise MediumSimError(f"unmounting {drive}", "still mounted", _read(log))


def _attach_loop(image: Path) -> str:
    """A read-only loop device on ``image``; direct I/O where the kernel allows it."""
    for extra in (["--direct-io=on"], []):
        r = subprocess.run(["losetup", "--find", "--show", "--read-only", *extra, str(image)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.strip()
    raise MediumSimError(f"attaching {image} to a loop device", f"losetup exited {r.returncode}", r.stderr)


def loops_of(image: Path) -> list[str]:
    """Loop devices whose backing file is ``image``."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().strip() == str(image):
                found.append("/dev/" + backing.parent.parent.name)
        except OSError:
            pass
    return found


def _detach_loop(loop: str) -> None:
    for _ in range(50):
        r = subprocess.run(["losetup", "-d", loop], capture_output=True, text=True)
        if r.returncode == 0 or not Path(f"/sys/block/{Path(loop).name}/loop").exists():
            return
        time.sleep(0.1)  # udev may still hold it open for a moment
    raise MediumSimError(f"detaching {loop}", r.stderr.strip() or f"losetup exited {r.returncode}")


def _unmount(point: Path) -> None:
    r = subprocess.run(["umount", str(point)], capture_output=True, text=True)
    if r.returncode != 0 and mounts_under(point):
        # busy: detach it now, the kernel lets go when the last user does
        subprocess.run(["umount", "-l", str(point)], capture_output=True, text=True)
    if mounts_under(point):
        raise MediumSimError(f"unmounting {point}", r.stderr.strip())


def _run(argv: list[str], what: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise MediumSimError(what, f"{argv[0]} exited {r.returncode}", r.stderr)


def _remove_workdir(tmp: Path) -> None:
    if mounts_under(tmp):
        raise MediumSimError(f"removing {tmp}", "something is still mounted there; left in place")
    shutil.rmtree(tmp, ignore_errors=True)
