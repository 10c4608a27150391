"""The medium's boot menu: ``boot/grub/grub.cfg`` rendered from its manifest.

For every flavour as the default session the menu offers a Xen entry (the
hypervisor loaded with ``multiboot2``, dom0's kernel and initrd as
``module2`` modules) and a plain KVM entry (``linux``/``initrd``); then the
manifest's default flavour once more with ``xenubuntu.restore=off`` and with
``xenubuntu.restore=eager``, for Xen and for KVM. The menu starts the
manifest's default flavour under Xen.

Xen's ``multiboot2`` and ``module2`` lines carry a first word ``placeholder``,
as GRUB's own Xen entries (``20_linux_xen``) do: Xen drops the first word of
each command line, taking it for the image's name.

:func:`render_grub_cfg` is pure: the mastering step writes its result.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..manifest import Flavour, Manifest

__all__ = ["render_grub_cfg", "grub_quote", "entry_id"]

_BARE = re.compile(r"[A-Za-z0-9_./,:=+@%-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
BOOT_OPTIONS = "boot=casper quiet splash"


def grub_quote(text: str) -> str:
    """One GRUB word that reads back as ``text``: bare when safe, else single-quoted.

    GRUB's single quotes keep everything literal (``$``, ``\\``, ``;``) but cannot
    hold a single quote, which is closed, escaped and reopened as in sh.
    Control characters (a newline would end the command) become spaces.
    """
    text = _CONTROL.sub(" ", text)
    if _BARE.fullmatch(text):
        return text
    return "'" + text.replace("'", "'\\''") + "'"


def entry_id(hypervisor: str, flavour: str, restore: str | None = None) -> str:
    """The ``--id`` of an entry: stable names to choose one with ``grub-reboot``."""
    return "-".join(p for p in ("xenubuntu", hypervisor, flavour, restore and f"restore-{restore}") if p)


@dataclass(frozen=True)
class _Paths:
    kernel: str
    initrd: str
    xen: str
    dom0_mem: str


def _options(flavour: str, restore: str | None) -> str:
    opts = f"{BOOT_OPTIONS} xenubuntu.flavour={flavour}"
    return opts + (f" xenubuntu.restore={restore}" if restore else "")


def _xen_entry(title: str, flavour: str, restore: str | None, p: _Paths) -> list[str]:
    return [
        f"menuentry {grub_quote(title + ' (Xen)')} --id {entry_id('xen', flavour, restore)} {{",
        f"\tmultiboot2 {grub_quote(p.xen)} placeholder {grub_quote('dom0_mem=' + p.dom0_mem)}",
        f"\tmodule2 {grub_quote(p.kernel)} placeholder {_options(flavour, restore)}",
        f"\tmodule2 --nounzip {grub_quote(p.initrd)}",
        "}",
    ]


def _kvm_entry(title: str, flavour: str, restore: str | None, p: _Paths) -> list[str]:
    return [
        f"menuentry {grub_quote(title + ' (KVM)')} --id {entry_id('kvm', flavour, restore)} {{",
        f"\tlinux {grub_quote(p.kernel)} {_options(flavour, restore)}",
        f"\tinitrd {grub_quote(p.initrd)}",
        "}",
    ]


def _menu_order(manifest: Manifest) -> list[Flavour]:
    """The default first, then by priority (lower first, as restores go), then by name."""
    rest = sorted((f for f in manifest.flavours if f.name != manifest.default), key=lambda f: (f.priority, f.name))
    return [manifest.flavour(manifest.default), *rest]


def _lines(manifest: Manifest, p: _Paths) -> Iterable[str]:
    default = manifest.flavour(manifest.default)
    yield "# XenUbuntu boot menu, written at mastering from xenubuntu/manifest.yaml."
    yield f"set default={entry_id('xen', default.name)}"
    yield "set timeout=10"
    yield ""
    for f in _menu_order(manifest):
        yield from _xen_entry(f.title, f.name, None, p)
        yield from _kvm_entry(f.title, f.name, None, p)
        yield ""
    restores = (
        ("off", f"{default.title}, restoring nothing until asked"),
        ("eager", f"{default.title}, restoring every flavour that fits at once"),
    )
    for restore, title in restores:
        yield from _xen_entry(title, default.name, restore, p)
        yield from _kvm_entry(title, default.name, restore, p)
        yield ""


def render_grub_cfg(manifest: Manifest, *, kernel: str = "/casper/vmlinuz", initrd: str = "/casper/initrd",
                    xen: str = "/boot/xen.gz", dom0_mem: str = "1024M,max:1024M") -> str:
    """The text of ``boot/grub/grub.cfg`` for a medium carrying ``manifest``."""
    paths = _Paths(kernel=kernel, initrd=initrd, xen=xen, dom0_mem=dom0_mem)
    return "\n".join(_lines(manifest, paths)).rstrip("\n") + "\n"
