"""The mastered demo medium: layout, relocatable disks, boot menu, and the CLI's errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from xsession.manifest import load_manifest
from xsession.mastering.cli import main as master_main


def test_the_medium_has_the_layout_of_the_design(demo_medium: Path):
    root = demo_medium / "xenubuntu"
    m = load_manifest(root / "manifest.yaml")
    assert (root / "pool" / "vmlinuz").is_file()
    for f in m.flavours:
        for rel in (f.cold_boot.kernel, f.cold_boot.initrd, f.disk.base, f.disk.saved_overlay, f.statefile.path):
            assert m.resolve(rel).is_file(), rel
        assert f.machine.machine_type == "pc-i440fx-7.2", "machine type must be pinned, not an alias"
        assert m.resolve(f.statefile.path).read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(m.resolve(f.disk.saved_overlay))],
                                         capture_output=True, check=True, text=True).stdout)
        assert info["backing-filename"] == "disk-base.qcow2", "the saved overlay must point at its base relatively"
        template = json.loads(subprocess.run(["qemu-img", "info", "--output=json",
                                              str(m.resolve(f.disk.session_template))],
                                             capture_output=True, check=True, text=True).stdout)
        assert template["backing-filename"] == "disk-saved.qcow2"
        assert template["virtual-size"] == info["virtual-size"], "a session must see the disk's full size"
    grub = (demo_medium / "boot" / "grub" / "grub.cfg").read_text()
    for name in m.names:
        assert f"xenubuntu.flavour={name}" in grub


def test_a_bad_spec_is_a_one_line_error(tmp_path: Path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("flavours: [{name: x}]\n")
    assert master_main([str(spec), "--guests", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("xsession-master: ") and str(spec) in err and "memory_mib" in err
