"""The Debian package, built as Debian builds it and checked as Debian would.

The tree is copied to a temporary folder and built there once for the module
with ``dpkg-buildpackage -us -uc -b`` (Debian's python3 first on the path,
whatever interpreter runs the tests), so no build product lands in the source
tree. lintian checks the result; ``dpkg-deb`` shows where every file goes and
what the packages declare; both packages are unpacked into a root shaped like
Debian 12's (merged /usr), where the installed commands run on Debian's
python3, every module is imported, and every Python module and GObject
typelib it loads is traced back (``dpkg -S``) to a package the control file
declares. ``systemd-analyze verify`` checks the installed unit, and the
installed generator's link is followed to it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VERSION = "0.1.0"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Not part of the source: the virtual environment, caches, build products.
SKIP_TOP = {".git", ".venv", ".cache", "build", ".pytest_cache", ".hypothesis", ".mypy_cache"}
SKIP_ANY = {"__pycache__", "artifacts"}

# What each package must ship, and which of those files are executable.
EXPECTED = {
    "xsession": {
        "/usr/libexec/xsessiond": True,
        "/usr/bin/xsessionctl": True,
        "/usr/bin/xsession-master": True,
        "/lib/systemd/system/xsessiond.service": False,
        "/usr/lib/systemd/system-generators/xenubuntu-generator": True,
        "/usr/share/dbus-1/system.d/org.xenubuntu.Sessions1.conf": False,
        "/usr/share/dbus-1/system-services/org.xenubuntu.Sessions1.service": False,
        "/usr/share/dbus-1/interfaces/org.xenubuntu.Sessions1.xml": False,
        "/usr/share/polkit-1/actions/org.xenubuntu.sessions1.policy": False,
        "/usr/lib/tmpfiles.d/xenubuntu.conf": False,
        "/usr/share/initramfs-tools/hooks/xenubuntu": True,
        "/usr/share/initramfs-tools/scripts/casper-bottom/xenubuntu": True,
        "/usr/share/initramfs-tools/scripts/live-bottom/xenubuntu": True,
        "/usr/lib/python3/dist-packages/xsession/__init__.py": False,
        "/usr/lib/python3/dist-packages/xsession/daemon.py": False,
        "/usr/lib/python3/dist-packages/xsession/org.xenubuntu.Sessions1.xml": False,
        "/usr/lib/python3/dist-packages/xsession/hypervisor/qemu.py": False,
        "/usr/lib/python3/dist-packages/xsession/mastering/cli.py": False,
        f"/usr/lib/python3/dist-packages/xsession-{VERSION}.dist-info/METADATA": False,
        "/usr/share/doc/xsession/boot.md": False,  # the unit's Documentation=
        "/usr/share/doc/xsession/README.Debian": False,
        "/usr/share/doc/xsession/copyright": False,
        "/usr/share/man/man1/xsessionctl.1.gz": False,
        "/usr/share/man/man1/xsession-master.1.gz": False,
        "/usr/share/man/man8/xsessiond.8.gz": False,
    },
    "xsession-gui": {
        "/usr/bin/xsession-gui": True,
        "/usr/share/xsessions/xenubuntu.desktop": False,
        "/usr/lib/python3/dist-packages/xsession/gui/window.py": False,
        "/usr/share/doc/xsession-gui/copyright": False,
        "/usr/share/man/man1/xsession-gui.1.gz": False,
    },
}
DEPENDS = {
    "xsession": {"python3-gi", "gir1.2-glib-2.0", "python3-pyudev", "python3-systemd", "python3-yaml",
                 "qemu-system-x86", "qemu-utils", "zstd", "dbus", "polkitd",
                 # installing a flavour onto a disk (xsession.install)
                 "gdisk", "dosfstools", "e2fsprogs", "mtools", "grub2-common", "grub-pc-bin", "grub-efi-amd64-bin"},
    "xsession-gui": {"xsession", "python3-gi", "gir1.2-gtk-3.0", "gir1.2-gtk-vnc-2.0"},
}


def run(cmd: list[str | os.PathLike[str]], timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,  # type: ignore[call-overload]
                          timeout=timeout, **kw)


def system_env(**extra: str) -> dict[str, str]:
    """A plain system's environment: Debian's programs, none of the test runner's Python settings."""
    env = {"PATH": SYSTEM_PATH, "LC_ALL": "C.UTF-8", "HOME": os.environ.get("HOME", "/root")}
    return env | extra


