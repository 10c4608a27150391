"""A real initrd built by Debian's mkinitramfs with our hook and boot script.

mkinitramfs needs /lib/modules/VERSION and /boot/config-VERSION of a real
kernel: the files come from Debian's kernel package (downloaded once into
.cache/boot/) and are bound in with tmpfs over /lib/modules and /boot inside
a private mount namespace (`unshare -m`), so the host stays untouched. The
configuration folder is a temporary one holding our hook, our script where a
package installs it, and live-boot's main script, so the initrd has both
casper-bottom and live-bottom. lsinitramfs inspects the result, and the
script then runs inside the unpacked initrd, on its own busybox and
initramfs-tools library.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOOK = REPO / "hooks" / "xenubuntu"
SCRIPT = REPO / "casper-scripts" / "xenubuntu"
CACHE = REPO / ".cache" / "boot"
CHROOT = "/usr/sbin/chroot"
CONF = "MODULES=list\nBUSYBOX=auto\nKEYMAP=n\nCOMPRESS=zstd\nRUNSIZE=10%\nFSTYPE=auto\n"


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload]


def cached_deb(package: str) -> Path:
    """Debian's .deb of a package, downloaded once into .cache/boot/."""
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(f"{package}_*.deb"))
    if not found:
        got = run(["apt-get", "download", package], cwd=CACHE)
        assert got.returncode == 0, got.stderr
        found = sorted(CACHE.glob(f"{package}_*.deb"))
    assert found, f"apt-get download {package} left no .deb"
    return found[-1]


def kernel_package() -> str:
    """The package linux-image-amd64 currently depends on (linux-image-VERSION)."""
    deps = run(["apt-cache", "depends", "linux-image-amd64"])
    for line in deps.stdout.splitlines():
        name = line.split(":", 1)[-1].strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    cached = sorted(CACHE.glob("linux-image-*.deb"))
    assert cached, f"no kernel package known: {deps.stderr}"
    return cached[-1].name.split("_")[0]


@dataclass
class Built:
    image: Path
    stderr: str
    unpacked: Path


