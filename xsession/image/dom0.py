"""The dom0 live system: Debian's packages in one cached layer, the product in another.

Three steps, each cached by a key of its inputs (:mod:`.steps`):

``dom0-system``
    ``debootstrap --variant=minbase`` and ``apt-get install`` of the live
    system's packages (kernel, systemd, live-boot, Xen 4.17, the toolstack)
    and of every package the product's .deb depends on. Its key is the suite,
    the mirrors and the package list, so it is rebuilt only when one of them
    changes. The downloaded .debs are kept in a shared folder of the cache.
``dom0-squashfs``
    That root file system as ``filesystem.squashfs`` (zstd).
``dom0-product``
    The product's .deb files installed on top of the system through an
    overlay, with the image's own settings; only the overlay's changes are
    packed, as ``xenubuntu.squashfs``, and the initrd is rebuilt (it carries
    the product's live-bottom script). The .deb changes often: this step
    takes a few seconds and leaves the large layers alone.

live-boot stacks the squashfs images of its folder in name order, the later
on top, so ``xenubuntu.squashfs`` lies over ``filesystem.squashfs``.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import chroot
from .steps import Output, StepCache, StepContext, key_of
from .xenmaster import MASTER_WORD, dom0_commands

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
XEN_IMAGE = "boot/xen-4.17-amd64.gz"

#: the live system without the product (the product's own dependencies are added from its .deb)
PACKAGES = (
    "linux-image-amd64", "systemd", "systemd-sysv", "dbus", "udev", "kmod",
    "live-boot", "live-boot-initramfs-tools", "initramfs-tools", "zstd", "busybox",
    "xen-hypervisor-4.17-amd64", "xen-utils-4.17", "xen-utils-common", "xenstore-utils",
    # Xen's device model: it serves the Xen sessions' PV framebuffers over VNC to the chooser
    "qemu-system-xen",
    "iproute2", "procps", "less",
    # dom0's screen: X (modesetting, libinput) started by a unit, showing the chooser (xsession-gui)
    "xserver-xorg-core", "xserver-xorg-input-libinput", "xinit", "fonts-dejavu-core",
)
#: bump when the commands of a step change (part of its key)
SYSTEM_RECIPE = "system-2: with the updates"
SQUASHFS_RECIPE = "squashfs-1: zstd 15, 128K blocks"
PRODUCT_RECIPE = "product-3: the units that master Xen flavours and show the chooser"

SQUASHFS_OPTIONS = ["-comp", "zstd", "-Xcompression-level", "15", "-b", "128K", "-noappend", "-no-progress"]
#: never packed: build-only files, package caches, the initrd (it travels beside the squashfs)
SQUASHFS_EXCLUDE = [
    "usr/sbin/policy-rc.d", "var/cache/apt/*.bin", "var/cache/apt/archives/*", "var/lib/apt/lists/*",
    "boot/initrd.img*", "tmp/*", "var/log/*.log", "var/tmp/*",
]


@dataclass(frozen=True)
class Options:
    """How the dom0 is made: where packages come from, what the image adds."""

    suite: str = SUITE
    mirror: str = MIRROR
    security_mirror: str = SECURITY_MIRROR
    root_shell: bool = False  # a root shell without password on the serial consoles (for tests)
    extra_packages: tuple[str, ...] = ()
    #: pure-Python packages Debian does not have (qemu.qmp for the QEMU backend): folders
    #: copied to /usr/local/lib/python3.X/dist-packages, as ``pip install`` would put them
    python_modules: tuple[Path, ...] = ()


def deb_depends(deb: Path) -> list[str]:
    """The package names a .deb depends on (the first of each set of alternatives)."""
    text = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True,
                          check=True).stdout
    names = []
    for dep in text.replace("\n", " ").split(","):
        first = dep.split("|")[0].strip().split(" ")[0].split(":")[0]
        if first:
            names.append(first)
    return names


def deb_name(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Package"], capture_output=True, text=True,
                          check=True).stdout.strip()


def package_list(debs: list[Path], opts: Options) -> list[str]:
    """What the system layer installs: the live system's packages and the product's dependencies."""
    own = {deb_name(d) for d in debs}
    wanted = set(PACKAGES) | set(opts.extra_packages)
    for d in debs:
        wanted |= {n for n in deb_depends(d) if n not in own}
    return sorted(wanted)


def _apt_setup(root: Path, opts: Options) -> None:
    (root / "etc/apt/sources.list").write_text(
        f"deb {opts.mirror} {opts.suite} main\n"
        f"deb {opts.mirror} {opts.suite}-updates main\n"
        f"deb {opts.security_mirror} {opts.suite}-security main\n")
    (root / "etc/apt/apt.conf.d/90xenubuntu-image").write_text(
        'APT::Install-Recommends "false";\nAcquire::Languages "none";\n')
    policy = root / "usr/sbin/policy-rc.d"  # no daemon starts in the chroot
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    (root / "etc/hostname").write_text("xenubuntu\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 xenubuntu\n")
    conf = root / "etc/initramfs-tools/conf.d"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "xenubuntu-image.conf").write_text("COMPRESS=zstd\n")


def system(cache: StepCache, debs: list[Path], opts: Options) -> Output:
    """The ``dom0-system`` step: a root file system with every package but the product's."""
    packages = package_list(debs, opts)
    key = key_of([SYSTEM_RECIPE, opts.suite, opts.mirror, opts.security_mirror, *packages])
    archives = cache.root / "debs"
    (archives / "partial").mkdir(parents=True, exist_ok=True)

    def build(ctx: StepContext) -> dict:
        root = ctx.out / "rootfs"
        ctx.run(["debootstrap", "--variant=minbase", f"--cache-dir={archives}", opts.suite, str(root),
                 opts.mirror], what="debootstrap", timeout=1800)
        _apt_setup(root, opts)
        chroot.run(ctx, root, ["apt-get update -q", "apt-get dist-upgrade -y -q",
                               "apt-get install -y -q " + " ".join(packages)],
                   what=f"apt-get install ({len(packages)} packages)", debs=archives, timeout=3600)
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if not kernels or not (root / XEN_IMAGE).exists():
            raise RuntimeError("dom0-system: no kernel or no Xen in the root file system")
        shutil.copy2(kernels[-1], ctx.out / "vmlinuz")
        shutil.copy2(root / XEN_IMAGE, ctx.out / "xen.gz")
        versions = subprocess.run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Package} ${Version}\n"],
                                  capture_output=True, text=True, check=True).stdout
        (ctx.out / "packages.txt").write_text(versions)
        return {"kernel": kernels[-1].name.removeprefix("vmlinuz-"), "packages": packages}

    return cache.step("dom0-system", key, build, checked=["vmlinuz", "xen.gz", "packages.txt"],
                      record_files=False)


