"""Statefile checks and the verified feed, on real zstd streams (no hypervisor needed)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from pathlib import Path

import pytest

from xsession.errors import MediumUnavailable, StatefileCorrupt
from xsession.hypervisor.lazyram import decode_ram_image, held_mib
from xsession.manifest import MachineConfig, StatePart, Statefile
from xsession.statefile import Feeder, batch_scheduling, precheck, zstd_checks_suffice

from .guestlib import damage

PAYLOAD = os.urandom(1 << 20) + bytes(3 << 20)  # random and compressible parts


def make_statefile(tmp_path: Path, compression: str = "zstd") -> tuple[Path, Statefile]:
    raw = tmp_path / "state.raw"
    raw.write_bytes(PAYLOAD)
    if compression == "zstd":
        path = tmp_path / "state.zst"
        subprocess.run(["zstd", "-q", "--check", "-f", str(raw), "-o", str(path)], check=True)
    else:
        path = raw
    data = path.read_bytes()
    sf = Statefile(path=path.name, size=len(data), sha256=hashlib.sha256(data).hexdigest(), compression=compression,
                   raw_size=len(PAYLOAD), saved_with=MachineConfig("pc-i440fx-7.2", 256))
    return path, sf


def feed(path: Path, sf: Statefile, **kw):
    """Run a feeder into a pipe whose other end a thread drains, like a hypervisor would."""
    r, w = os.pipe()
    out = bytearray()

    def drain():
        with os.fdopen(r, "rb") as f:
            while block := f.read(65536):
                out.extend(block)

    t = threading.Thread(target=drain)
    t.start()
    seen = []
    feeder = Feeder(path, sf, w, lambda d, total: seen.append((d, total)), **kw)
    feeder.start()
    result = feeder.result(30)
    t.join(30)
    return result, bytes(out), seen


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_a_good_statefile_is_fed_whole_and_verified(tmp_path, compression):
    path, sf = make_statefile(tmp_path, compression)
    precheck(path, sf, tmp_path)
    result, out, seen = feed(path, sf)
    assert result.problem is None and result.medium_error is None
    assert result.sha256 == sf.sha256 and result.bytes_read == sf.size
    assert out == PAYLOAD
    assert seen[-1] == (sf.size, sf.size) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_prechecks(tmp_path):
    path, sf = make_statefile(tmp_path)
    with pytest.raises(MediumUnavailable, match="not mounted"):
        precheck(path, sf, tmp_path / "gone")
    damage(path, truncate_to=sf.size - 1)
    with pytest.raises(StatefileCorrupt, match=f"truncated: {sf.size - 1} of {sf.size}"):
        precheck(path, sf)
    path.write_bytes(b"")
    with pytest.raises(StatefileCorrupt, match="empty"):
        precheck(path, sf)
    path.write_bytes(b"x" * (sf.size + 5))
    with pytest.raises(StatefileCorrupt, match="longer than recorded"):
        precheck(path, sf)
    path.write_bytes(b"x" * sf.size)
    with pytest.raises(StatefileCorrupt, match="zstd frame header"):
        precheck(path, sf)
    path.unlink()
    with pytest.raises(StatefileCorrupt, match="missing"):
        precheck(path, sf)


def test_flipped_bytes_are_reported_as_a_sha256_mismatch(tmp_path):
    path, sf = make_statefile(tmp_path, "none")
    damage(path, offset=4096, count=4)
    result, _, _ = feed(path, sf)
    assert result.problem is not None and "sha256 mismatch" in result.problem


def test_a_corrupt_zstd_frame_is_reported_even_when_the_sha256_agrees(tmp_path):
    path, sf = make_statefile(tmp_path)
    damage(path, offset=sf.size // 2, count=32)
    data = path.read_bytes()
    sf = Statefile(sf.path, sf.size, hashlib.sha256(data).hexdigest(), "zstd", sf.raw_size, sf.saved_with)
    result, _, _ = feed(path, sf)
    assert result.problem is not None and result.problem.startswith("zstd rejected the stream"), result.problem


def test_a_reader_that_goes_away_ends_the_feed_without_blaming_the_statefile(tmp_path):
    path, sf = make_statefile(tmp_path)
    r, w = os.pipe()
    os.close(r)  # the hypervisor died before reading anything
    feeder = Feeder(path, sf, w)
    feeder.start()
    result = feeder.result(30)
    assert result.reader_gone and result.problem is None
    assert result.sha256 == sf.sha256  # the whole file was still checked


def test_a_corrupt_zstd_frame_is_named_even_when_the_reader_refused_the_stream_first(tmp_path):
    """Garbage that zstd decodes before its checksum can reach the hypervisor, which then
    gives up (and zstd dies of the closed pipe): the verdict is still the stream's."""
    path, sf = make_statefile(tmp_path)
    damage(path, offset=sf.size // 2, count=32)
    sf = Statefile(sf.path, sf.size, hashlib.sha256(path.read_bytes()).hexdigest(), "zstd", sf.raw_size,
                   sf.saved_with)
    r, w = os.pipe()
    os.close(r)  # the reader refused what it got
    feeder = Feeder(path, sf, w)
    feeder.start()
    result = feeder.result(30)
    assert result.reader_gone
    assert result.problem is not None and result.problem.startswith("zstd rejected the stream"), result.problem


def _zstd(tmp_path: Path, name: str, *flags: str, stdin: bool = False) -> Path:
    raw = tmp_path / "state.raw"
    raw.write_bytes(PAYLOAD)
    out = tmp_path / name
    if stdin:  # a stream of unknown length: no content size in the header
        with open(raw, "rb") as f:
            out.write_bytes(subprocess.run(["zstd", "-q", *flags, "-c"], stdin=f, capture_output=True,
                                           check=True).stdout)
    else:
        subprocess.run(["zstd", "-q", *flags, "-f", str(raw), "-o", str(out)], check=True)
    return out


def test_zstd_checks_suffice_only_when_the_frame_promises_checksum_and_the_recorded_size(tmp_path):
    path, sf = make_statefile(tmp_path)
    assert zstd_checks_suffice(path, sf)
    mastered = _zstd(tmp_path, "mt.zst", "-T0", "-1", "--check")  # as Xen mastering writes it
    assert zstd_checks_suffice(mastered, sf)
    assert not zstd_checks_suffice(path, Statefile(sf.path, sf.size, sf.sha256, "zstd", sf.raw_size + 1,
                                                   sf.saved_with))
    assert not zstd_checks_suffice(_zstd(tmp_path, "nocheck.zst", "--no-check"), sf)
    assert not zstd_checks_suffice(_zstd(tmp_path, "stream.zst", "--check", stdin=True), sf)
    raw_path, raw_sf = make_statefile(tmp_path, "none")
    assert not zstd_checks_suffice(raw_path, raw_sf)
    damage(path, offset=0, count=1)
    assert not zstd_checks_suffice(path, sf)
    assert not zstd_checks_suffice(tmp_path / "missing.zst", sf)


def test_without_the_sha256_pass_zstd_still_rejects_every_damage(tmp_path):
    """Where zstd's checks suffice the feed skips the sha256, and damage is still caught."""
    path, sf = make_statefile(tmp_path)
    unknown = Statefile(sf.path, sf.size, "0" * 64, "zstd", sf.raw_size, sf.saved_with)
    result, out, _ = feed(path, unknown, verify_sha256=False)
    assert result.problem is None and out == PAYLOAD and result.bytes_read == sf.size and result.sha256 == ""
    good = path.read_bytes()
    # in the stored (incompressible) part only the content checksum can tell; the checksum itself; a block header
    for offset in (sf.size // 4, sf.size - 2, 12):
        path.write_bytes(good)
        damage(path, offset=offset, count=1)
        result, _, _ = feed(path, sf, verify_sha256=False)
        assert result.problem is not None and result.problem.startswith("zstd rejected the stream"), (offset, result)


def test_a_batch_feed_runs_its_decompressor_as_a_batch_task(tmp_path):
    """On one CPU a reader woken at every write would preempt zstd each time: the feed for
    such a reader runs zstd as a batch task."""
    path, sf = make_statefile(tmp_path)
    r, w = os.pipe()
    feeder = Feeder(path, sf, w, batch=True)
    feeder.start()
    try:
        while feeder._proc is None:  # the reader has read nothing yet: zstd waits on the pipe
            feeder.join(0.01)
        policy = os.sched_getscheduler(feeder._proc.pid)
    finally:
        with os.fdopen(r, "rb") as f:
            while f.read(1 << 16):
                pass
    assert feeder.result(30).problem is None
    assert policy == os.SCHED_BATCH


def test_batch_scheduling_of_a_process_that_is_gone_is_no_error():
    proc = subprocess.Popen(["true"])
    proc.wait()
    batch_scheduling(proc.pid)


def _ram_image(tmp_path: Path) -> tuple[Path, StatePart, bytes]:
    """A RAM image as mastering writes it: 8 MiB of mostly zero pages, zstd with checksums."""
    image = bytearray(8 << 20)
    for page in (0, 3, 700, 2047):
        image[page * 4096:page * 4096 + 5] = b"page%d" % (page % 10)
    raw = tmp_path / "ram.img"
    raw.write_bytes(image)
    path = tmp_path / "ram.zst"
    subprocess.run(["zstd", "-q", "--check", "-f", str(raw), "-o", str(path)], check=True)
    data = path.read_bytes()
    return path, StatePart(path.name, len(data), hashlib.sha256(data).hexdigest(), "zstd", len(image)), bytes(image)


def test_a_ram_image_decodes_sparse_and_whole(tmp_path: Path):
    path, part, image = _ram_image(tmp_path)
    dest = tmp_path / "decoded.img"
    decode_ram_image(path, part, dest)
    assert dest.read_bytes() == image
    assert held_mib(dest) <= 1, "zero pages take no memory"


@pytest.mark.parametrize("how", ["flipped", "truncated", "wrong size", "decodes to more"])
def test_a_damaged_ram_image_is_refused_and_named(tmp_path: Path, how: str):
    path, part, _ = _ram_image(tmp_path)
    data = bytearray(path.read_bytes())
    if how == "flipped":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        part = StatePart(part.path, part.size, hashlib.sha256(data).hexdigest(), "zstd", part.raw_size)
    elif how == "truncated":
        path.write_bytes(bytes(data[:-40]))
    else:  # the header records the true size: only the sha256 pass is left to doubt it
        part = StatePart(part.path, part.size, part.sha256, "zstd", part.raw_size + (4096 if how == "wrong size"
                                                                                     else -(1 << 20)))
    dest = tmp_path / "decoded.img"
    with pytest.raises(StatefileCorrupt) as e:
        decode_ram_image(path, part, dest)
    assert {"flipped": "zstd", "truncated": "truncated", "wrong size": "decoded to",
            "decodes to more": "more than the recorded"}[how] in str(e.value), str(e.value)
    if how == "decodes to more":  # it stopped there: a bomb fills no memory
        assert dest.stat().st_size <= part.raw_size