def extract(deb: Path, dest: Path, *members: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    untar = run(["tar", "-x", "-C", str(dest), "--wildcards", *members], stdin=tar.stdout)
    assert tar.wait() == 0 and untar.returncode == 0, untar.stderr


def build(work: Path, kernel: Path, version: str, *, live_bottom: bool) -> tuple[Path, str]:
    """mkinitramfs in a private mount namespace; returns the image and what it said on stderr."""
    confdir = work / "conf"
    for sub in ("hooks", "scripts/casper-bottom", "scripts/live-bottom", "conf.d"):
        (confdir / sub).mkdir(parents=True)
    (confdir / "initramfs.conf").write_text(CONF)
    (confdir / "modules").write_text("")
    shutil.copy(HOOK, confdir / "hooks/xenubuntu")
    shutil.copy(SCRIPT, confdir / "scripts/casper-bottom/xenubuntu")
    if live_bottom:
        shutil.copy(SCRIPT, confdir / "scripts/live-bottom/xenubuntu")
    live = cached_deb("live-boot-initramfs-tools")
    extract(live, work / "live", "./usr/share/initramfs-tools/scripts/live")
    shutil.copy(work / "live/usr/share/initramfs-tools/scripts/live", confdir / "scripts/live")

    image = work / "initrd.img"
    inside = f"""
        set -e
        mkdir -p /lib/modules /boot
        mount -t tmpfs xenubuntu-test /lib/modules
        mkdir /lib/modules/{version}
        mount --bind {kernel}/lib/modules/{version} /lib/modules/{version}
        mount -t tmpfs xenubuntu-test /boot
        cp {kernel}/boot/config-{version} /boot/
        exec mkinitramfs -d {confdir} -o {image} {version}
    """
    env = {k: v for k, v in os.environ.items()} | {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    made = run(["unshare", "-m", "sh", "-c", inside], env=env)
    assert made.returncode == 0, made.stderr
    return image, made.stderr


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    deb = cached_deb(kernel_package())
    root = tmp_path_factory.mktemp("kernel")
    extract(deb, root, "./boot/config-*", "./lib/modules/*/modules.*")
    versions = [p.name for p in (root / "lib/modules").iterdir()]
    assert len(versions) == 1
    yield root, versions[0]


@pytest.fixture(scope="module")
def built(kernel: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Built:
    work = tmp_path_factory.mktemp("initrd")
    image, stderr = build(work, *kernel, live_bottom=True)
    unpacked = work / "unpacked"
    out = run(["unmkinitramfs", str(image), str(unpacked)])
    assert out.returncode == 0, out.stderr
    return Built(image, stderr, unpacked)


def test_the_build_says_nothing(built: Built) -> None:
    assert built.stderr == ""


def test_lsinitramfs_shows_the_script_in_both_runners(built: Built) -> None:
    listing = run(["lsinitramfs", str(built.image)])
    assert listing.returncode == 0, listing.stderr
    files = set(listing.stdout.split())
    assert {"scripts/casper-bottom/xenubuntu", "scripts/live-bottom/xenubuntu", "scripts/live",
            "scripts/functions", "init"} <= files
    assert any(f.endswith("bin/busybox") for f in files)


def test_mkinitramfs_orders_the_script(built: Built) -> None:
    for runner in ("casper-bottom", "live-bottom"):
        order = (built.unpacked / "scripts" / runner / "ORDER").read_text()
        assert f'/scripts/{runner}/xenubuntu "$@"' in order
        script = built.unpacked / "scripts" / runner / "xenubuntu"
        assert script.read_bytes() == SCRIPT.read_bytes() and os.access(script, os.X_OK)


def test_the_script_runs_on_the_initrds_own_shell(built: Built) -> None:
    """As casper would run it: medium at /root/cdrom, the live system at /root."""
    top = built.unpacked
    (top / "proc").mkdir(exist_ok=True)
    (top / "proc/cmdline").write_text("boot=casper quiet splash xenubuntu.flavour=kubuntu xenubuntu.restore=off\n")
    # casper ships only in Ubuntu's initrds; its library builds on initramfs-tools' functions
    (top / "scripts/casper-functions").write_text(". /scripts/functions\n")
    (top / "root/cdrom/xenubuntu").mkdir(parents=True)
    (top / "root/cdrom/xenubuntu/manifest.yaml").write_text("format: 1\n")
    ran = run([CHROOT, str(top), "/bin/sh", "-c",
               "export quiet=n rootmnt=/root USERNAME=ubuntu PATH=/usr/sbin:/usr/bin:/sbin:/bin; "
               ". /scripts/functions; run_scripts /scripts/casper-bottom; "  # as casper runs its scripts
               "/scripts/casper-bottom/xenubuntu && echo exit=0"], env={})
    assert ran.returncode == 0 and ran.stderr == "", ran.stderr
    assert ran.stdout.count("... done.") == 2 and ran.stdout.endswith("exit=0\n")
    assert "Begin: Setting up the XenUbuntu session manager... ... done." in ran.stdout
    conf = (top / "root/etc/xenubuntu/boot.conf").read_text()
    assert "XENUBUNTU_MEDIUM=/cdrom\n" in conf
    assert 'XENUBUNTU_OPTIONS="xenubuntu.flavour=kubuntu xenubuntu.restore=off"\n' in conf
    assert "autologin-user=ubuntu" in (top / "root/etc/lightdm/lightdm.conf.d/70-xenubuntu.conf").read_text()


def test_the_hook_warns_when_live_boot_lacks_the_script(kernel: tuple[Path, str], tmp_path: Path) -> None:
    image, stderr = build(tmp_path, *kernel, live_bottom=False)
    assert stderr == ("W: xenubuntu: scripts/live-bottom/xenubuntu is missing; "
                      "this initrd will not start XenUbuntu\n")
    assert "scripts/casper-bottom/xenubuntu" in run(["lsinitramfs", str(image)]).stdout.split()