def _squash(ctx: StepContext, src: Path, dest: Path, what: str, extra_exclude: list[str] = ()) -> None:
    exclude = ctx.out / "exclude"
    exclude.write_text("\n".join([*SQUASHFS_EXCLUDE, *extra_exclude]) + "\n")
    ctx.run(["mksquashfs", str(src), str(dest), *SQUASHFS_OPTIONS, "-wildcards", "-ef", str(exclude)],
            what=what, timeout=3600)
    exclude.unlink()


def squashfs(cache: StepCache, sysout: Output) -> Output:
    """The ``dom0-squashfs`` step: the system layer packed."""
    key = key_of([SQUASHFS_RECIPE, sysout.key])

    def build(ctx: StepContext) -> None:
        _squash(ctx, sysout.path / "rootfs", ctx.out / "filesystem.squashfs", "mksquashfs")

    return cache.step("dom0-squashfs", key, build)


# --- the product layer -------------------------------------------------------------------

#: initramfs-tools runs /scripts/$BOOT; the medium's boot menu says boot=casper (the
#: initramfs of an Ubuntu live system), this dom0's initramfs is live-boot's
CASPER_SHIM = """\
# boot=casper on a XenUbuntu image: the medium's boot menu names casper, the
# initramfs of Ubuntu's live systems; this live system uses live-boot, which
# finds its squashfs images in the medium's casper folder.
. /scripts/live
LIVE_MEDIA_PATH=casper
"""
AUTOLOGIN = """\
# root shell on the serial consoles (ttyS0, or hvc0 under Xen) without a password
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 - $TERM
"""
#: dom0's desktop: X on the first screen running the chooser alone, full screen, as
#: root (no logind seat: polkit's "active session" would not apply; root may manage
#: sessions). Not on a boot that masters flavours for an image build.
DESKTOP_UNIT = f"""\
[Unit]
Description=XenUbuntu chooser on this machine's screen (X and xsession-gui)
Documentation=man:xsession-gui(1)
After=systemd-user-sessions.service xsessiond.service dbus.service
ConditionKernelCommandLine=!{MASTER_WORD}
ConditionPathExists=/usr/bin/xsession-gui
[Service]
ExecStart=/usr/bin/xinit /usr/bin/xsession-gui --fullscreen -- /usr/bin/Xorg :0 vt7 -nolisten tcp -noreset -keeptty
Restart=on-failure
RestartSec=3s
[Install]
WantedBy=graphical.target
"""
#: Debian's /etc/init.d/xen passes XENCONSOLED_ARGS; xsessiond reads XENCONSOLED_TRACE
XEN_DEFAULTS = """
# XenUbuntu image: xenconsoled logs every guest's console (xsessiond reads them)
XENCONSOLED_TRACE=guest
XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"
"""