def copy_tree(dest: Path) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == REPO
        return {n for n in names if n in SKIP_ANY or n.endswith(".egg-info") or (top and n in SKIP_TOP)}
    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)


@dataclass
class Built:
    out: Path                 # where dpkg-buildpackage left its products
    debs: dict[str, Path]     # package -> .deb
    changes: Path
    log: str
    root: Path                # both packages unpacked, merged /usr


def unpack_merged(debs: list[Path], root: Path) -> None:
    """Debian 12's layout: /bin, /sbin and /lib are links into /usr."""
    for sub in ("bin", "sbin", "lib"):
        (root / "usr" / sub).mkdir(parents=True, exist_ok=True)
        (root / sub).symlink_to(f"usr/{sub}")
    for deb in debs:
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        untar = run(["tar", "-x", "--keep-directory-symlink", "-C", root], stdin=tar.stdout)
        assert tar.wait() == 0 and untar.returncode == 0, untar.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("deb")
    src = out / "xsession"
    copy_tree(src)
    made = run(["dpkg-buildpackage", "-us", "-uc", "-b"], timeout=600, cwd=src, env=system_env())
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    debs = {name: out / f"{name}_{VERSION}_all.deb" for name in EXPECTED}
    for deb in debs.values():
        assert deb.is_file(), sorted(p.name for p in out.iterdir())
    changes = next(out.glob(f"xsession_{VERSION}_*.changes"))
    root = out / "root"
    unpack_merged(list(debs.values()), root)
    return Built(out, debs, changes, made.stdout + made.stderr, root)


def test_lintian_finds_no_error_and_no_warning(built: Built) -> None:
    """Errors fail the package; warnings too: there are none, and an override
    must carry a comment saying why."""
    result = run(["lintian", "--pedantic", "--display-info", built.changes], timeout=300, env=system_env())
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert not tags, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def contents(deb: Path) -> dict[str, str]:
    """Every path in the package (leading "." dropped) and its mode string."""
    listing = run(["dpkg-deb", "-c", deb])
    assert listing.returncode == 0, listing.stderr
    files = {}
    for line in listing.stdout.splitlines():
        mode, *_, name = line.split(None, 5)
        files[name.split(" -> ")[0].lstrip(".").rstrip("/") or "/"] = mode
    return files


@pytest.mark.parametrize("package", sorted(EXPECTED))
def test_every_file_is_where_debian_expects(built: Built, package: str) -> None:
    files = contents(built.debs[package])
    for path, executable in EXPECTED[package].items():
        assert path in files, f"{package} lacks {path}"
        mode = files[path]
        assert mode.startswith("-"), (path, mode)
        assert (mode[3] == "x") is executable, (path, mode)
    for path, mode in files.items():
        assert not path.startswith(("/usr/local", "/etc", "/usr/lib/python3.")), path
        if path.startswith("/usr/bin/") or path.startswith("/usr/libexec/"):
            assert mode == "-rwxr-xr-x", (path, mode)


def test_the_packages_share_no_file_and_split_the_python_package(built: Built) -> None:
    core, gui = (contents(built.debs[p]) for p in ("xsession", "xsession-gui"))
    shared = {p for p in set(core) & set(gui) if not core[p].startswith("d")}
    assert not shared
    gui_py = {p for p in gui if p.endswith(".py")}
    assert gui_py and all(p.startswith("/usr/lib/python3/dist-packages/xsession/gui/") for p in gui_py)
    assert not any("/xsession/gui/" in p for p in core)
    # the demo is a tool of the source tree, not a command of an installed system
    assert "/usr/bin/xsession-demo" not in core and "/usr/bin/xsessiond" not in core


