"""Build the bootable image of a mastered medium: the steps in order, then the ISO."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..manifest import MANIFEST_RELPATH, load_manifest
from . import dom0, iso, xenmaster
from .steps import Report, StepCache

#: the step cache; XENUBUNTU_IMAGE_CACHE moves it (as XENUBUNTU_CACHE moves the flavours)
DEFAULT_CACHE = Path(os.environ.get("XENUBUNTU_IMAGE_CACHE", "/var/cache/xenubuntu/image"))


@dataclass
class Result:
    iso: Path
    medium: Path | None = None  # the medium on the image (the mastered one, with Xen flavours)
    sizes: dict[str, int] = field(default_factory=dict)   # bytes per part of the image
    steps: dict[str, float] = field(default_factory=dict)  # seconds per step (0: cached)
    seconds: float = 0.0


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.stat().st_size


@dataclass(frozen=True)
class XenFlavours:
    """Xen flavours to master in the image's own dom0: a mastering spec and the guests' files."""

    spec: Path
    guests: Path


def build_image(medium: Path | None, debs: list[Path], out: Path, *, cache_dir: Path = DEFAULT_CACHE,
                opts: dom0.Options | None = None, extra: iso.Extra | None = None,
                report: Report = print, xen_flavours: XenFlavours | None = None) -> Result:
    """Build ``out`` (a hybrid ISO) from the medium at ``medium`` and the product's ``debs``.

    With ``xen_flavours`` (and no ``medium``) the medium is mastered first, in
    the image's own dom0 (:mod:`.xenmaster`), so its Xen statefiles are saved
    by the Xen the image carries.

    :raises ManifestError: the medium has no valid manifest.
    :raises BootMenuError: the medium's boot menu loads a file the image does not have.
    :raises StepError: a step failed (the message ends with its log).
    """
    if (medium is None) == (xen_flavours is None):
        raise ValueError("build_image: give a medium or Xen flavours to master, not both")
    t0 = time.monotonic()
    opts = opts or dom0.Options()
    extra = extra or iso.Extra()
    if medium is not None:
        load_manifest(medium / MANIFEST_RELPATH)  # refuse a medium the manager would refuse
    debs = [d.resolve() for d in debs]
    cache = StepCache(cache_dir, report=report)
    total = 4 if xen_flavours is None else 5
    report(f"[1/{total}] dom0 system layer (debootstrap, Debian's packages)")
    system = dom0.system(cache, debs, opts)
    report(f"[2/{total}] dom0 system squashfs")
    squash = dom0.squashfs(cache, system)
    report(f"[3/{total}] dom0 product layer ({', '.join(d.name for d in debs)})")
    product = dom0.product(cache, system, debs, opts)
    outputs = [system, squash, product]
    if xen_flavours is not None:
        report(f"[4/{total}] Xen flavours of {xen_flavours.spec.name}, mastered in the image's dom0")
        mastered = xenmaster.master(cache, system, squash, product, xen_flavours.spec, xen_flavours.guests)
        outputs.append(mastered)
        medium = mastered.path / "medium"
    assert medium is not None
    menu = (medium / iso.GRUB_CFG).read_text(encoding="utf-8")
    report(f"[{total}/{total}] ISO {out}")
    t_iso = time.monotonic()
    grafts = {
        iso.XEN: system.path / "xen.gz",
        iso.KERNEL: system.path / "vmlinuz",
        iso.INITRD: product.path / "initrd",
        iso.SYSTEM_SQUASHFS: squash.path / "filesystem.squashfs",
        iso.PRODUCT_SQUASHFS: product.path / "xenubuntu.squashfs",
        iso.MEDIUM_TREE: (medium / iso.MEDIUM_TREE.lstrip("/")).resolve(),
    }
    cfg = iso.boot_menu(menu, grafts, extra)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xsession-image-") as tmp:
        tree = Path(tmp) / "tree"
        (tree / "boot/grub").mkdir(parents=True)
        (tree / iso.GRUB_CFG).write_text(cfg, encoding="utf-8")
        partial = out.with_name(f".{out.name}.partial")
        p = subprocess.run(iso.mkrescue_argv(partial, tree, grafts), capture_output=True, text=True,
                           timeout=1800, env={**os.environ, "LC_ALL": "C.UTF-8"})
        if p.returncode != 0 or not partial.exists():
            partial.unlink(missing_ok=True)
            raise RuntimeError("grub-mkrescue failed:\n" + "\n".join((p.stdout + p.stderr).splitlines()[-20:]))
        os.replace(partial, out)
    sizes = {name.lstrip("/"): _size(src) for name, src in grafts.items()}
    sizes["iso"] = out.stat().st_size
    steps = {o.name: o.seconds for o in outputs}
    steps["iso"] = round(time.monotonic() - t_iso, 1)
    seconds = round(time.monotonic() - t0, 1)
    report(f"image written: {out} ({sizes['iso'] / 2**20:.0f} MiB) in {seconds:.0f} s")
    return Result(iso=out, medium=medium, sizes=sizes, steps=steps, seconds=seconds)


def tools_missing() -> list[str]:
    """The host commands the build needs and does not find."""
    need = ["debootstrap", "mksquashfs", "grub-mkrescue", "xorriso", "mformat", "unshare", "dpkg-deb"]
    missing = [c for c in need if shutil.which(c) is None]
    for platform in ("i386-pc", "x86_64-efi"):
        if not Path(f"/usr/lib/grub/{platform}").is_dir():
            missing.append(f"GRUB's {platform} images")
    return missing
