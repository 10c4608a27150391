"""Shared fixtures: the demo medium (built once, cached), per-test copies of it,
short runtime folders, engines that always end, and logs kept for failed tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from xsession.demomedia import ensure_demo_medium
from xsession.manifest import MANIFEST_RELPATH, Manifest, load_manifest

from .guestlib import qemu_pids_under
from .netlib import Netns

ARTIFACTS = Path(__file__).parent / "artifacts"


def pytest_configure(config):
    """Tests keep pictures, logs and records here, whichever of them runs first."""
    ARTIFACTS.mkdir(exist_ok=True)


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


@pytest.fixture(scope="session")
def desktop_medium() -> Path:
    """The medium of the real flavours (machine-wide cache; built and mastered the first
    time, which takes several minutes, see ``xsession.demomedia``)."""
    from xsession.demomedia import ensure_desktop_medium
    return ensure_desktop_medium(report=lambda line: None)


@pytest.fixture
def dom0() -> Iterator[Netns]:
    """A network namespace of the test's own, where a manager sets up dom0's network."""
    ns = Netns("dom0")
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def medium(demo_medium: Path, tmp_path: Path) -> Path:
    """A private copy of the demo medium that a test may damage: hard links for
    everything, so a test must replace (not modify in place) a file it damages;
    :func:`guestlib.damage` does that."""
    return linked_copy(demo_medium, tmp_path / "medium")


def linked_copy(medium: Path, dest: Path) -> Path:
    """A copy of a medium made of hard links: cheap, and a test that damages a file
    replaces it (:func:`guestlib.damage`), so the original stays whole."""
    shutil.copytree(medium, dest, copy_function=os.link)
    return dest


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

    def make(manifest: Manifest, cmdline: str = "", backend: QemuBackend | None = None, **kw) -> Engine:
        engine = Engine(manifest, backend or QemuBackend(), runtime_dir, parse_cmdline(cmdline), **kw)
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        e.shutdown(stop_guests=True)


# --- D-Bus: a private system-like bus, polkitd on it, xsessiond as its own process ----------

@pytest.fixture
def private_bus(tmp_path: Path) -> Iterator[str]:
    """A dbus-daemon with the system bus's policy (ours and polkit's included); its address.

    Its own log is kept with the test's artifacts on failure.
    """
    from .buslib import system_like_config

    folder = tmp_path / "bus"
    folder.mkdir()
    config = system_like_config(folder)
    log = open(folder / "dbus-daemon.log", "wb")  # closed below
    bus = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address"],
                           stdout=subprocess.PIPE, stderr=log)
    try:
        assert bus.stdout is not None
        address = bus.stdout.readline().decode().strip()
        assert address, "dbus-daemon printed no address"
        yield address
    finally:
        bus.terminate()
        bus.wait(10)
        log.close()


@pytest.fixture
def client(private_bus: str):
    """A client of the private bus (a GDBus connection of the test's own)."""
    from .buslib import Client

    c = Client(private_bus)
    yield c
    c.close()


@pytest.fixture
def polkitd(private_bus: str, tmp_path: Path) -> Iterator[str]:
    """The real polkitd on the private bus, knowing our actions and one test rule
    (``buslib.HELPER_USER`` may manage sessions). Yields the bus address."""
    from .buslib import polkit_command, wait_for_name

    assert os.geteuid() == 0, "polkitd and setpriv need root"
    log = open(tmp_path / "polkitd.log", "wb")  # closed below
    proc = subprocess.Popen(polkit_command(tmp_path), stdout=log, stderr=log,
                            env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=private_bus))
    try:
        wait_for_name(private_bus, "org.freedesktop.PolicyKit1")
        yield private_bus
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def xsessiond(private_bus: str, runtime_dir: Path, medium: Path):
    """Start xsessiond processes on the private bus; each is ended at teardown (SIGTERM,
    guests stopped unless started with ``stop_guests=False``; those the next daemon adopts)."""
    from .buslib import start_daemon

    daemons = []

    def start(cmdline: str = "xenubuntu.restore=off", *, medium_path: Path | None = None, stop_guests: bool = True,
              wait: bool = True, extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
              wrap: tuple[str, ...] = ()):
        d = start_daemon(private_bus, runtime_dir, medium_path or medium, cmdline, stop_guests=stop_guests,
                         extra=extra, env_extra=env, wrap=wrap)
        daemons.append(d)
        if wait:
            d.wait_ready()
        return d

    yield start
    for d in daemons:
        d.terminate()


# --- the front-end: one Xvfb for the whole run ----------------------------------------

@pytest.fixture(scope="session")
def xdisplay(tmp_path_factory) -> str:
    """Xvfb for the whole run (GTK cannot let go of a display and take another), GTK on it."""
    log = tmp_path_factory.mktemp("xvfb") / "xvfb.log"
    from .guilib import start_xvfb

    proc, display = start_xvfb(log)
    os.environ["DISPLAY"] = display
    os.environ["NO_AT_BRIDGE"] = "1"    # no accessibility bus here: do not look for one
    import gi
    gi.require_version("Gtk", "3.0")
    gi.require_version("Gdk", "3.0")
    from gi.repository import Gdk, Gtk
    ok, _ = Gtk.init_check([])
    assert ok and Gdk.Display.get_default() is not None, f"GTK cannot open {display}"
    yield display
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def loops(tmp_path: Path):
    """Loop devices over sparse files of the sizes asked (MiB), detached at teardown."""
    made: list[tuple[str, Path]] = []

    def make(size_mib: int) -> tuple[str, Path]:
        image = tmp_path / f"target{len(made)}.img"
        with open(image, "wb") as f:
            f.truncate(size_mib * 2**20)
        dev = subprocess.run(["losetup", "--find", "--show", "--partscan", str(image)], check=True,
                             capture_output=True, text=True).stdout.strip()
        made.append((dev, image))
        return dev, image

    yield make
    for dev, _ in made:
        subprocess.run(["losetup", "--detach", dev], capture_output=True)
