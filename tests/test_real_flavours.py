"""The real flavours (Debian's Xfce, LXQt live ISO, Samba + Radicale server):
built through the machine-wide cache, and a damaged cache entry found and built
again. Booting them is tested where the manager does it: mastering boots each
once and waits for its agent, and tests/test_desktops.py restores them and
looks inside (mounts, services, the agent's user).

Builds take minutes the first time and seconds once cached. Boots run one at
a time: under TCG on two shared cores a desktop takes about a minute to its
session, so the waits below are generous but bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from xsession.demomedia import DEMO, REAL_FLAVOURS, ensure_real_flavour

BUILD = DEMO / "build-flavour.sh"


def progress(line: str) -> None:
    print(line, flush=True)


@pytest.fixture(scope="module", params=REAL_FLAVOURS)
def flavour(request) -> tuple[str, Path]:
    name = request.param
    return name, ensure_real_flavour(name, report=progress)


def manifest_entries(entry: Path) -> dict[str, tuple[str, int]]:
    lines = (entry / "MANIFEST").read_text().splitlines()
    assert lines[-1] == "# complete"
    return {name: (digest, int(size)) for digest, size, name in (line.split() for line in lines[:-1])}


def test_build(flavour):
    name, entry = flavour
    meta = json.loads((entry / "flavour.json").read_text())
    assert meta["name"] == name
    assert entry.name == f"{name}-{meta['key']}"
    assert meta["title"] and meta["description"].endswith(".")
    assert meta["memory_mib"] == {"xubuntu": 1024, "lubuntu": 1024, "server": 512}[name]
    assert "init_on_free=1" in meta["cmdline"] and "console=ttyS0" in meta["cmdline"]
    files = manifest_entries(entry)
    for key in ("kernel", "initrd", "disk" if meta["source"] == "disk" else "iso"):
        assert (entry / meta[key]).stat().st_size == files[meta[key]][1]
    if name == "lubuntu":
        assert meta["source"] == "iso" and meta["cmdline"].startswith("boot=live")
    else:
        assert meta["source"] == "disk" and meta["cmdline"].startswith("root=/dev/vda")
    # the recipe key did not change since the build: asking again finds it at once
    again = subprocess.run([str(BUILD), "--check", name], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(entry)


# --- booting ------------------------------------------------------------------------------

def test_damaged_cache_entry_is_built_again():
    name = "server"  # the quickest to rebuild
    entry = ensure_real_flavour(name, report=progress)
    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BUILD), "--check", name], capture_output=True, text=True, timeout=300)

    assert check().returncode == 0
    # without its completion stamp (the MANIFEST, written last) the entry does not count
    manifest = entry / "MANIFEST"
    saved = manifest.read_bytes()
    manifest.unlink()
    try:
        assert check().returncode != 0
    finally:
        manifest.write_bytes(saved)
    assert check().returncode == 0
    # a truncated file is found; the next build removes the entry and builds it again
    kernel = entry / "vmlinuz"
    size = kernel.stat().st_size
    # damaged as a new file: a medium mastered from this entry may share the old one (a link)
    damaged = kernel.with_name("vmlinuz.damaged")
    damaged.write_bytes(kernel.read_bytes()[:size // 2])
    os.replace(damaged, kernel)
    assert check().returncode != 0
    lines: list[str] = []
    again = ensure_real_flavour(name, report=lambda line: (lines.append(line), progress(line)))
    assert again == entry
    assert any("damaged" in line for line in lines), lines
    assert kernel.stat().st_size == size
    assert check().returncode == 0
