"""The product's Debian packages, built from a source tree as Debian builds them."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: not part of the source: the virtual environment, caches, build products
SKIP_TOP = {".git", ".venv", ".cache", "build", ".pytest_cache", ".hypothesis", ".mypy_cache"}
SKIP_ANY = {"__pycache__", "artifacts"}


#: the image's packages: the manager and the chooser on dom0's screen
PACKAGES = ("xsession", "xsession-gui")


def build_debs(source: Path, out: Path, packages: tuple[str, ...] = PACKAGES, timeout: float = 900) -> list[Path]:
    """Build the source tree's packages (``dpkg-buildpackage -us -uc -b`` in a copy of it)
    and copy the .deb files of ``packages`` to ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xsession-debs-") as tmp:
        src = Path(tmp) / "xsession"

        def ignore(folder: str, names: list[str]) -> set[str]:
            top = Path(folder) == source
            return {n for n in names if n in SKIP_ANY or (top and n in SKIP_TOP)}

        shutil.copytree(source, src, ignore=ignore, symlinks=True)
        env = {"PATH": SYSTEM_PATH, "LC_ALL": "C.UTF-8", "HOME": os.environ.get("HOME", "/root")}
        p = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, env=env, capture_output=True,
                           text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError("dpkg-buildpackage failed:\n" + "\n".join((p.stdout + p.stderr).splitlines()[-30:]))
        made = []
        for name in packages:
            debs = sorted(Path(tmp).glob(f"{name}_*.deb"))
            if not debs:
                raise RuntimeError(f"dpkg-buildpackage made no {name}_*.deb")
            dest = out / debs[-1].name
            shutil.copy2(debs[-1], dest)
            made.append(dest)
    return made
