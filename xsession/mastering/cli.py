"""``xsession-master``: build a medium from a mastering spec and built guests."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import XSessionError
from .master import load_spec, master_medium, resolve_accel


def _memory(text: str) -> tuple[str, int]:
    name, _, mib = text.partition("=")
    if not name or not mib.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=MiB, got {text!r}")
    return name, int(mib)


def _master_xen(spec, args: argparse.Namespace) -> None:
    """The same spec, saved with ``xl save`` as Xen domains (console on hvc0)."""
    import tempfile

    from ..hypervisor.xen import XenBackend
    from . import xen
    from .master import write_boot_menu

    cmdline = " ".join(w for w in spec.cmdline.split() if not w.startswith("console=")) + " console=hvc0"
    specs = [xen.XenFlavourSpec(name=f.name, title=f.title, priority=f.priority, kernel=args.guests / spec.kernel,
                                initrd=args.guests / f.initrd, cmdline=cmdline.strip(),
                                ready_line=f"XS-READY flavour={f.name}", machine_type=args.xen_type,
                                memory_mib=f.memory_mib, vcpus=f.vcpus, nic=f.nic or "none")
             for f in spec.flavours]
    with tempfile.TemporaryDirectory(prefix="xsm-xen-") as work:
        manifest = xen.master_medium(XenBackend(), specs, args.out / "xenubuntu", Path(work), default=spec.default,
                                      office=spec.office)
    write_boot_menu(manifest, args.out)
    print(f"medium written: {manifest.path} ({len(manifest.flavours)} Xen flavours, default {manifest.default})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xsession-master", description=__doc__)
    p.add_argument("spec", type=Path, help="mastering spec (YAML), e.g. demo/flavours.yaml")
    p.add_argument("--guests", type=Path, required=True, help="folder with the kernel and initrds the spec names")
    p.add_argument("--out", type=Path, required=True, help="the medium's root folder")
    p.add_argument("--accel", choices=("tcg", "kvm", "auto"), default="tcg",
                   help="accelerator the flavours are saved under (a restore must use the same); "
                        "auto: kvm where a probe boot shows it works, else tcg")
    p.add_argument("--backend", choices=("qemu", "xen"), default="qemu",
                   help="qemu: QEMU migration streams; xen: xl save images (run in a Xen dom0)")
    p.add_argument("--xen-type", choices=("pv", "pvh"), default="pvh", help="domain type of Xen flavours")
    p.add_argument("--jobs", type=int, default=2, help="flavours booted at once")
    p.add_argument("--settle", type=float, default=1.0, help="seconds a flavour idles at its desktop before saving")
    p.add_argument("--level", type=int, choices=range(1, 20), default=3, metavar="1-19",
                   help="zstd level of the statefiles (default 3; 19: about a fifth smaller for a DVD, "
                        "mastering takes minutes more per flavour)")
    p.add_argument("--pool-debs", type=Path, metavar="DIR",
                   help="the builds' package cache: put the flavours' packages into the medium's signed "
                        "package pool (xenubuntu/pool/) and point their apt at it")
    p.add_argument("--lazy-qemu", metavar="QEMU",
                   help="a QEMU of 8.2 or later (qemu-system-x86_64): also split each statefile into a RAM "
                        "image and the devices' state, for lazy restores")
    p.add_argument("--memory", type=_memory, action="append", default=[], metavar="NAME=MiB",
                   help="override a flavour's memory")
    args = p.parse_args(argv)
    try:
        spec = load_spec(args.spec, dict(args.memory))
        if args.backend == "xen":
            _master_xen(spec, args)
            return 0
        accel = resolve_accel(args.accel, spec, args.guests)
        master_medium(spec, args.guests, args.out, accel=accel, jobs=args.jobs, settle_s=args.settle,
                      report=lambda line: print(line, flush=True), level=args.level, pool_debs=args.pool_debs,
                      lazy_qemu=args.lazy_qemu)
    except XSessionError as e:
        print(f"xsession-master: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
