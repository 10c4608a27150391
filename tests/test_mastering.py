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


def _qcow2(path: Path, size: str = "8M", backing: Path | None = None, data: bytes = b"") -> Path:
    extra = ["-F", "qcow2", "-b", str(backing)] if backing is not None else []
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), size], check=True)
    if data:
        subprocess.run(["qemu-io", "-c", f"write -P {data[0]} 0 64k", str(path)], check=True, capture_output=True)
    return path


def _read(image: Path, offset: int) -> int:
    out = subprocess.run(["qemu-io", "-r", "-c", f"read -v {offset} 1", str(image)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split(":")[1].split()[0], 16)


def test_flavours_layered_over_one_common_system_carry_it_once(tmp_path: Path):
    from xsession.diskchain import check_chain
    from xsession.mastering.sources import SHARED_DIR, backing_file, disk_layers

    builds = tmp_path / "builds"
    builds.mkdir()
    common = _qcow2(builds / "common-abc.qcow2", data=b"\x11")
    medium = tmp_path / "medium"
    layers = {}
    for name, byte in (("one", b"\x22"), ("two", b"\x33")):
        (builds / name).mkdir()
        layer = _qcow2(builds / name / "root.qcow2", backing=common)
        subprocess.run(["qemu-io", "-c", f"write -P {byte[0]} 65536 64k", str(layer)], check=True, capture_output=True)
        fdir = medium / "xenubuntu" / "flavours" / name
        fdir.mkdir(parents=True)
        disk_layers(fdir, base_image=layer)
        layers[name] = fdir / "disk-base.qcow2"
    shared = medium / "xenubuntu" / SHARED_DIR
    assert [p.name for p in shared.iterdir()] == ["common-abc.qcow2"]  # once for both
    for name, byte in (("one", 0x22), ("two", 0x33)):
        base = layers[name]
        backing = backing_file(base)
        assert backing is not None and backing.resolve() == (shared / "common-abc.qcow2").resolve()
        check_chain(base.parent / "disk-session.qcow2", medium)  # every file of the chain on the medium
        # the common system's bytes and the flavour's own, through the session's chain
        assert _read(base.parent / "disk-session.qcow2", 0) == 0x11
        assert _read(base.parent / "disk-session.qcow2", 65536) == byte
    # the build's own layer is untouched (it still names the build cache's common image)
    assert backing_file(builds / "one" / "root.qcow2") == common
    # the medium moves: the chain is named relative to it
    moved = tmp_path / "elsewhere"
    medium.rename(moved)
    assert _read(moved / "xenubuntu" / "flavours" / "two" / "disk-session.qcow2", 0) == 0x11


def test_a_shared_image_that_stands_on_another_is_refused(tmp_path: Path):
    import pytest

    from xsession.errors import ManifestError
    from xsession.mastering.sources import disk_layers

    deeper = _qcow2(tmp_path / "deeper.qcow2")
    common = _qcow2(tmp_path / "common.qcow2", backing=deeper)
    layer = _qcow2(tmp_path / "root.qcow2", backing=common)
    fdir = tmp_path / "medium" / "xenubuntu" / "flavours" / "one"
    fdir.mkdir(parents=True)
    with pytest.raises(ManifestError, match="must be whole"):
        disk_layers(fdir, base_image=layer)
