"""Mastering in the image's dom0: the parts that need no machine (the boot itself is
exercised by tests/test_image.py, whose image is mastered this way).

dom0's answer comes back as a tar on a raw disk; the host unpacks it as a
medium only if it holds nothing but files and folders inside the output, and
only if the manifest and the statefiles it names agree.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from xsession.bootopts import parse_cmdline
from xsession.image import iso, xenmaster
from xsession.image.steps import Output, StepError, key_of
from xsession.manifest import (MANIFEST_RELPATH, ColdBoot, Flavour, MachineConfig, Manifest, Statefile,
                               load_manifest, manifest_to_dict)
from xsession.mastering.grub import render_grub_cfg


def _medium(root: Path) -> Path:
    """A medium as dom0 writes it: one Xen flavour with its statefile, the pool, the boot menu."""
    xen = root / "xenubuntu"
    (xen / "pool").mkdir(parents=True)
    (xen / "flavours" / "kubuntu").mkdir(parents=True)
    (xen / "pool" / "vmlinuz").write_bytes(b"kernel")
    (xen / "pool" / "initrd-kubuntu.cpio").write_bytes(b"initrd")
    state = xen / "flavours" / "kubuntu" / "state.xl.zst"
    state.write_bytes(b"\x28\xb5\x2f\xfd" + b"x" * 100)
    machine = MachineConfig(machine_type="pv", memory_mib=256, vcpus=1, cpu="host", vga="none", disk_bus="none")
    flavour = Flavour(name="kubuntu", title="Kubuntu", priority=1, backend="xen", machine=machine, disk=None,
                      statefile=Statefile(path="flavours/kubuntu/state.xl.zst", size=state.stat().st_size,
                                          sha256=hashlib.sha256(state.read_bytes()).hexdigest(),
                                          compression="zstd", raw_size=4096, saved_with=machine),
                      cold_boot=ColdBoot(kernel="pool/vmlinuz", initrd="pool/initrd-kubuntu.cpio",
                                         cmdline="console=hvc0", ready_line="XS-READY", timeout_s=60.0))
    manifest = Manifest(path=str(xen / "manifest.yaml"), default="kubuntu", flavours=(flavour,))
    (root / MANIFEST_RELPATH).write_text(yaml.safe_dump(manifest_to_dict(manifest), sort_keys=False))
    (root / iso.GRUB_CFG).parent.mkdir(parents=True)
    (root / iso.GRUB_CFG).write_text(render_grub_cfg(load_manifest(root / MANIFEST_RELPATH)))
    return root


def _disk(src: Path, disk: Path, extra: list[tarfile.TarInfo] = (), tail_mib: int = 4) -> Path:
    """dom0's output disk: ``tar -cf DISK -C src .`` on a larger raw disk."""
    with tarfile.open(disk, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(src, ".")
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    with open(disk, "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) + (tail_mib << 20))
    return disk


def test_a_medium_written_by_dom0_is_unpacked_and_checked(tmp_path):
    disk = _disk(_medium(tmp_path / "src"), tmp_path / "out.img")
    manifest = xenmaster.unpack_medium(disk, tmp_path / "medium")
    assert [f.name for f in manifest.flavours] == ["kubuntu"]
    assert (tmp_path / "medium" / iso.GRUB_CFG).is_file()
    assert manifest.resolve("flavours/kubuntu/state.xl.zst").stat().st_size == 104


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "device", "absolute", "dotdot", "fifo"])
def test_a_tar_with_anything_but_files_inside_the_medium_is_refused(tmp_path, kind):
    info = tarfile.TarInfo({"absolute": "/etc/evil", "dotdot": "./xenubuntu/../../evil"}.get(kind, "./evil"))
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
    elif kind == "device":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    elif kind == "fifo":
        info.type = tarfile.FIFOTYPE
    else:
        info.size = 4
    disk = _disk(_medium(tmp_path / "src"), tmp_path / "out.img", [info])
    with pytest.raises(StepError, match="evil"):
        xenmaster.unpack_medium(disk, tmp_path / "out" / "medium")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out" / "evil").exists()
    assert not (tmp_path / "out" / "medium" / "xenubuntu").exists()  # nothing unpacked


def test_a_statefile_of_another_size_or_no_boot_menu_is_refused(tmp_path):
    src = _medium(tmp_path / "src")
    (src / "xenubuntu/flavours/kubuntu/state.xl.zst").write_bytes(b"short")
    with pytest.raises(StepError, match="recorded size"):
        xenmaster.unpack_medium(_disk(src, tmp_path / "a.img"), tmp_path / "a")
    src = _medium(tmp_path / "src2")
    (src / iso.GRUB_CFG).unlink()
    with pytest.raises(StepError, match="boot menu"):
        xenmaster.unpack_medium(_disk(src, tmp_path / "b.img"), tmp_path / "b")


