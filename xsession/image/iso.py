"""The hybrid ISO: GRUB (BIOS and EFI, CD and USB stick), Xen, the dom0 live system, the medium.

``grub-mkrescue`` (GRUB's i386-pc and x86_64-efi images, xorriso, mtools)
writes an ISO 9660 image that boots from a CD (El Torito, BIOS and EFI) and,
written as it is to a USB stick, from a disk (MBR and GPT). The large files
are not copied: they are grafted into the image from where the cached steps
left them.

The boot menu is the medium's own ``boot/grub/grub.cfg`` (written at
mastering); every file its entries load must be on the image, or the build
fails. The image may add words to the entries' command lines (a serial
console, settings for a machine), never remove any.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: where the parts go on the image (the paths the medium's boot menu names)
XEN = "/boot/xen.gz"
KERNEL = "/casper/vmlinuz"
INITRD = "/casper/initrd"
SYSTEM_SQUASHFS = "/casper/filesystem.squashfs"
PRODUCT_SQUASHFS = "/casper/xenubuntu.squashfs"
MEDIUM_TREE = "/xenubuntu"
GRUB_CFG = "boot/grub/grub.cfg"
VOLUME_ID = "XENUBUNTU"

#: settings for a machine whose only console is the serial port (and QEMU without KVM):
#: Xen on com1, dom0 on Xen's console hvc0, the plain kernel on ttyS0; no page zeroing
#: on allocation (emulated very slowly)
SERIAL_XEN = "console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all noreboot"
SERIAL_DOM0 = "console=hvc0 earlyprintk=xen"
SERIAL_PLAIN = "console=ttyS0,115200n8"
TCG_KERNEL = "init_on_alloc=0"
#: Xen under QEMU's TCG must switch FPU state eagerly. Lazily (Xen's default on
#: AMD, which TCG's CPU models are), Xen leaves CR0.TS set for a vCPU whose
#: registers another vCPU last used and loads them on the #NM trap; TCG raises
#: no #NM for XSAVE/XRSTOR, so dom0's kernel saves the other vCPU's registers
#: as a process's and hands them back to it: corrupted memory in any process
#: of dom0 (glibc's string functions) whenever domains run beside it.
TCG_XEN = "spec-ctrl=eager-fpu"

SERIAL_PRELUDE = """\
# the boot menu on the first serial port as well as on the screen
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
"""


class BootMenuError(Exception):
    """The medium's boot menu does not fit the image (a file it loads is not on it)."""


@dataclass(frozen=True)
class Extra:
    """Words added to the boot menu's command lines."""

    xen: str = ""    # Xen's own (multiboot2)
    dom0: str = ""   # dom0's kernel under Xen (the first module2)
    plain: str = ""  # the kernel booted without Xen (linux)
    serial: bool = False  # the menu on the serial port too


def _words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=False)
    except ValueError as e:
        raise BootMenuError(f"cannot read the boot menu line {line.strip()!r}: {e}") from None


def boot_menu(text: str, on_image: Mapping[str, object], extra: Extra | None = None) -> str:
    """The image's grub.cfg: the medium's menu, its files checked, the extra words added.

    :raises BootMenuError: an entry loads a file that is not in ``on_image``,
        or the menu has no entry at all.
    """
    extra = extra or Extra()
    out = [SERIAL_PRELUDE] if extra.serial else []
    entries = 0
    in_xen_entry = False
    for n, line in enumerate(text.splitlines(), 1):
        words = _words(line) if line.strip() and not line.strip().startswith("#") else []
        cmd = words[0] if words else ""
        if cmd == "menuentry":
            entries += 1
            in_xen_entry = False
        add = ""
        if cmd in ("multiboot2", "module2", "linux", "initrd"):
            args = [w for w in words[1:] if not w.startswith("--")]
            if not args:
                raise BootMenuError(f"grub.cfg line {n}: {cmd} without a file")
            if args[0] not in on_image:
                raise BootMenuError(f"grub.cfg line {n}: {cmd} loads {args[0]}, which is not on the image "
                                    f"(it has {', '.join(sorted(on_image))})")
            if cmd == "multiboot2":
                add, in_xen_entry = extra.xen, True
            elif cmd == "module2" and in_xen_entry and "--nounzip" not in words:
                add = extra.dom0
            elif cmd == "linux":
                add = extra.plain
        out.append(line + (" " + add if add.strip() else ""))
    if entries == 0:
        raise BootMenuError("the medium's grub.cfg has no menu entry")
    return "\n".join(out).rstrip("\n") + "\n"


def mkrescue_argv(iso: Path, tree: Path, grafts: Mapping[str, Path]) -> list[str]:
    """``grub-mkrescue`` writing ``iso`` from ``tree`` plus files grafted at their image paths."""
    argv = ["grub-mkrescue", "-o", str(iso), str(tree)]
    for dest, src in sorted(grafts.items()):
        argv.append(f"{dest}={src}")
    return argv + ["--", "-volid", VOLUME_ID]
