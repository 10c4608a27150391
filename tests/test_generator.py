"""xenubuntu-generator, run as systemd runs it: three output folders, the
kernel command line from XENUBUNTU_CMDLINE in place of /proc/cmdline.

The generator is a shell script for speed at boot, so it has its own reading
of the command line; hypothesis checks that it decides exactly as
:func:`xsession.bootopts.parse_cmdline` does on command lines built to be hard.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xsession.bootopts import RestorePolicy, parse_cmdline

GENERATOR = Path(__file__).resolve().parent.parent / "units" / "xenubuntu-generator"
WANTS = Path("multi-user.target.wants") / "xsessiond.service"
SHELLS = ["/bin/sh", "busybox sh"]  # dash, as systemd runs it, and the initramfs' shell


def generate(out: Path, cmdline: str | None, shell: str = "/bin/sh") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "XENUBUNTU_CMDLINE"}
    if cmdline is not None:
        env["XENUBUNTU_CMDLINE"] = cmdline
    dirs = [out / "normal", out / "early", out / "late"]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    return subprocess.run([*shell.split(), str(GENERATOR), *map(str, dirs)], env=env,
                          capture_output=True, text=True, timeout=10)


def pulled_in(out: Path) -> bool:
    link = out / "normal" / WANTS
    if not link.is_symlink():
        assert not (out / "normal" / "multi-user.target.wants").exists()
        return False
    assert os.readlink(link) == "/usr/lib/systemd/system/xsessiond.service"
    return True


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(("cmdline", "starts"), [
    ("BOOT_IMAGE=/casper/vmlinuz boot=casper quiet splash xenubuntu.restore=eager", True),
    ("boot=casper xenubuntu.restore=lazy", True),
    ("boot=casper xenubuntu.restore=off", False),
    ("boot=casper xenubuntu.restore=OFF\n", False),
    ('boot=casper "xenubuntu.restore=off"', False),
    ("boot=casper quiet splash", True),                        # missing: lazy
    ("", True),
    ("boot=casper xenubuntu.restore=sometimes", True),         # malformed: lazy, with a warning
    ("boot=casper xenubuntu.restore=", True),
    ("boot=casper xenubuntu.restore=off xenubuntu.restore", True),  # the last one decides
    ("xenubuntu.restore=eager xenubuntu.restore=off", False),
    ("xenubuntu.restore=off=now", True),
    ('title="xenubuntu.restore=off here" quiet', True),        # inside a quoted word: no option
    ("xenubuntu.restored=off", True),
])
def test_restore_values(tmp_path: Path, shell: str, cmdline: str, starts: bool) -> None:
    result = generate(tmp_path, cmdline, shell)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert pulled_in(tmp_path) is starts
    assert (parse_cmdline(cmdline).restore is not RestorePolicy.OFF) is starts  # the same as the daemon
    assert not any(any((tmp_path / d).iterdir()) for d in ("early", "late"))


def test_reads_proc_cmdline_without_the_override(tmp_path: Path) -> None:
    result = generate(tmp_path, None)
    assert result.returncode == 0 and result.stderr == ""
    starts = parse_cmdline(Path("/proc/cmdline").read_text()).restore is not RestorePolicy.OFF
    assert pulled_in(tmp_path) is starts


def test_run_twice_is_harmless(tmp_path: Path) -> None:
    assert generate(tmp_path, "quiet").returncode == 0
    assert generate(tmp_path, "quiet").returncode == 0
    assert pulled_in(tmp_path)


def test_never_fails_the_boot(tmp_path: Path) -> None:
    """No output folder it can write: it says nothing and exits 0."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    for args in ([], [str(blocker), str(blocker), str(blocker)]):
        result = subprocess.run(["/bin/sh", str(GENERATOR), *args], env={"XENUBUNTU_CMDLINE": "quiet"},
                                capture_output=True, text=True, timeout=10)
        assert result.returncode == 0 and result.stderr == ""


words = st.one_of(
    st.sampled_from(["quiet", "splash", "xenubuntu.restore", "xenubuntu.restore=", "xenubuntu.restore=off",
                     "xenubuntu.restore=OfF", "xenubuntu.restore=lazy", "xenubuntu.restore=eager",
                     "xenubuntu.restore=offf", 'xenubuntu.restore="off"', '"xenubuntu.restore=off', '"',
                     "a=\"b", "x\"y z\"", "xenubuntu.restore=o\"f\"f", "*", "[", "\\", "'", "$HOME"]),
    st.text(alphabet=' \t"=xenubtsorfOF.\\*', max_size=12),
)
separators = st.sampled_from([" ", "  ", "\t", "\n", " \r "])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(words, separators), max_size=8))
def test_decides_as_bootopts_does(parts: list[tuple[str, str]]) -> None:
    cmdline = "".join(w + s for w, s in parts)
    with tempfile.TemporaryDirectory() as tmp:
        result = generate(Path(tmp), cmdline)
        assert result.returncode == 0 and result.stderr == ""
        assert pulled_in(Path(tmp)) is (parse_cmdline(cmdline).restore is not RestorePolicy.OFF)