def field(deb: Path, name: str) -> str:
    got = run(["dpkg-deb", "-f", deb, name])
    assert got.returncode == 0, got.stderr
    return got.stdout.strip()


def relation_names(value: str) -> set[str]:
    """Package names of a Depends-like field (every alternative)."""
    names = set()
    for clause in value.split(","):
        for alt in clause.split("|"):
            if alt.strip():
                names.add(alt.split()[0].split(":")[0])
    return names


def test_dependencies_are_declared(built: Built) -> None:
    for package, needed in DEPENDS.items():
        depends = relation_names(field(built.debs[package], "Depends"))
        assert needed <= depends, needed - depends
        assert "python3" in depends
        assert field(built.debs[package], "Architecture") == "all"
    core = built.debs["xsession"]
    assert {"xen-utils", "xsession-gui"} <= relation_names(field(core, "Recommends"))
    # qemu.qmp has no Debian package: neither declared (apt could never satisfy
    # it) nor hidden; README.Debian says what needs it and how to add it.
    declared = field(core, "Depends") + field(core, "Recommends") + field(core, "Suggests")
    assert "qmp" not in declared
    readme = (built.root / "usr/share/doc/xsession/README.Debian").read_text()
    assert "qemu.qmp" in readme and "Xen" in readme


def test_maintainer_scripts_leave_starting_to_the_generator(built: Built, tmp_path: Path) -> None:
    control = tmp_path / "control"
    got = run(["dpkg-deb", "-e", built.debs["xsession"], control])
    assert got.returncode == 0, got.stderr
    postinst = (control / "postinst").read_text()
    assert "deb-systemd-invoke try-restart 'xsessiond.service'" in postinst   # only if running
    assert "deb-systemd-invoke start" not in postinst and "deb-systemd-helper enable" not in postinst
    assert "systemd-tmpfiles" in postinst and "xenubuntu.conf" in postinst
    assert not (control / "preinst").exists()  # no stop before an upgrade: try-restart after it
    assert "deb-systemd-invoke stop xsessiond.service" in (control / "prerm").read_text()
    assert "activate-noawait update-initramfs" in (control / "triggers").read_text()


