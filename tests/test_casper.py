"""casper-scripts/xenubuntu, run as the initramfs runs it.

Each test builds a small initramfs-like tree: busybox (static) as every
command, initramfs-tools' real /scripts/functions, a stand-in
/scripts/casper-functions (casper is Ubuntu's and ships only inside an initrd;
its scripts rely on initramfs-tools' functions, which the stand-in loads), the
kernel command line as /proc/cmdline, the live system under /root and the
medium where casper or live-boot puts it. The script then runs under chroot,
so it sees exactly those paths.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xsession.bootopts import parse_cmdline

SCRIPT = Path(__file__).resolve().parent.parent / "casper-scripts" / "xenubuntu"
CASPER_FUNCTIONS = """\
# Stand-in for casper's library: the initramfs-tools functions it builds on.
. /scripts/functions
"""
CHROOT = "/usr/sbin/chroot"
MANIFEST = "format: 1\ndefault: ubuntu\nflavours: []\n"


def make_initramfs(top: Path, cmdline: str, *, casper: bool = True) -> Path:
    """A chroot-able tree shaped like a running initramfs; returns its root."""
    (top / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", top / "bin/busybox")
    subprocess.run([CHROOT, str(top), "/bin/busybox", "--install", "-s", "/bin"], check=True)
    (top / "proc").mkdir()
    (top / "proc/cmdline").write_text(cmdline + "\n")
    scripts = top / "scripts"
    (scripts).mkdir()
    shutil.copy("/usr/share/initramfs-tools/scripts/functions", scripts / "functions")
    where = "casper-bottom" if casper else "live-bottom"
    (scripts / where).mkdir()
    shutil.copy(SCRIPT, scripts / where / "xenubuntu")
    if casper:
        (scripts / "casper-functions").write_text(CASPER_FUNCTIONS)
    (top / "root/etc").mkdir(parents=True)
    return top


def put_medium(path: Path, with_manifest: bool) -> None:
    (path / "casper").mkdir(parents=True)
    if with_manifest:
        (path / "xenubuntu").mkdir()
        (path / "xenubuntu/manifest.yaml").write_text(MANIFEST)


def run_script(top: Path, *, casper: bool = True, username: str | None = None,
               arg: str = "") -> subprocess.CompletedProcess[str]:
    where = "casper-bottom" if casper else "live-bottom"
    env = "quiet=n rootmnt=/root PATH=/bin" + (f" USERNAME={username}" if username else "")
    return subprocess.run([CHROOT, str(top), "/bin/sh", "-c", f"{env} /scripts/{where}/xenubuntu {arg}"],
                          capture_output=True, text=True, timeout=30, env={})


def written(top: Path) -> set[str]:
    """The files under the live system's root, the medium aside."""
    return {str(p.relative_to(top / "root")) for p in (top / "root").rglob("*")
            if p.is_file() and not p.is_relative_to(top / "root/cdrom")}


def sourced(top: Path, name: str) -> str:
    """A value of boot.conf as a shell (and systemd's EnvironmentFile=) reads it."""
    out = subprocess.run([CHROOT, str(top), "/bin/sh", "-c", f'. /root/etc/xenubuntu/boot.conf; printf %s "${name}"'],
                         capture_output=True, text=True, check=True, env={})
    return out.stdout


def test_prereqs_answer(tmp_path: Path) -> None:
    top = make_initramfs(tmp_path / "initrd", "quiet")
    result = run_script(top, arg="prereqs")
    assert result.returncode == 0 and result.stdout.strip() == "" and result.stderr == ""
    assert written(top) == set()


