"""tools/qemu-backports: the backported QEMU, cached machine-wide, and what happens offline."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from xsession.demomedia import REPO, lazy_qemu

TOOL = REPO / "tools" / "qemu-backports"
#: a mirror that answers nothing (a closed port on loopback): apt cannot update
OFFLINE = "http://127.0.0.1:9/debian"


def _run(cache: Path, mirror: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XENUBUNTU_QEMU_CACHE=str(cache))
    if mirror is not None:
        env["XENUBUNTU_QEMU_MIRROR"] = mirror
    return subprocess.run([str(TOOL)], capture_output=True, text=True, env=env, timeout=600)


def test_the_cached_qemu_is_10_and_leaves_the_systems_alone():
    qemu = lazy_qemu()
    version = subprocess.run([qemu, "-version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("QEMU emulator version 10."), version
    system = subprocess.run(["qemu-system-x86_64", "-version"], capture_output=True, text=True, check=True).stdout
    assert system.startswith("QEMU emulator version 7.2"), system
    assert lazy_qemu() == qemu, "a second call uses the cache"


def test_offline_the_newest_complete_build_is_used(tmp_path: Path):
    cached = Path(lazy_qemu()).parent.parent
    shutil.copytree(cached, tmp_path / cached.name, symlinks=True)
    out = _run(tmp_path, OFFLINE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / cached.name / "bin")


def test_offline_with_nothing_cached_it_fails_and_says_why(tmp_path: Path):
    (tmp_path / "qemu-half").mkdir()  # a build that never completed is not used
    out = _run(tmp_path, OFFLINE)
    assert out.returncode != 0 and out.stdout == ""
    assert "cannot reach bookworm-backports and nothing is cached" in out.stderr, out.stderr