def installed(built: Built, *cmd: str | Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = system_env(PYTHONPATH=str(built.root / "usr/lib/python3/dist-packages"), **extra)
    return run(list(cmd), env=env, cwd=built.out)


@pytest.mark.parametrize("command", ["usr/bin/xsessionctl", "usr/bin/xsession-master", "usr/libexec/xsessiond",
                                     "usr/bin/xsession-gui"])
def test_installed_commands_run_on_debians_python(built: Built, command: str) -> None:
    script = built.root / command
    assert script.read_text().splitlines()[0] == "#!/usr/bin/python3"
    result = installed(built, script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script.name}"), result.stdout


# Run by Debian's python3 inside the unpacked root: imports every module of the
# package and prints where each module it loaded and each typelib came from.
IMPORT_ALL = r"""
import sys
at_start = set(sys.modules)  # the interpreter's own start (site, .pth hooks), not ours
import importlib, json, pkgutil
import xsession
need_qmp = {"xsession.hypervisor.qmp", "xsession.hypervisor.qemu", "xsession.hypervisor.qemuguest"}
try:
    import qemu.qmp
    have_qmp = True
except ImportError:
    have_qmp = False
imported, left, why = [], [], ""
for mod in pkgutil.walk_packages(xsession.__path__, "xsession."):
    if mod.name.endswith(".__main__"):  # runs its program when imported
        continue
    if mod.name in need_qmp and not have_qmp:
        left.append(mod.name)
        try:
            importlib.import_module(mod.name)
        except ModuleNotFoundError as e:
            why = str(e)
        continue
    importlib.import_module(mod.name)
    imported.append(mod.name)
import gi
from gi.repository import GIRepository
repo = GIRepository.Repository.get_default()
typelibs = [repo.get_typelib_path(ns) for ns in repo.get_loaded_namespaces()]
files = sorted({f for n, m in list(sys.modules.items())
                 if n not in at_start and (f := getattr(m, "__file__", None) or "").startswith("/")})
print(json.dumps({"package": xsession.__file__, "imported": imported, "left": left,
                  "files": files, "typelibs": typelibs, "have_qmp": have_qmp, "why": why}))
"""


def owners(paths: list[str]) -> dict[str, str]:
    """The Debian package each file belongs to (one dpkg -S for all)."""
    got = run(["dpkg", "-S", *paths])
    found = {}
    for line in got.stdout.splitlines():
        pkgs, _, path = line.partition(": ")
        if not pkgs.startswith("diversion by"):
            found[path] = pkgs.split(",")[0].strip().split(":")[0]
    missing = [p for p in paths if p not in found]
    assert not missing, f"no Debian package owns {missing}: {got.stderr}"
    return found


def depends_closure(roots: set[str]) -> set[str]:
    """The installed packages reached from ``roots`` through Depends and Pre-Depends
    (only python3-*, gir1.2-* and libpython3* ones are followed: what imports load)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        pkg = todo.pop()
        if pkg in seen:
            continue
        seen.add(pkg)
        got = run(["dpkg-query", "-W", "-f=${Depends}, ${Pre-Depends}", pkg])
        if got.returncode != 0:
            continue
        todo += [n for n in relation_names(got.stdout) if n.startswith(("python3", "gir1.2-", "libpython3"))]
    return seen


def test_every_module_imports_with_what_the_packages_declare(built: Built) -> None:
    result = installed(built, "/usr/bin/python3", "-c", IMPORT_ALL, GI_TYPELIB_PATH="")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    dist = built.root / "usr/lib/python3/dist-packages"
    assert report["package"] == str(dist / "xsession/__init__.py")
    assert "xsession.daemon" in report["imported"] and "xsession.hypervisor.xen" in report["imported"]
    assert "xsession.gui.window" in report["imported"] and "xsession.ctl" in report["imported"]
    assert "xsession.mastering.cli" in report["imported"]  # Xen mastering needs no QMP
    if not report["have_qmp"]:  # the gap README.Debian describes, named when it bites, and nothing else
        assert set(report["left"]) == {"xsession.hypervisor.qmp", "xsession.hypervisor.qemu",
                                       "xsession.hypervisor.qemuguest"}
        assert "qemu.qmp" in report["why"], report["why"]

    declared = set()
    for package in DEPENDS:
        declared |= relation_names(field(built.debs[package], "Depends"))
    allowed = depends_closure(declared | {"python3"})
    outside = [f for f in report["files"] + report["typelibs"] if not f.startswith(str(built.root))]
    assert any("/gi/" in f for f in outside) and any("GtkVnc" in f for f in outside)
    # /usr/local holds what pip installed by hand (README.Debian): no package of ours may need it
    found = owners([f for f in outside if not f.startswith("/usr/local/")])
    # the interpreter's own library belongs to libpython3.11-stdlib and its kin
    undeclared = {f: p for f, p in found.items() if p not in allowed and not p.startswith("libpython3")}
    assert not undeclared, undeclared


def test_installed_unit_verifies_and_the_generator_links_it(built: Built, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(built.root, root, symlinks=True)
    for unit in Path("/usr/lib/systemd/system").iterdir():  # dbus.socket, multi-user.target, ...
        dest = root / "usr/lib/systemd/system" / unit.name
        if not dest.exists() and not dest.is_symlink():
            if unit.is_symlink():
                dest.symlink_to(os.readlink(unit))
            elif unit.is_file():
                shutil.copy(unit, dest)
    shutil.copy("/bin/sh", root / "usr/bin/sh")
    result = run(["systemd-analyze", "verify", f"--root={root}", "xsessiond.service"])
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stderr

    out = tmp_path / "generated"
    out.mkdir()
    gen = run([root / "usr/lib/systemd/system-generators/xenubuntu-generator", out, out, out],
              env=system_env(XENUBUNTU_CMDLINE="quiet xenubuntu.restore=lazy"))
    assert gen.returncode == 0, gen.stderr
    link = out / "multi-user.target.wants/xsessiond.service"
    target = os.readlink(link)
    assert target.startswith("/") and (root / target.lstrip("/")).resolve().is_file(), target