@pytest.mark.parametrize("where", ["root/cdrom", "cdrom"])
def test_casper_medium_with_manifest(tmp_path: Path, where: str) -> None:
    cmdline = ('BOOT_IMAGE=/casper/vmlinuz boot=casper quiet splash xenubuntu.flavour=kubuntu '
               'xenubuntu.restore=eager "xenubuntu.medium=/media/my disk" xenubuntu.reserve=1G --')
    top = make_initramfs(tmp_path / "initrd", cmdline)
    put_medium(top / where, with_manifest=True)
    result = run_script(top, username="ubuntu")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == "Begin: Setting up the XenUbuntu session manager... ... done.\n"
    assert written(top) == {"etc/xenubuntu/boot.conf", "etc/lightdm/lightdm.conf.d/70-xenubuntu.conf"}

    assert sourced(top, "XENUBUNTU_MEDIUM") == "/cdrom"
    options = sourced(top, "XENUBUNTU_OPTIONS")
    assert options == ('xenubuntu.flavour=kubuntu xenubuntu.restore=eager '
                       '"xenubuntu.medium=/media/my disk" xenubuntu.reserve=1G')
    assert parse_cmdline(options) == parse_cmdline(cmdline)

    lightdm = (top / "root/etc/lightdm/lightdm.conf.d/70-xenubuntu.conf").read_text().splitlines()
    assert lightdm[1:] == ["[Seat:*]", "user-session=xenubuntu", "autologin-session=xenubuntu",
                           "autologin-user=ubuntu", "autologin-user-timeout=0"]


def test_live_boot_medium_without_casper(tmp_path: Path) -> None:
    top = make_initramfs(tmp_path / "initrd", "boot=live components quiet", casper=False)
    put_medium(top / "run/live/medium", with_manifest=True)
    result = run_script(top, casper=False)
    assert result.returncode == 0 and result.stderr == ""
    assert sourced(top, "XENUBUNTU_MEDIUM") == "/run/live/medium"
    assert sourced(top, "XENUBUNTU_OPTIONS") == ""
    lightdm = (top / "root/etc/lightdm/lightdm.conf.d/70-xenubuntu.conf").read_text()
    assert "autologin-session=xenubuntu" in lightdm and "autologin-user=" not in lightdm


def test_quiet_boot_prints_nothing(tmp_path: Path) -> None:
    top = make_initramfs(tmp_path / "initrd", "quiet")
    put_medium(top / "root/cdrom", with_manifest=True)
    result = subprocess.run([CHROOT, str(top), "/bin/sh", "-c",
                             "quiet=y rootmnt=/root /scripts/casper-bottom/xenubuntu"],
                            capture_output=True, text=True, timeout=30, env={})
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert "etc/xenubuntu/boot.conf" in written(top)


@pytest.mark.parametrize("casper", [True, False])
def test_other_medium_is_left_alone(tmp_path: Path, casper: bool) -> None:
    top = make_initramfs(tmp_path / "initrd", "boot=casper xenubuntu.flavour=kubuntu", casper=casper)
    put_medium(top / ("root/cdrom" if casper else "run/live/medium"), with_manifest=False)
    result = run_script(top, casper=casper, username="ubuntu")
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert written(top) == set()


@pytest.mark.parametrize("word", [
    "xenubuntu.medium=/a$HOME`id`b", "xenubuntu.medium=/back\\slash", "xenubuntu.sessions=a,b",
    'xenubuntu.medium="/x y"z', "xenubuntu.flavour='k'",
])
def test_awkward_options_reach_the_live_system_unchanged(tmp_path: Path, word: str) -> None:
    cmdline = f"quiet {word} xenubuntu.restore=off"
    top = make_initramfs(tmp_path / "initrd", cmdline)
    put_medium(top / "root/cdrom", with_manifest=True)
    assert run_script(top).returncode == 0
    assert parse_cmdline(sourced(top, "XENUBUNTU_OPTIONS")) == parse_cmdline(cmdline)


@pytest.fixture(scope="module")
def reused_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    top = make_initramfs(tmp_path_factory.mktemp("casper") / "initrd", "quiet")
    put_medium(top / "root/cdrom", with_manifest=True)
    return top


option_words = st.one_of(
    st.sampled_from(["quiet", "splash", "boot=casper", "xenubuntu.restore=off", "xenubuntu.restore",
                     "xenubuntu.flavour=kubuntu", 'xenubuntu.medium="/m n"', "xenubuntu.bogus=1", '"', "'"]),
    st.text(alphabet=' \t"\\$`=xenubtsoriumd./,', max_size=16),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(option_words, max_size=8).map(" ".join))
def test_passes_on_what_bootopts_reads(reused_tree: Path, cmdline: str) -> None:
    (reused_tree / "proc/cmdline").write_text(cmdline + "\n")
    assert run_script(reused_tree).returncode == 0
    assert parse_cmdline(sourced(reused_tree, "XENUBUNTU_OPTIONS")) == parse_cmdline(cmdline)
