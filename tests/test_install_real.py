"""A real flavour (the server: an installed Debian system) installed onto a loop
device from its file system image as built, then booted as a whole machine: it
reaches its login prompt with its new hostname, and its live-session leftovers
are gone."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from pathlib import Path

from xsession.demomedia import ensure_real_flavour
from xsession.install import installer

from .test_install_e2e import boot_whole_machine

MiB = 2**20


def _server_source() -> installer.Source:
    build = ensure_real_flavour("server")
    meta = json.loads((build / "flavour.json").read_text())
    image = build / meta["disk"]
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)], check=True,
                                     capture_output=True, text=True).stdout)
    return installer.Source("server", meta["title"], build / meta["kernel"], build / meta["initrd"],
                            meta["memory_mib"], cmdline=meta["cmdline"], root_image=image,
                            root_image_size=int(info["virtual-size"]))


def test_the_server_installs_from_its_image_and_boots_to_its_login_prompt(tmp_path: Path, runtime_dir: Path):
    source = _server_source()
    assert "root=UUID=" in installer.kernel_line(source, installer.new_identity("server"))
    assert "init_on_free" not in installer.kernel_line(source, installer.new_identity("server"))
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(installer.needed_bytes(source.size()) + 256 * MiB)
    dev = subprocess.run(["losetup", "--find", "--show", "--partscan", str(image)], check=True,
                         capture_output=True, text=True).stdout.strip()
    ident = installer.new_identity("server")
    reports: list[tuple[int, int]] = []
    try:
        installer.run(source, dev, ident, lambda d, t: reports.append((d, t)), threading.Event())
        # qemu-img's own progress came through: many reports while the root was copied
        assert len(reports) > 20 and reports[-1][0] == reports[-1][1]
        root = tmp_path / "root"
        root.mkdir()
        subprocess.run(["mount", "-o", "ro", f"{dev}p3", str(root)], check=True)
        try:
            assert (root / "etc/hostname").read_text().strip() == ident.hostname
            assert (root / "etc/machine-id").read_text().strip() == ident.machine_id
            assert (root / "etc/fstab").read_text().startswith("# <file system>")
            assert f"UUID={ident.root_uuid} / ext4" in (root / "etc/fstab").read_text()
            for leftover in installer.LEFTOVERS:
                assert not (root / leftover).exists(), leftover
            shadow = {line.split(":")[0]: line.split(":") for line in (root / "etc/shadow").read_text().splitlines()}
            assert shadow["root"][1].startswith("!")   # locked, where the session's had no password
            assert (root / "usr/sbin/smbd").exists()    # the flavour itself, as built
        finally:
            subprocess.run(["umount", str(root)], check=True)
    finally:
        subprocess.run(["losetup", "--detach", dev], capture_output=True)
    out = boot_whole_machine(image, runtime_dir, "bios", ready=f"{ident.hostname} login:".encode(), timeout=300)
    assert re.search(rf"Debian GNU/Linux 12 {ident.hostname} ttyS0", out), out[-1500:]
