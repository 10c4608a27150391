"""The boot menu: grub-script-check (GRUB's own parser) accepts every menu, and
the entries boot what docs/boot.md says they boot."""

from __future__ import annotations

import re
import shlex
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xsession.bootopts import RestorePolicy, parse_cmdline
from xsession.manifest import Manifest, parse_manifest
from xsession.mastering.grub import grub_quote, render_grub_cfg


def manifest(*flavours: tuple[str, str, int], default: str | None = None) -> Manifest:
    """A valid manifest with these (name, title, priority) flavours."""
    items = "".join(
        f"""
  - name: {name}
    priority: {priority}
    machine: {{machine_type: pc-i440fx-7.2, memory_mib: 512}}
    cold_boot: {{kernel: k/{name}, initrd: i/{name}, ready_line: ready}}"""
        for name, title, priority in flavours
    )
    head = f"format: 1\ndefault: {default}\n" if default else "format: 1\n"
    parsed = parse_manifest(head + "flavours:" + items)
    titles = {name: title for name, title, _ in flavours}
    return replace(parsed, flavours=tuple(replace(f, title=titles[f.name]) for f in parsed.flavours))


FOUR = manifest(("ubuntu", "Ubuntu 24.04", 10), ("kubuntu", "Kubuntu", 20), ("xubuntu", "Xubuntu", 20),
                ("server", "Ubuntu Server", 5), default="kubuntu")


def check(cfg: str, tmp_path: Path) -> None:
    path = tmp_path / "grub.cfg"
    path.write_text(cfg)
    result = subprocess.run(["grub-script-check", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stderr + cfg


def entries(cfg: str) -> list[tuple[str, str, list[str]]]:
    """(title, id, body lines) of each menuentry; titles read back as GRUB reads them."""
    found = []
    for m in re.finditer(r"^menuentry ([^\n]*) --id (\S+) \{\n(.*?)\n\}$", cfg, re.M | re.S):
        (title,) = shlex.split(m.group(1))
        found.append((title, m.group(2), [line.strip() for line in m.group(3).splitlines()]))
    return found


def test_grub_accepts_the_menu(tmp_path: Path) -> None:
    check(render_grub_cfg(FOUR), tmp_path)


def test_check_would_catch_a_broken_menu(tmp_path: Path) -> None:
    broken = render_grub_cfg(FOUR).replace("}", "", 1)
    (tmp_path / "grub.cfg").write_text(broken)
    assert subprocess.run(["grub-script-check", str(tmp_path / "grub.cfg")], capture_output=True).returncode != 0


def test_every_flavour_gets_a_xen_and_a_kvm_entry_default_first() -> None:
    found = entries(render_grub_cfg(FOUR))
    ids = [i for _, i, _ in found]
    assert ids == [
        "xenubuntu-xen-kubuntu", "xenubuntu-kvm-kubuntu",     # the manifest's default first
        "xenubuntu-xen-server", "xenubuntu-kvm-server",       # then by priority
        "xenubuntu-xen-ubuntu", "xenubuntu-kvm-ubuntu",
        "xenubuntu-xen-xubuntu", "xenubuntu-kvm-xubuntu",
        "xenubuntu-xen-kubuntu-restore-off", "xenubuntu-kvm-kubuntu-restore-off",
        "xenubuntu-xen-kubuntu-restore-eager", "xenubuntu-kvm-kubuntu-restore-eager",
    ]
    assert [t for t, _, _ in found][:4] == ["Kubuntu (Xen)", "Kubuntu (KVM)", "Ubuntu Server (Xen)",
                                            "Ubuntu Server (KVM)"]


def test_menu_default_is_the_manifests_default_under_xen() -> None:
    cfg = render_grub_cfg(FOUR)
    assert "set default=xenubuntu-xen-kubuntu\n" in cfg


def test_xen_entry_shape() -> None:
    cfg = render_grub_cfg(FOUR, kernel="/casper/vmlinuz", initrd="/casper/initrd.lz", xen="/boot/xen-4.17.gz",
                          dom0_mem="2048M,max:2048M")
    _, _, body = entries(cfg)[0]
    assert body == [
        "multiboot2 /boot/xen-4.17.gz placeholder dom0_mem=2048M,max:2048M",
        "module2 /casper/vmlinuz placeholder boot=casper quiet splash xenubuntu.flavour=kubuntu",
        "module2 --nounzip /casper/initrd.lz",
    ]


def test_kvm_entry_shape() -> None:
    _, _, body = entries(render_grub_cfg(FOUR))[1]
    assert body == ["linux /casper/vmlinuz boot=casper quiet splash xenubuntu.flavour=kubuntu",
                    "initrd /casper/initrd"]


@pytest.mark.parametrize(("suffix", "policy"), [("", RestorePolicy.LAZY), ("-restore-off", RestorePolicy.OFF),
                                                ("-restore-eager", RestorePolicy.EAGER)])
def test_entries_hand_the_options_bootopts_reads(suffix: str, policy: RestorePolicy) -> None:
    for _, ident, body in entries(render_grub_cfg(FOUR)):
        if not ident.endswith(suffix) or ("-restore-" in ident) != bool(suffix):
            continue
        kernel_line = body[1] if ident.startswith("xenubuntu-xen") else body[0]
        opts = parse_cmdline(kernel_line)
        assert opts.warnings == () and opts.restore is policy
        assert opts.flavour == ident.split("-")[2]


def test_single_flavour(tmp_path: Path) -> None:
    cfg = render_grub_cfg(manifest(("ubuntu", "Ubuntu", 100)))
    check(cfg, tmp_path)
    assert len(entries(cfg)) == 6 and "set default=xenubuntu-xen-ubuntu\n" in cfg


@pytest.mark.parametrize("title", ["It's \"Ubuntu\"", "$(reboot); echo ${x} \\ `id`", "a\nmenuentry evil {",
                                   "Ünïcödé – 日本語", "'", "}{"])
def test_awkward_titles_are_quoted(tmp_path: Path, title: str) -> None:
    cfg = render_grub_cfg(manifest(("ubuntu", title, 1)))
    check(cfg, tmp_path)
    found = entries(cfg)
    assert len(found) == 6
    assert found[0][0] == title.replace("\n", " ") + " (Xen)"


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=30))
def test_any_title_reads_back(title: str) -> None:
    word = grub_quote(title)
    assert shlex.split(word) == [re.sub(r"[\x00-\x1f\x7f]+", " ", title)] or (word == "''" and title == "")


@settings(max_examples=25, deadline=None)
@given(st.text(min_size=1, max_size=20))
def test_grub_accepts_any_title(title: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        check(render_grub_cfg(manifest(("ubuntu", title, 1))), Path(tmp))
