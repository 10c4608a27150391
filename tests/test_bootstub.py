"""A restored guest's kernel and initrd: stubs, not the files on the medium.

The restores are real (the demo medium's guests under QEMU); the medium is
served through the drive model to count what a restore reads.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from bench.mediumsim import slow_medium
from bench.mediumsim.model import profile
from xsession.hypervisor.bootstub import boot_files_for_restore, stub_length, write_stub
from xsession.hypervisor.qemu import QemuBackend
from xsession.manifest import MANIFEST_RELPATH, load_manifest

from .guestlib import ask


def _bzimage(setup_sects: int, size: int) -> bytes:
    data = bytearray(size)
    data[0x1F1] = setup_sects
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    return bytes(data)


@given(st.binary(max_size=9000))
def test_any_header_gives_a_length_or_none(header: bytes) -> None:
    n = stub_length(header)
    assert n is None or 512 + 4096 <= n <= 256 * 512 + 4096


def test_a_stub_is_the_setup_code_and_a_little_more(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(_bzimage(30, 200_000))
    stub = write_stub(kernel, tmp_path / "kernel.stub")
    assert stub is not None and stub.read_bytes() == kernel.read_bytes()[:31 * 512 + 4096]


def test_what_is_no_bzimage_or_too_short_is_given_whole(tmp_path: Path) -> None:
    elf = tmp_path / "elf"
    elf.write_bytes(b"\x7fELF" + bytes(100_000))
    short = tmp_path / "short"
    short.write_bytes(_bzimage(4, 3000))
    argv = ["qemu", "-kernel", str(elf), "-initrd", "/x/initrd"]
    assert boot_files_for_restore(argv, tmp_path) == argv
    assert write_stub(short, tmp_path / "s") is None
    assert boot_files_for_restore(["qemu", "-m", "64"], tmp_path) == ["qemu", "-m", "64"]


def test_a_restored_guest_runs_on_the_stubs_and_answers(manifest, tmp_path: Path) -> None:
    flavour = manifest.flavour("kubuntu")
    guest = QemuBackend().restore(flavour, manifest, tmp_path / "run", lambda d, t: None)
    try:
        cmdline = Path(f"/proc/{guest.pid}/cmdline").read_bytes().split(b"\0")
        assert str(tmp_path / "run" / "kernel.stub").encode() in cmdline
        assert str(tmp_path / "run" / "initrd.stub").encode() in cmdline
        assert "PONG" in ask(guest.console["serial"], "PING stub")
    finally:
        guest.stop()


def test_a_restore_reads_neither_kernel_nor_initrd_from_the_medium(demo_medium: Path) -> None:
    """Counted by the drive: beyond the statefile, a restore without the stubs reads at
    least the kernel; with them, less than half of that extra (what is left is the
    disks' headers, the medium's metadata and the drive's read-ahead around the
    kernel's header). The guest runs either way."""
    manifest = load_manifest(demo_medium / MANIFEST_RELPATH)
    flavour = manifest.flavour("kubuntu")
    assert flavour.cold_boot.kernel is not None and flavour.cold_boot.initrd is not None
    kernel_bytes = manifest.resolve(flavour.cold_boot.kernel).stat().st_size
    assert flavour.statefile is not None
    state_bytes = flavour.statefile.size
    read: dict[bool, int] = {}
    quick = profile("dvd", rate=2e9, seek=0.001)
    with slow_medium(demo_medium, quick) as slow:
        served = load_manifest(slow.path / MANIFEST_RELPATH)
        for stub in (False, True):
            slow.drop_caches()
            before = slow.stats()
            rundir = Path(tempfile.mkdtemp(prefix="xs-stub-"))
            try:
                guest = QemuBackend(boot_stub=stub).restore(served.flavour("kubuntu"), served, rundir,
                                                              lambda d, t: None)
                try:
                    assert "PONG" in ask(guest.console["serial"], "PING")
                finally:
                    guest.stop()
            finally:
                shutil.rmtree(rundir, ignore_errors=True)
            read[stub] = (slow.stats() - before).bytes
    extra = {stub: n - state_bytes for stub, n in read.items()}
    assert extra[False] >= kernel_bytes, (extra, kernel_bytes)
    assert 0 <= extra[True] < extra[False] / 2, extra


def test_from_a_seek_bound_medium_the_statefile_is_one_sequential_read(demo_medium: Path) -> None:
    """Traced by the drive: while the feed reads the statefile (from its first to its last
    block, as the feed's progress tells), the head never leaves it. QEMU's reads of its
    disks and kernel come before the feed, not between its blocks."""
    marks: list[float] = []

    def progress(done: int, total: int) -> None:
        marks.append(time.monotonic())

    quick = profile("dvd", rate=2e9, seek=0.001)
    with slow_medium(demo_medium, quick, trace=True) as slow:
        served = load_manifest(slow.path / MANIFEST_RELPATH)
        slow.drop_caches()
        rundir = Path(tempfile.mkdtemp(prefix="xs-seq-"))
        try:
            guest = QemuBackend().restore(served.flavour("kubuntu"), served, rundir, progress)
            guest.stop()
        finally:
            shutil.rmtree(rundir, ignore_errors=True)
        trace = [line.split() for line in (slow.image.parent.parent / "trace.log").read_text().splitlines()]
    assert len(marks) >= 10, marks
    # the drive answers a read before the reader sees it: the first block's request is just before
    # the first progress call; every request after it up to the last call belongs to the statefile
    during = [t for t in trace if marks[0] < float(t[5]) <= marks[-1]]
    assert during, "no drive request while the statefile was read"
    # at most one: the file system may read its block index for the statefile again once under
    # memory pressure (seen once in a long run); QEMU's kernel, initrd and disk reads between
    # the statefile's blocks, as before, were dozens
    assert sum(int(t[2]) for t in during) <= 1, [t for t in during if int(t[2])]
