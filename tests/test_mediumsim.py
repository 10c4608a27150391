"""The slow-medium model (pure timing, with hypothesis) and the served medium
(nbdkit + nbdfuse, a folder as a squashfs image on a loop device).

No assertion here reads a clock: the served medium is checked on the drive's
own counters, which do not depend on how busy the machine is.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.mediumsim import MediumSimError, SlowMedium, loops_of, mounts_under, slow_medium
from bench.mediumsim.model import (
    DVD,
    FAST,
    USB2,
    Drive,
    MiB,
    Stats,
    pack_stats,
    profile,
    sequence_cost,
    step,
    unpack_stats,
)
from xsession.manifest import MachineConfig, Statefile
from xsession.statefile import Feeder

PROFILES = st.sampled_from([DVD, USB2, profile("dvd", rate=5e6, seek=0.25, gap=2 * MiB)])
READS = st.lists(st.tuples(st.integers(0, 64 * MiB), st.integers(1, 2 * MiB)), max_size=40)
#: quick to serve, seeks still counted: the counters are what the tests look at
QUICK = profile("dvd", rate=2e9, seek=0.001)


# --- the model, as plain functions -------------------------------------------------

@given(PROFILES, st.lists(st.integers(1, 4 * MiB), min_size=1, max_size=50))
def test_a_sequential_read_costs_bytes_over_rate(p, sizes) -> None:
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    s = sequence_cost(p, zip(offsets, sizes, strict=True))
    assert (s.reads, s.bytes, s.seeks, s.gap_bytes, s.hit_bytes) == (len(sizes), sum(sizes), 0, 0, 0)
    assert math.isclose(s.model_s, sum(sizes) / p.rate)


@given(PROFILES, READS)
def test_time_is_bytes_over_rate_plus_seeks(p, reads) -> None:
    s = sequence_cost(p, reads)
    assert s.bytes == sum(n for _, n in reads)
    assert 0 <= s.hit_bytes <= s.bytes
    assert math.isclose(s.model_s, s.medium_bytes / p.rate + s.seeks * p.seek, rel_tol=1e-9, abs_tol=1e-12)


@given(PROFILES, st.integers(2, 40), st.integers(0, 3))
def test_reversed_chunks_seek_once_each(p, chunks, first) -> None:
    chunk = MiB
    if (first + chunks - 1) * chunk <= p.gap:
        first += p.gap // chunk + 1  # the first read must be far enough away to need a seek
    reads = [((first + i) * chunk, chunk) for i in reversed(range(chunks))]
    s = sequence_cost(p, reads)
    assert s.seeks == chunks
    assert math.isclose(s.model_s, chunks * (p.seek + chunk / p.rate))


@given(PROFILES, st.lists(st.tuples(st.integers(1, 1 << 20), st.integers(1, MiB)), min_size=1, max_size=30))
def test_short_forward_gaps_are_read_through(p, pieces) -> None:
    reads, pos, gaps = [], 0, 0
    for gap, length in pieces:
        gap = min(gap, p.gap)
        reads.append((pos + gap, length))
        pos += gap + length
        gaps += gap
    s = sequence_cost(p, reads)
    assert s.seeks == 0 and s.gap_bytes == gaps
    assert math.isclose(s.model_s, (s.bytes + gaps) / p.rate)


def test_a_longer_gap_seeks() -> None:
    s = sequence_cost(DVD, [(0, MiB), (MiB + DVD.gap + 1, MiB)])
    assert (s.seeks, s.gap_bytes) == (1, 0)
    assert math.isclose(s.model_s, 2 * MiB / DVD.rate + DVD.seek)


def test_the_first_read_from_the_start_is_no_seek_elsewhere_is() -> None:
    assert not step(DVD, 0, 0, 4096).seek
    assert step(DVD, 0, 64 * MiB, 4096).seek


@given(PROFILES, st.integers(1, 32), st.integers(1, MiB))
def test_rereading_what_the_drive_holds_is_free(p, blocks, size) -> None:
    reads = [(i * size, size) for i in range(blocks)]
    last = ((blocks - 1) * size, size)
    s = sequence_cost(p, [*reads, last])
    if size <= p.buffer:
        assert s.hit_bytes == size and s.seeks == 0
        assert math.isclose(s.model_s, blocks * size / p.rate)
    else:
        assert s.seeks == 1


@given(PROFILES, READS, st.floats(0, 1000))
def test_a_drive_fed_back_to_back_takes_the_model_time(p, reads, t0) -> None:
    drive = Drive(p)
    now = t0
    for offset, length in reads:
        done = drive.request(offset, length, now)
        assert done >= now
        now = done
    expected = sequence_cost(p, reads)
    assert drive.stats.seeks == expected.seeks and drive.stats.bytes == expected.bytes
    assert math.isclose(now - t0, expected.model_s, rel_tol=1e-9, abs_tol=1e-9)


@given(st.lists(st.floats(0, 1), min_size=1, max_size=100))
def test_the_readers_own_pauses_cost_nothing_while_the_drive_reads_ahead(weights) -> None:
    """A sequential reader that pauses between requests (a buffer's worth of time in all)
    gets each chunk when it asks or when the drive, reading on, has it: whichever is later."""
    chunk = 128 << 10
    total = sum(weights) or 1.0
    pauses = [w / total * DVD.buffer / DVD.rate for w in weights]
    drive = Drive(DVD)
    now = 0.0
    for i, pause in enumerate(pauses):
        done = drive.request(i * chunk, chunk, now)
        assert math.isclose(done, max(now, (i + 1) * chunk / DVD.rate), rel_tol=1e-9, abs_tol=1e-12)
        now = done + pause
    assert drive.stats.seeks == 0


def test_a_reader_slower_than_the_drive_is_never_held_back() -> None:
    drive = Drive(DVD)
    now = drive.request(0, 4096, 0.0)
    for i in range(1, 50):
        now += 1.0  # far slower than the medium
        assert drive.request(i * 4096, 4096, now) == now


def test_the_fast_profile_costs_nothing() -> None:
    s = sequence_cost(FAST, [(10 * MiB, MiB), (0, MiB)])
    assert s.model_s == 0 and s.seeks == 2


COUNTS = st.integers(0, 2**50)
SECONDS = st.floats(0, 1e6)


@given(st.builds(Stats, COUNTS, COUNTS, COUNTS, COUNTS, COUNTS, SECONDS, SECONDS),
       st.integers(0, 2**32).map(lambda n: 2 * n))
def test_counters_pack_and_unpack(stats, seq) -> None:
    assert unpack_stats(pack_stats(stats, seq)) == (stats, seq)
    assert (stats + stats) - stats == stats


def test_profiles_can_be_changed_and_reject_nonsense() -> None:
    p = profile("dvd", rate=10e6, seek=0.2, gap=2 * MiB)
    assert (p.rate, p.seek, p.gap, p.buffer) == (10e6, 0.2, 2 * MiB, DVD.buffer)
    assert p.physical_limit(20_000_000) == 2.0
    with pytest.raises(ValueError):
        profile("usb2", rate=0)
    with pytest.raises(KeyError):
        profile("floppy")


# --- the served medium -------------------------------------------------------------

def _gone(slow: SlowMedium, workdir: Path) -> None:
    """Nothing of the medium is left: processes, mounts, loop devices, its folder."""
    for pid in slow.pids:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} left behind"
    for proc in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert str(workdir).encode() not in proc.read_bytes(), f"process {proc.parent.name} uses {workdir}"
        except OSError:
            pass  # ended meanwhile
    assert mounts_under(workdir) == []
    assert loops_of(slow.image) == []
    assert not workdir.exists()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "medium.bin"
    path.write_bytes(os.urandom(8 * MiB) + bytes(range(256)) * 7)  # not a multiple of any block size
    return path


def test_a_slowed_file_reads_the_same_bytes_in_one_pass(data: Path) -> None:
    with slow_medium(data, QUICK) as slow:
        workdir = slow.image.parent.parent
        assert slow.path.name == data.name and slow.path != data
        before = slow.stats()
        with open(slow.path, "rb") as f:
            got = b"".join(iter(lambda: f.read(MiB), b""))
        s = slow.stats() - before
    assert hashlib.sha256(got).digest() == hashlib.sha256(data.read_bytes()).digest()
    assert s.seeks <= 1
    assert s.bytes >= data.stat().st_size and s.gap_bytes == 0
    _gone(slow, workdir)


def test_a_reversed_read_seeks_once_per_chunk(data: Path) -> None:
    chunks = 8
    with slow_medium(data, QUICK) as slow:
        workdir = slow.image.parent.parent
        before = slow.stats()
        fd = os.open(slow.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead into the next chunk
            for i in reversed(range(chunks)):
                assert len(os.pread(fd, MiB, i * MiB)) == MiB
        finally:
            os.close(fd)
        s = slow.stats() - before
    assert s.seeks == chunks
    assert s.bytes >= chunks * MiB
    _gone(slow, workdir)


def test_dropping_the_caches_makes_the_next_read_cold(data: Path) -> None:
    with slow_medium(data, QUICK) as slow:
        workdir = slow.image.parent.parent
        with open(slow.path, "rb") as f:
            f.read()
        before = slow.stats()
        slow.drop_caches()
        with open(slow.path, "rb") as f:
            f.read()
        s = slow.stats() - before
    assert s.bytes >= data.stat().st_size
    _gone(slow, workdir)


def test_the_managers_feed_reads_a_slowed_statefile_once_sequentially(tmp_path: Path) -> None:
    raw = tmp_path / "state.raw"
    raw.write_bytes(os.urandom(2 * MiB) + bytes(6 * MiB))
    path = tmp_path / "state.zst"
    subprocess.run(["zstd", "-q", "--check", str(raw), "-o", str(path)], check=True)
    blob = path.read_bytes()
    sf = Statefile(path=path.name, size=len(blob), sha256=hashlib.sha256(blob).hexdigest(), compression="zstd",
                   raw_size=raw.stat().st_size, saved_with=MachineConfig("pc-i440fx-7.2", 256))
    with slow_medium(path, QUICK) as slow:
        workdir = slow.image.parent.parent
        before = slow.stats()
        r, w = os.pipe()
        out = bytearray()

        def drain_pipe() -> None:
            while block := os.read(r, 1 << 16):
                out.extend(block)

        drain = threading.Thread(target=drain_pipe)
        drain.start()
        feeder = Feeder(slow.path, sf, w)
        feeder.start()
        result = feeder.result(30)
        drain.join(30)
        os.close(r)
        s = slow.stats() - before
    assert result.problem is None and result.bytes_read == sf.size
    assert bytes(out) == raw.read_bytes()
    assert s.seeks <= 1 and sf.size <= s.bytes
    _gone(slow, workdir)


def test_a_slowed_folder_is_the_same_tree(tmp_path: Path) -> None:
    src = tmp_path / "medium"
    (src / "xenubuntu" / "flavours" / "a").mkdir(parents=True)
    big = os.urandom(3 * MiB + 17)
    (src / "xenubuntu" / "flavours" / "a" / "state.zst").write_bytes(big)
    (src / "xenubuntu" / "manifest.yaml").write_text("default: a\n")
    (src / "xenubuntu" / "link").symlink_to("manifest.yaml")
    with slow_medium(src, QUICK) as slow:
        workdir = slow.image.parent.parent
        assert slow.loop is not None and slow.path.is_dir()
        assert (slow / "xenubuntu" / "manifest.yaml").read_text() == "default: a\n"
        assert os.readlink(slow / "xenubuntu" / "link") == "manifest.yaml"
        slow.drop_caches()
        before = slow.stats()
        assert (slow / "xenubuntu" / "flavours" / "a" / "state.zst").read_bytes() == big
        s = slow.stats() - before
        assert s.seeks <= 2  # to the file's run (its inode may lie elsewhere): then straight on
        assert s.medium_bytes >= len(big)
    _gone(slow, workdir)


@pytest.mark.parametrize("form", ["file", "folder"])
def test_everything_is_cleaned_up_when_the_body_raises(tmp_path: Path, data: Path, form: str) -> None:
    src = data if form == "file" else data.parent
    with pytest.raises(RuntimeError, match="the body failed"):
        with slow_medium(src, QUICK) as slow:
            workdir = slow.image.parent.parent
            # a reader still holds the medium open when the body fails
            held = open(slow.path / data.name if form == "folder" else slow.path, "rb")  # noqa: SIM115
            held.read(4096)
            try:
                raise RuntimeError("the body failed")
            finally:
                held.close()
    _gone(slow, workdir)


def test_a_tool_that_cannot_start_is_reported_and_leaves_nothing(tmp_path: Path, data: Path, monkeypatch) -> None:
    import bench.mediumsim as mediumsim
    monkeypatch.setattr(mediumsim, "PLUGIN", tmp_path / "no-such-plugin.py")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(MediumSimError, match="starting nbdkit"):
        with slow_medium(data, QUICK, workdir=work):
            pass
    assert list(work.iterdir()) == []
