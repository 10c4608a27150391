"""The desktop medium's size with and without its sharing: the package pool and the disk
flavours' common system.

Sizes are the files' own (apparent) sizes, as a DVD image would hold them; a file
hard-linked twice on the medium counts twice, as it would on a disc. "Each
flavour its own packages" is what the flavours' packages would take if every
flavour carried its own copy of each package it has installed (the pool stores
each name, version and architecture once). "Each disk flavour a whole image" is
what ``qemu-img measure`` says a flavour's disk would take as one qcow2 image
without the common system it stands on (``xenubuntu/shared/``).

    .venv/bin/python bench/pool_sizes.py [--record]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.benchlib import machine, record  # noqa: E402


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _whole_image_bytes(image: Path) -> int:
    """What the image's chain would take as one qcow2 image (its data, no backing file)."""
    out = subprocess.run(["qemu-img", "measure", "--output=json", "-O", "qcow2", str(image)], check=True,
                         capture_output=True, text=True).stdout
    return int(json.loads(out)["required"])


def disk_sharing(root: Path) -> tuple[int, int, list[str]]:
    """(bytes of the disk layers and the shared images, bytes as whole images, names)."""
    shared = root / "shared"
    layered = whole = 0
    names = []
    for base in sorted(root.glob("flavours/*/disk-base.qcow2")):
        layered += base.stat().st_size
        whole += _whole_image_bytes(base)
        names.append(base.parent.name)
    if shared.is_dir():
        layered += _bytes(shared)
    return layered, whole, names


def table(medium: Path) -> str:
    root = medium / "xenubuntu"
    pool = root / "pool"
    report = json.loads((pool / "report.json").read_text())
    total = _bytes(medium)
    apt_part = _bytes(pool / "main") + _bytes(pool / "dists") + (pool / "xenubuntu-pool.gpg").stat().st_size
    without = total - apt_part
    per = ", ".join(f"{n} {c} packages / {report['per_flavour_bytes'][n] / 1e6:.0f} MB"
                    for n, c in report["per_flavour_packages"].items())
    mb = 1e6
    layered, whole, disks = disk_sharing(root)
    neither = without + report["bytes_without_sharing"] - layered + whole
    return "\n".join([
        machine(),
        "Command: `.venv/bin/python bench/pool_sizes.py --record` on the mastered desktop medium.",
        "",
        "| what | MB |",
        "|---|---|",
        f"| medium without a package pool | {without / mb:.0f} |",
        f"| the pool (index, signature, {report['packages']} packages stored once) | {apt_part / mb:.0f} |",
        f"| **medium with the shared pool** | **{total / mb:.0f}** |",
        f"| packages if each flavour carried its own ({per}) | {report['bytes_without_sharing'] / mb:.0f} |",
        f"| medium with each flavour's own packages instead | {(without + report['bytes_without_sharing']) / mb:.0f} |",
        f"| saved by sharing | {(report['bytes_without_sharing'] - report['bytes']) / mb:.0f} |",
        f"| disk images: layers of {', '.join(disks)} and their common system once | {layered / mb:.0f} |",
        f"| disk images: each disk flavour a whole image | {whole / mb:.0f} |",
        f"| saved by the common system | {(whole - layered) / mb:.0f} |",
        f"| **medium with neither sharing** | **{neither / mb:.0f}** |",
    ])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--medium", type=Path, help="a mastered medium (default: the desktop medium, built if needed)")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args()
    if args.medium is None:
        from xsession.demomedia import ensure_desktop_medium
        args.medium = ensure_desktop_medium()
    text = table(args.medium)
    print(text)
    if args.record:
        record("The medium's sharing: package pool and common system", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
