"""``xsession-image``: the bootable hybrid ISO of a mastered medium (or of Xen flavours mastered in its dom0)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ..errors import XSessionError
from . import dom0, iso
from .build import DEFAULT_CACHE, XenFlavours, build_image, tools_missing
from .iso import SERIAL_DOM0, SERIAL_PLAIN, SERIAL_XEN, TCG_KERNEL, TCG_XEN, BootMenuError
from .steps import StepError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xsession-image", description=__doc__)
    p.add_argument("medium", type=Path, nargs="?",
                   help="the mastered medium's root (holds xenubuntu/ and boot/grub/grub.cfg)")
    p.add_argument("--xen-spec", type=Path, metavar="SPEC",
                   help="instead of a medium: master this spec's flavours as Xen domains in the image's own "
                        "dom0 (booted in QEMU), so their statefiles are saved by the Xen the image carries")
    p.add_argument("--guests", type=Path, help="with --xen-spec: the folder of the files the spec names")
    p.add_argument("-o", "--out", type=Path, required=True, help="the ISO to write")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--deb", type=Path, action="append", default=[],
                     help="a .deb of the product to install in dom0 (repeat for several)")
    src.add_argument("--source", type=Path, help="build the product's .deb from this source tree first")
    p.add_argument("--python-module", type=Path, action="append", default=[], metavar="FOLDER",
                   help="a pure-Python package Debian does not have, copied into dom0 (e.g. the folder "
                        "qemu of qemu.qmp, which the QEMU backend needs)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"the step cache (default {DEFAULT_CACHE})")
    p.add_argument("--mirror", default=dom0.MIRROR, help="Debian archive")
    p.add_argument("--security-mirror", default=dom0.SECURITY_MIRROR, help="Debian security archive")
    p.add_argument("--serial", action="store_true",
                   help="menu, Xen and kernels on the first serial port (a machine without a screen)")
    p.add_argument("--tcg", action="store_true",
                   help="settings for QEMU without KVM (init_on_alloc=0; Xen switches FPU state eagerly)")
    p.add_argument("--root-shell", action="store_true",
                   help="a root shell without password on the serial consoles (testing only)")
    p.add_argument("--xen-args", default="", help="words added to Xen's command line")
    p.add_argument("--dom0-args", default="", help="words added to dom0's kernel command line (Xen entries)")
    p.add_argument("--plain-args", default="", help="words added to the kernel command line of the entries without Xen")
    args = p.parse_args(argv)
    if (args.medium is None) == (args.xen_spec is None) or (args.xen_spec is not None) != (args.guests is not None):
        p.error("give a MEDIUM, or --xen-spec with --guests")

    if os.geteuid() != 0:
        print("xsession-image: must run as root (debootstrap, chroot, mounts)", file=sys.stderr)
        return 2
    missing = tools_missing()
    if missing:
        print(f"xsession-image: missing {', '.join(missing)} (Debian: debootstrap squashfs-tools xorriso "
              "mtools grub-pc-bin grub-efi-amd64-bin)", file=sys.stderr)
        return 2
    kernel_tcg = TCG_KERNEL if args.tcg else ""
    extra = iso.Extra(
        xen=" ".join(filter(None, [SERIAL_XEN if args.serial else "", TCG_XEN if args.tcg else "", args.xen_args])),
        dom0=" ".join(filter(None, [SERIAL_DOM0 if args.serial else "", kernel_tcg, args.dom0_args])),
        plain=" ".join(filter(None, [SERIAL_PLAIN if args.serial else "", kernel_tcg, args.plain_args])),
        serial=args.serial)
    opts = dom0.Options(mirror=args.mirror, security_mirror=args.security_mirror, root_shell=args.root_shell,
                         python_modules=tuple(args.python_module))
    try:
        with tempfile.TemporaryDirectory(prefix="xsession-image-debs-") as tmp:
            debs = args.deb
            if args.source is not None:
                from .debs import build_debs
                print(f"building the product's .deb from {args.source} ...", flush=True)
                debs = build_debs(args.source.resolve(), Path(tmp))
            xen = XenFlavours(args.xen_spec.resolve(), args.guests.resolve()) if args.xen_spec else None
            build_image(args.medium, debs, args.out, cache_dir=args.cache, opts=opts, extra=extra,
                        report=lambda line: print(line, flush=True), xen_flavours=xen)
    except (XSessionError, BootMenuError, StepError, RuntimeError, OSError) as e:
        print(f"xsession-image: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
