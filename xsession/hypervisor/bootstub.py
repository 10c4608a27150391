"""The kernel and initrd of a restored guest: never run, so not read from the medium.

A flavour that boots with ``-kernel``/``-initrd`` gets the same options when it
is restored, because the machine must be the one that was saved. QEMU reads
both files whole at start-up (into fw_cfg, for the firmware's Linux loader),
although a restored guest is past its boot and never asks for them again: it
runs ``-no-reboot``, so a reboot ends the QEMU and the manager starts afresh.
From a DVD those reads cost their bytes (8 MB of kernel and 6 MB of initrd for
the Xfce flavour: 0.7 s at 20 MB/s) and, worse, send the head back and forth
between them and the statefile.

A restore therefore gives QEMU a *stub*: the kernel's real setup header (QEMU
checks the boot protocol and the setup size from it), cut after its setup
code, and an empty initrd. The guest's RAM, ROMs and devices come from the
stream as before; fw_cfg's copy of the kernel is not part of it.

:func:`stub_length` is the pure part.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["stub_length", "write_stub", "boot_files_for_restore", "HEADER_LEN"]

#: what QEMU reads to learn the boot protocol (x86_load_linux reads the first 8 KiB)
HEADER_LEN = 8192
#: a little of the protected-mode kernel after the setup code, so that no size check sees an empty kernel
TAIL_LEN = 4096


def stub_length(header: bytes) -> int | None:
    """How many leading bytes of a bzImage make a stub QEMU accepts; None if ``header``
    (the file's first bytes) is not a Linux boot-protocol kernel, which then is read whole.

    >>> h = bytearray(8192); h[0x1f1] = 3; h[0x1fe:0x200] = b"\\x55\\xaa"; h[0x202:0x206] = b"HdrS"
    >>> stub_length(bytes(h))
    6144
    >>> stub_length(b"\\x7fELF") is None
    True
    """
    if len(header) < 0x206 or header[0x1FE:0x200] != b"\x55\xaa" or header[0x202:0x206] != b"HdrS":
        return None
    setup_sects = header[0x1F1] or 4  # 0 means 4, as in the boot protocol
    return (setup_sects + 1) * 512 + TAIL_LEN


def write_stub(kernel: Path, out: Path) -> Path | None:
    """Write the stub of ``kernel`` to ``out``; None when the kernel is no bzImage or is
    too short to cut (then QEMU is given the kernel itself).

    :raises OSError: the kernel cannot be read or the stub not written.
    """
    with open(kernel, "rb") as f:
        header = f.read(HEADER_LEN)
        n = stub_length(header)
        size = os.fstat(f.fileno()).st_size
        if n is None or n >= size:
            return None
        data = header[:n] if n <= len(header) else header + f.read(n - len(header))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out


def boot_files_for_restore(argv: list[str], rundir: Path) -> list[str]:
    """``argv`` with ``-kernel`` and ``-initrd`` pointing at stubs in ``rundir``.

    A kernel that cannot be cut (not a bzImage) is left as it is, and so is its
    initrd: QEMU is then given what was saved with, exactly.

    :raises OSError: the kernel cannot be read or the stubs not written.
    """
    out = list(argv)
    try:
        k = out.index("-kernel")
    except ValueError:
        return out
    stub = write_stub(Path(out[k + 1]), rundir / "kernel.stub")
    if stub is None:
        return out
    out[k + 1] = str(stub)
    if "-initrd" in out:
        i = out.index("-initrd")
        empty = rundir / "initrd.stub"
        empty.write_bytes(b"")
        out[i + 1] = str(empty)
    return out