def _configure_commands(opts: Options) -> list[str]:
    """Shell lines run in the product layer's chroot before the .debs are installed."""
    q = shlex.quote
    lines = [
        f"printf %s {q(CASPER_SHIM)} > /etc/initramfs-tools/scripts/casper",
        f"printf %s {q(XEN_DEFAULTS)} >> /etc/default/xen",
        "mkdir -p /var/log/xen/console",
        # e2scrub_reap costs seconds at boot and has nothing to do on a live medium
        "systemctl mask e2scrub_reap.service",
    ]
    lines += dom0_commands()  # the unit that masters Xen flavours for an image build
    lines += [f"printf %s {q(DESKTOP_UNIT)} > /etc/systemd/system/xenubuntu-desktop.service",
              "systemctl enable xenubuntu-desktop.service", "systemctl set-default graphical.target"]
    if opts.root_shell:
        lines += [
            "mkdir -p /etc/systemd/system/serial-getty@.service.d",
            f"printf %s {q(AUTOLOGIN)} > /etc/systemd/system/serial-getty@.service.d/autologin.conf",
            "passwd -d root",
        ]
    return lines


#: the .debs' initramfs hooks trigger an initrd build; only when none ran is one made here
INITRD = ("find /boot -name 'initrd.img-*' -newer /etc/initramfs-tools/scripts/casper | grep -q . "
          "|| update-initramfs -u -k all")


def _tree_files(folder: Path) -> list[object]:
    """A folder's files and their contents, for a key (compiled files left out)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return [item for p in files for item in (str(p.relative_to(folder)), p)]


PY_MODULES = ("d=$(python3 -c 'import sys; print(\"/usr/local/lib/python3.%d/dist-packages\" % sys.version_info[1])')"
              " && mkdir -p $d && cp -r /run/xenubuntu-py/. $d/ && find $d -name __pycache__ -prune -exec rm -rf {} +")


def product(cache: StepCache, sysout: Output, debs: list[Path], opts: Options) -> Output:
    """The ``dom0-product`` step: the .debs and the image's settings, as an overlay layer."""
    commands = _configure_commands(opts)
    modules = [m.resolve() for m in opts.python_modules]
    if modules:
        commands.append(PY_MODULES)
    key = key_of([PRODUCT_RECIPE, sysout.key, *commands, INITRD, *debs,
                  *(item for m in modules for item in (m.name, *_tree_files(m)))])
    kernel = sysout.record["kernel"]

    def build(ctx: StepContext) -> dict:
        work = ctx.out / "work"
        for d in ("upper", "ovl", "merged", "debs", "py"):
            (work / d).mkdir(parents=True)
        for d in debs:
            shutil.copy2(d, work / "debs" / d.name)
        for m in modules:
            shutil.copytree(m, work / "py" / m.name, ignore=shutil.ignore_patterns("__pycache__"))
        inside = ["/run/xenubuntu-debs/" + d.name for d in debs]
        chroot.run(ctx, work / "merged",
                   [*commands, "apt-get install -y -q " + " ".join(map(shlex.quote, inside)), INITRD],
                   what="install the product and configure", debs=None,
                   overlay=(sysout.path / "rootfs", work / "upper", work / "ovl"),
                   binds=[(work / "debs", "/run/xenubuntu-debs"), (work / "py", "/run/xenubuntu-py")],
                   timeout=1800)
        upper = work / "upper"
        initrd = upper / "boot" / f"initrd.img-{kernel}"
        if not initrd.exists():
            raise RuntimeError(f"dom0-product: update-initramfs made no {initrd.name}")
        shutil.copy2(initrd, ctx.out / "initrd")
        # the mount points of the chroot's own mounts are empty folders in the upper layer
        _squash(ctx, upper, ctx.out / "xenubuntu.squashfs", "mksquashfs (product layer)",
                ["run/xenubuntu-debs", "run/xenubuntu-py"])
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=True)
        return {"kernel": kernel, "debs": [d.name for d in debs], "python_modules": [m.name for m in modules]}

    return cache.step("dom0-product", key, build)
