"""A lazy restore's RAM: the guest's memory mapped copy-on-write from a decoded image.

An eager restore loads every page of the guest's RAM before the guest runs. With
the RAM as a file, QEMU (8.2 or later) maps it private and read-only
(``memory-backend-file,readonly=on,rom=off,share=off``) and loads only the
devices' state (the ``x-ignore-shared`` capability): the guest runs at once, a
page it reads comes from the file, and a page it writes becomes its own copy.

The medium keeps the image compressed (zstd, with its frame checksum), so it is
checked while it is decoded into memory: like a statefile, a damaged image is
never restored. QEMU 7.2 maps such a file, but a guest on it does not run: the
``rom`` property, new in 8.2, tells a QEMU that can.

At mastering, the guest's RAM is a shared file (``share=on``): loading the
statefile into it writes the image.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import MediumUnavailable, StatefileCorrupt
from ..manifest import StatePart
from ..statefile import Feeder, precheck, zstd_checks_suffice

__all__ = ["RAM_ID", "RamFile", "maps_private_readonly", "decode_ram_image", "held_mib"]

#: the name QEMU gives a PC's RAM; the file's backend takes it, so that the stream's
#: RAM block is the same one whether it was saved with a file or without
RAM_ID = "pc.ram"
#: decoding runs on the host's CPU at several hundred MB/s; this bounds a stuck one
DECODE_BASE_TIMEOUT_S = 30.0
DECODE_BYTES_PER_S = 2_000_000


@dataclass(frozen=True)
class RamFile:
    """The guest's RAM as a file: written through (mastering) or mapped copy-on-write (restore)."""

    path: Path
    size_mib: int
    writable: bool

    def argv(self) -> list[str]:
        mapping = "share=on" if self.writable else "readonly=on,rom=off,share=off"
        path = str(self.path).replace(",", ",,")
        return ["-object", f"memory-backend-file,id={RAM_ID},size={self.size_mib}M,mem-path={path},{mapping}"]


@functools.lru_cache(maxsize=8)
def maps_private_readonly(binary: str) -> bool:
    """Whether this QEMU runs a guest on a read-only file mapped copy-on-write (8.2 or later).

    Asked of the binary itself (its file backend's ``rom`` property), once per binary.
    """
    try:
        out = subprocess.run([binary, "-object", "memory-backend-file,help"], capture_output=True, text=True,
                             timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(line.strip().startswith("rom=") for line in out.stdout.splitlines())


def decode_ram_image(source: Path, part: StatePart, dest: Path, medium_root: Path | None = None,
                     progress: Callable[[int, int], None] | None = None) -> None:
    """Decode a RAM image into ``dest`` (sparse: its zero pages take no memory), checked.

    :raises StatefileCorrupt: size, zstd, sha256 or the decoded length is wrong.
    :raises MediumUnavailable: the image could not be read.
    """
    precheck(source, part, medium_root)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    feeder = Feeder(source, part, fd, progress, verify_sha256=not zstd_checks_suffice(source, part),
                    file_size=part.raw_size)
    feeder.start()  # closes fd
    try:
        result = feeder.result(DECODE_BASE_TIMEOUT_S + part.size / DECODE_BYTES_PER_S)
    except TimeoutError as e:
        raise MediumUnavailable(str(source), str(e)) from None
    if result.medium_error is not None:
        raise MediumUnavailable(str(source), f"reading the RAM image failed: {result.medium_error}")
    if result.problem is not None:
        raise StatefileCorrupt(str(source), result.problem)
    decoded = dest.stat().st_size
    if decoded != part.raw_size:
        raise StatefileCorrupt(str(source), f"decoded to {decoded} bytes, expected {part.raw_size}")


def held_mib(path: Path) -> int:
    """The memory a decoded (sparse) image holds, in MiB rounded up."""
    return -(-os.stat(path).st_blocks * 512 // (1 << 20))
