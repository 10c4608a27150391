"""Which files a disk image on the medium makes QEMU open.

A qcow2 image names its backing file, and may name an external data file, in its
own header; QEMU opens them with the manager's rights. An image on the medium
that names ``/etc/shadow`` (or a link that leads there) would put that file into
a guest. So, before QEMU opens a flavour's disk, every file of its chain is
found from the headers (no ``qemu-img`` on the restore path: a few small reads)
and must lie inside the medium.

Only the qcow2 header fields that name files are read: the backing file name
(header bytes 8-19) and the external data file extension (qcow2 v3).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from .errors import OutsideMedium, StatefileCorrupt

__all__ = ["QCOW2_MAGIC", "referenced_files", "check_chain"]

QCOW2_MAGIC = b"QFI\xfb"
_EXT_END = 0
_EXT_DATA_FILE = 0x44415441
#: a name longer than this is not one a mastered medium writes
_MAX_NAME = 1023
#: a chain longer than this is a loop or an attack
MAX_CHAIN = 16


def referenced_files(image: Path) -> list[str]:
    """The file names an image's header asks QEMU to open (backing file, external data
    file), as written: relative names are relative to the image's folder.

    :raises StatefileCorrupt: a qcow2 header that cannot be read as one.
    """
    with open(image, "rb") as f:
        head = f.read(104)
        if head[:4] != QCOW2_MAGIC:
            return []  # raw: no references
        if len(head) < 72:
            raise StatefileCorrupt(str(image), "a qcow2 header cut short")
        version, backing_offset, backing_size = struct.unpack(">IQI", head[4:20])
        names = []
        if backing_offset:
            if backing_size > _MAX_NAME:
                raise StatefileCorrupt(str(image), f"a backing file name of {backing_size} bytes")
            f.seek(backing_offset)
            names.append(_name(image, f.read(backing_size)))
        if version >= 3 and len(head) >= 104:
            header_length = struct.unpack(">I", head[100:104])[0]
            names += _extension_names(image, f, header_length)
        return names


def _extension_names(image: Path, f, offset: int) -> list[str]:  # type: ignore[no-untyped-def]
    names = []
    for _ in range(64):  # qcow2 has a handful of extension types
        f.seek(offset)
        raw = f.read(8)
        if len(raw) < 8:
            break
        kind, length = struct.unpack(">II", raw)
        if kind == _EXT_END:
            break
        if kind == _EXT_DATA_FILE:
            if length > _MAX_NAME:
                raise StatefileCorrupt(str(image), f"an external data file name of {length} bytes")
            names.append(_name(image, f.read(length)))
        offset += 8 + (length + 7) // 8 * 8
    return names


def _name(image: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StatefileCorrupt(str(image), "a file name in its header that is not UTF-8") from None


def check_chain(image: Path, medium_root: Path) -> list[Path]:
    """Follow an image's references; every file must lie inside ``medium_root``.

    :returns: the chain, ``image`` first.
    :raises OutsideMedium: a reference (or a link on its way) leads out of the medium;
        the message names the image, never where the reference leads.
    :raises StatefileCorrupt: a header that cannot be read, or a chain that loops.
    """
    root = os.path.realpath(medium_root)
    chain: list[Path] = []
    todo = [Path(os.path.realpath(image))]
    while todo:
        current = todo.pop()
        if os.path.commonpath([root, str(current)]) != root:
            raise OutsideMedium(f"a file that {chain[-1].name if chain else image.name} refers to")
        if current in chain or len(chain) >= MAX_CHAIN:
            raise StatefileCorrupt(str(image), "its backing files form a loop or a chain too long")
        chain.append(current)
        if not current.exists():
            continue  # QEMU will say it is missing; nothing to follow
        for name in referenced_files(current):
            if ":" in name.split("/", 1)[0] and not name.startswith(("/", ".")):
                raise OutsideMedium(f"a protocol reference ({name.split(':', 1)[0]}:) in {current.name}")
            todo.append(Path(os.path.realpath(current.parent / name)))
    return chain
