"""The image builder's parts that need no root file system: cached steps and the boot menu check."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from xsession.image import iso
from xsession.image.chroot import script
from xsession.image.steps import StepCache, StepContext, key_of
from xsession.manifest import parse_manifest
from xsession.mastering.grub import render_grub_cfg

ON_IMAGE = {iso.XEN: 1, iso.KERNEL: 1, iso.INITRD: 1}


def _counting(calls: list[str], text: str = "hello"):
    def build(ctx: StepContext) -> dict:
        calls.append(ctx.name)
        (ctx.out / "file").write_text(text)
        return {"fact": 42}
    return build


def test_a_step_is_built_once_then_cached(tmp_path):
    cache = StepCache(tmp_path, report=lambda line: None)
    calls: list[str] = []
    first = cache.step("s", key_of(["a"]), _counting(calls))
    again = cache.step("s", key_of(["a"]), _counting(calls))
    assert calls == ["s"]
    assert first.built and not again.built
    assert again.record["fact"] == 42 and again.record["files"] == {"file": 5}
    assert (again.path / "file").read_text() == "hello"


def test_changed_inputs_make_a_new_key_and_old_outputs_are_pruned(tmp_path):
    cache = StepCache(tmp_path, report=lambda line: None)
    calls: list[str] = []
    keys = [key_of([i]) for i in range(4)]
    for k in keys:
        cache.step("s", k, _counting(calls))
    assert len(calls) == 4
    kept = sorted(p.name for p in tmp_path.glob("s-*") if p.is_dir())
    assert len(kept) == 2 and f"s-{keys[-1]}" in kept


def test_a_broken_output_is_rebuilt(tmp_path):
    cache = StepCache(tmp_path, report=lambda line: None)
    calls: list[str] = []
    out = cache.step("s", "k1", _counting(calls))
    (out.path / "file").write_text("truncated")  # another size than recorded
    cache.step("s", "k1", _counting(calls))
    (out.path / "step.json").unlink()  # no record: an interrupted build
    cache.step("s", "k1", _counting(calls))
    assert len(calls) == 3


def test_a_failed_build_leaves_nothing(tmp_path):
    cache = StepCache(tmp_path, report=lambda line: None)

    def fail(ctx: StepContext) -> None:
        (ctx.out / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.step("s", "k", fail)
    assert not list(tmp_path.glob("s-k")) and not list(tmp_path.glob(".s-k.tmp"))


def test_concurrent_builders_build_once(tmp_path):
    calls: list[str] = []
    gate = threading.Event()

    def slow(ctx: StepContext) -> None:
        calls.append("x")
        gate.wait(2)
        (ctx.out / "f").write_text("1")

    outs = []
    threads = [threading.Thread(target=lambda: outs.append(
        StepCache(tmp_path, report=lambda line: None).step("s", "k", slow))) for _ in range(3)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert calls == ["x"] and len(outs) == 3


def test_key_hashes_file_contents(tmp_path):
    f = tmp_path / "a.deb"
    f.write_text("one")
    k1 = key_of(["x", f])
    f.write_text("two")
    assert key_of(["x", f]) != k1


MANIFEST = """
format: 1
default: kubuntu
flavours:
  - name: kubuntu
    title: Kubuntu
    priority: 1
    backend: xen
    machine: {machine_type: pv, memory_mib: 256}
    cold_boot: {kernel: pool/vmlinuz, initrd: pool/initrd, cmdline: console=hvc0, ready_line: READY}
"""


def test_the_mastered_boot_menu_fits_the_image_and_gets_the_extra_words():
    mastered = render_grub_cfg(parse_manifest(MANIFEST))
    extra = iso.Extra(xen="console=com1", dom0="console=hvc0 init_on_alloc=0", plain="console=ttyS0", serial=True)
    cfg = iso.boot_menu(mastered, ON_IMAGE, extra)
    assert cfg.startswith(iso.SERIAL_PRELUDE)
    lines = cfg.splitlines()
    assert any(line.startswith("\tmultiboot2 /boot/xen.gz placeholder") and line.endswith(" console=com1")
               for line in lines)
    assert any(line.startswith("\tmodule2 /casper/vmlinuz") and line.endswith("console=hvc0 init_on_alloc=0")
               for line in lines)
    assert any(line.startswith("\tlinux /casper/vmlinuz") and line.endswith(" console=ttyS0") for line in lines)
    assert all(line.endswith("/casper/initrd") for line in lines if "--nounzip" in line or "initrd /" in line)
    # nothing else changes
    assert iso.boot_menu(mastered, ON_IMAGE) == mastered


def test_a_menu_loading_a_file_the_image_lacks_is_refused():
    mastered = render_grub_cfg(parse_manifest(MANIFEST))
    with pytest.raises(iso.BootMenuError, match="/casper/initrd"):
        iso.boot_menu(mastered, {iso.XEN: 1, iso.KERNEL: 1})
    with pytest.raises(iso.BootMenuError, match="no menu entry"):
        iso.boot_menu("set timeout=1\n", ON_IMAGE)


def test_chroot_script_mounts_in_order():
    text = script(Path("/r"), ["true"], debs=Path("/d"), overlay=(Path("/l"), Path("/u"), Path("/w")),
                  binds=[(Path("/b"), "/run/x")])
    lines = text.splitlines()
    assert lines[0] == "set -e" and "rprivate" in lines[1] and lines[2].startswith("mount -t overlay")
    assert lines.index("mount --bind /d /r/var/cache/apt/archives") < len(lines) - 2
    assert lines[-1].startswith("chroot /r env -i")
