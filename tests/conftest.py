"""Shared fixtures: the demo medium (built once, cached), per-test copies of it,
short runtime folders, engines that always end, and logs kept for failed tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xsession.demo import ensure_demo_medium
from xsession.manifest import MANIFEST_RELPATH, Manifest, load_manifest

from .guestlib import qemu_pids_under

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Stash each phase's report so fixtures can keep logs of failed tests only."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="session")
def demo_medium() -> Path:
    """The demo medium (four flavours), built once and cached under .cache/."""
    return ensure_demo_medium(report=lambda line: None)


@pytest.fixture
def medium(demo_medium: Path, tmp_path: Path) -> Path:
    """A private copy of the demo medium that a test may damage: hard links for
    everything, so a test must replace (not modify in place) a file it damages;
    :func:`guestlib.damage` does that."""
    copy = tmp_path / "medium"
    shutil.copytree(demo_medium, copy, copy_function=os.link)
    return copy


@pytest.fixture
def manifest(medium: Path) -> Manifest:
    return load_manifest(medium / MANIFEST_RELPATH)


@pytest.fixture
def runtime_dir(request) -> Iterator[Path]:
    """A short runtime folder (unix socket paths are limited to 107 bytes).

    On failure its logs (consoles, QEMU output) are kept in tests/artifacts/.
    Afterwards no QEMU may survive that was started under it.
    """
    path = Path(tempfile.mkdtemp(prefix="xst-"))
    yield path
    failed = any(getattr(request.node, f"rep_{w}", None) is not None and getattr(request.node, f"rep_{w}").failed
                 for w in ("setup", "call"))
    if failed:
        dest = ARTIFACTS / request.node.name
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True, exist_ok=True)
        for log in path.rglob("*.log"):
            shutil.copy(log, dest / f"{log.parent.name}-{log.name}")
    leftovers = qemu_pids_under(path)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)
    assert not leftovers, f"QEMU processes left behind: {leftovers}"


@pytest.fixture
def make_engine(runtime_dir: Path):
    """Engines built by a test; all shut down (guests stopped) at teardown."""
    from xsession.bootopts import parse_cmdline
    from xsession.engine import Engine
    from xsession.hypervisor.qemu import QemuBackend

    engines = []

    def make(manifest: Manifest, cmdline: str = "", **kw) -> Engine:
        engine = Engine(manifest, QemuBackend(), runtime_dir, parse_cmdline(cmdline), **kw)
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        e.shutdown(stop_guests=True)