def test_a_disk_without_a_tar_is_a_named_error(tmp_path):
    disk = tmp_path / "out.img"
    disk.write_bytes(os.urandom(64 << 10))
    with pytest.raises(StepError, match="cannot unpack"):
        xenmaster.unpack_medium(disk, tmp_path / "medium")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "..", ".", "", "/", "b.c", "\\", "~"]), min_size=1, max_size=6))
def test_an_accepted_member_name_stays_inside_the_output(parts):
    name = "/".join(parts)
    info = tarfile.TarInfo(name)
    if xenmaster.member_problem(info) is None:
        out = Path("/srv/out")
        assert os.path.normpath(out / name).startswith(str(out))


def test_the_dom0_script_is_sh_and_writes_only_the_disks_it_was_given():
    subprocess.run(["sh", "-n"], input=xenmaster.DOM0_SCRIPT, text=True, check=True)
    assert "/dev/disk/by-id/virtio-xsm-in" in xenmaster.DOM0_SCRIPT
    assert "/dev/disk/by-id/virtio-xsm-out" in xenmaster.DOM0_SCRIPT
    assert not any(dev in xenmaster.DOM0_SCRIPT for dev in ("/dev/vd", "/dev/sd", "/dev/sr", "/dev/nvme"))
    assert f"ConditionKernelCommandLine={xenmaster.MASTER_WORD}" in xenmaster.DOM0_UNIT


def test_the_word_that_starts_mastering_is_no_boot_option_of_the_manager():
    # a xenubuntu.* word the manager does not know would be a warning on every mastering boot
    opts = parse_cmdline(f"boot=casper xenubuntu.restore=off {xenmaster.MASTER_WORD} console=hvc0")
    assert not opts.warnings


def test_the_machine_boots_xen_with_eager_fpu_and_the_two_disks(tmp_path):
    argv = xenmaster.qemu_argv(*(tmp_path / n for n in ("xen", "vmlinuz", "initrd", "cd.iso", "in", "out")),
                               dom0_args="boot=casper console=hvc0")
    append = argv[argv.index("-append") + 1]
    assert iso.TCG_XEN in append.split()
    assert any("serial=xsm-in" in a for a in argv) and any("serial=xsm-out" in a for a in argv)
    assert argv[argv.index("-initrd") + 1] == f"{tmp_path / 'vmlinuz'} boot=casper console=hvc0,{tmp_path / 'initrd'}"
    with pytest.raises(ValueError):
        xenmaster.qemu_argv(*(tmp_path / n for n in ("x", "k", "i", "c", "in", "out")), dom0_args="a=1,2")


def _system(root: Path, packages: str) -> Output:
    root.mkdir(parents=True, exist_ok=True)
    (root / "xen.gz").write_bytes(b"xen")
    (root / "vmlinuz").write_bytes(b"kernel")
    (root / "packages.txt").write_text(packages)
    return Output("dom0-system", "k", root, False, 0.0, {})


def test_the_statefiles_key_follows_xen_and_not_the_rest_of_the_system(tmp_path):
    base = "libxenctrl4.17 4.17.7\nxen-utils-4.17 4.17.7\nxenstore-utils 4.17.7\n"

    def key(name: str, packages: str) -> str:
        return key_of(xenmaster.hypervisor_inputs(_system(tmp_path / name, packages)))

    first = key("a", base + "xinit 1.4\n")
    assert key("b", base + "xinit 1.5\nfonts-dejavu-core 2.37\n") == first  # a desktop package: no new masters
    assert key("c", base.replace("xen-utils-4.17 4.17.7", "xen-utils-4.17 4.17.8") + "xinit 1.4\n") != first
    assert key("d", base.replace("xenstore-utils 4.17.7", "xenstore-utils 4.17.8") + "xinit 1.4\n") != first
    other = _system(tmp_path / "e", base + "xinit 1.4\n")
    (other.path / "xen.gz").write_bytes(b"another xen")
    assert key_of(xenmaster.hypervisor_inputs(other)) != first


def test_a_crash_of_the_emulator_is_told_apart_from_a_hang_and_from_dom0s_own_end(tmp_path):
    """Real processes stand where QEMU runs: one that dies of SIGSEGV (QEMU under TCG has
    crashed so, rarely), one that hangs until the watchdog, one that prints dom0's end."""
    from xsession.image.steps import StepContext, StepError
    from xsession.image.xenmaster import EmulatorCrashed, _boot

    ctx = StepContext(name="xen-statefiles", out=tmp_path, log=tmp_path / "step.log", report=lambda line: None)
    with pytest.raises(EmulatorCrashed, match="signal 11"):
        _boot(ctx, ["sh", "-c", "echo booting; kill -SEGV $$"], timeout=30)
    with pytest.raises(StepError, match="did not finish") as hung:
        _boot(ctx, ["sleep", "30"], timeout=0.5)
    assert not isinstance(hung.value, EmulatorCrashed)
    assert _boot(ctx, ["sh", "-c", "echo XENUBUNTU-MASTER status=3; sleep 30"], timeout=30) == 3
    assert "booting" in ctx.log.read_text()
