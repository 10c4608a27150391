"""nbdkit Python plugin: a read-only file served at the speed of a slow medium.

    nbdkit -r python plugin.py file=IMAGE stats=STATSFILE [rate=20e6] [seek=0.1]
           [gap=1048576] [buffer=2097152] [trace=TRACEFILE]

Each read is timed by :class:`model.Drive` (one drive: requests are served one
at a time) and its data is held back until the drive would have delivered it.
The counters are kept in ``stats``, a small file the plugin maps and updates
in place after every read (:func:`model.pack_stats`; a sequence number, odd
while an update is being written, lets a reader take a consistent copy).
``trace``, if given, gets one line per read: offset, length, seek, gap, delay, arrival (monotonic s).
"""

import io
import mmap
import os
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nbdkit  # noqa: E402

from model import DVD, STATS_SIZE, Drive, Profile, pack_stats  # noqa: E402

API_VERSION = 2

_cfg = {"file": None, "stats": None, "trace": None, "rate": DVD.rate, "seek": DVD.seek, "gap": DVD.gap,
        "buffer": DVD.buffer}
_lock = threading.Lock()
_state = {}


def config(key, value):
    if key in ("file", "stats", "trace"):
        _cfg[key] = os.path.abspath(value)
    elif key in ("rate", "seek"):
        _cfg[key] = float(value)
    elif key in ("gap", "buffer"):
        _cfg[key] = int(value)
    else:
        raise RuntimeError(f"unknown parameter {key!r}")


def config_complete():
    if _cfg["file"] is None or _cfg["stats"] is None:
        raise RuntimeError("file= and stats= are required")
    prof = Profile("served", rate=_cfg["rate"], seek=_cfg["seek"], gap=_cfg["gap"], buffer=_cfg["buffer"])
    _state["drive"] = Drive(prof)
    _state["seq"] = 0
    # the shared record: mapped here, unmapped when the process ends
    fd = os.open(_cfg["stats"], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, STATS_SIZE)
    _state["stats"] = mmap.mmap(fd, STATS_SIZE)
    os.close(fd)
    _publish()
    # closed when the process ends
    _state["trace"] = io.open(_cfg["trace"], "a", buffering=1) if _cfg["trace"] else None


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def open(readonly):  # noqa: A001 - nbdkit's name
    return os.open(_cfg["file"], os.O_RDONLY)


def close(h):
    os.close(h)


def get_size(h):
    return os.fstat(h).st_size


def can_write(h):
    return False


def can_multi_conn(h):
    return False  # one drive, one head


def pread(h, buf, offset, flags):
    with _lock:
        now = time.monotonic()
        drive = _state["drive"]
        before = drive.stats
        done = drive.request(offset, len(buf), now)
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            n = os.preadv(h, [view[got:]], offset + got)
            if n <= 0:
                raise RuntimeError(f"short read at {offset + got}")
            got += n
        _publish()
        trace = _state["trace"]
        if trace is not None:
            after = drive.stats
            trace.write(f"{offset} {len(buf)} {after.seeks - before.seeks} {after.gap_bytes - before.gap_bytes} "
                        f"{done - now:.6f} {now:.6f}\n")
        delay = done - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _publish():
    mm = _state["stats"]
    seq = _state["seq"]
    mm[8:16] = struct.pack("<Q", seq + 1)  # odd: an update is under way
    _state["seq"] = seq + 2
    mm[:] = pack_stats(_state["drive"].stats, seq + 2)
