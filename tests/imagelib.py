"""The bootable image in tests: a medium of Xen flavours, the image, and a machine that boots it.

The medium carries the demo flavours (demo/flavours.yaml, built by
demo/build-guests.sh) as Xen PV domains with no statefile: a statefile must be
saved by the Xen the image carries, so the session manager cold-boots them
from the medium's kernel and initrds. Its boot menu is the one mastering writes.

:class:`Machine` boots the ISO as a CD in QEMU (TCG) and talks to it over the
serial console: GRUB's menu, Xen's and the kernels' messages, then a root shell
(the test image has one on the serial consoles). Every line is kept with the
seconds since QEMU started; the log goes to tests/artifacts/.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import yaml

from xsession.image import dom0, iso
from xsession.image.build import DEFAULT_CACHE, Result, build_image
from xsession.image.cli import SERIAL_DOM0, SERIAL_PLAIN, SERIAL_XEN, TCG_KERNEL
from xsession.image.debs import build_debs
from xsession.manifest import (MANIFEST_RELPATH, ColdBoot, Flavour, MachineConfig, Manifest, load_manifest,
                               manifest_to_dict)
from xsession.mastering.grub import render_grub_cfg

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
#: one TCG machine at a time on this host, whichever test (or clone) boots it
MACHINE_LOCK = Path("/var/lock/xenubuntu-image-boot.lock")


def xen_medium(guests: Path, out: Path) -> Path:
    """A medium with the demo flavours as Xen PV domains that cold-boot (no statefile)."""
    spec = yaml.safe_load((REPO / "demo" / "flavours.yaml").read_text())
    root = out / "xenubuntu"
    (root / "pool").mkdir(parents=True, exist_ok=True)
    cmdline = " ".join(w for w in spec["cmdline"].split() if not w.startswith("console=")) + " console=hvc0"

    def pool(name: str) -> str:
        dest = root / "pool" / name
        if not dest.exists():
            os.link(guests / name, dest)
        return f"pool/{name}"

    flavours = []
    for f in spec["flavours"]:
        machine = MachineConfig(machine_type="pv", memory_mib=f["memory_mib"], vcpus=1, cpu="host", vga="none",
                                disk_bus="none")
        cold = ColdBoot(kernel=pool(spec["kernel"]), initrd=pool(f["initrd"]), cmdline=cmdline,
                        ready_line=f"XS-READY flavour={f['name']}", timeout_s=120.0)
        flavours.append(Flavour(name=f["name"], title=f["title"], priority=f["priority"], backend="xen",
                                machine=machine, disk=None, statefile=None, cold_boot=cold))
    manifest = Manifest(path=str(root / "manifest.yaml"), default=spec["default"], flavours=tuple(flavours))
    (out / MANIFEST_RELPATH).write_text(yaml.safe_dump(manifest_to_dict(manifest), sort_keys=False))
    manifest = load_manifest(out / MANIFEST_RELPATH)
    (out / iso.GRUB_CFG).parent.mkdir(parents=True, exist_ok=True)
    (out / iso.GRUB_CFG).write_text(render_grub_cfg(manifest))
    return out


def build_test_image(medium: Path, out: Path, report=print, verbose: str = "") -> Result:
    """The product's .deb from this tree, then the image for a serial console under TCG, with a root shell.

    ``verbose``: words for both kernels' command lines (more messages on the console)."""
    debs = build_debs(REPO, out.parent / "debs")
    extra = iso.Extra(xen=SERIAL_XEN, dom0=f"{SERIAL_DOM0} {TCG_KERNEL} {verbose}".strip(),
                      plain=f"{SERIAL_PLAIN} {TCG_KERNEL} {verbose}".strip(), serial=True)
    import qemu.qmp  # the QEMU backend's QMP library (no Debian package): the folder of "qemu"

    qmp = Path(qemu.qmp.__file__).resolve().parent.parent
    opts = dom0.Options(root_shell=True, python_modules=(qmp,))
    return build_image(medium, debs, out, cache_dir=DEFAULT_CACHE, opts=opts, extra=extra, report=report)


class BootError(AssertionError):
    pass


class Machine:
    """QEMU (TCG) booting an ISO from its CD drive, driven over the serial console."""

    def __init__(self, iso_path: Path, name: str, memory_mib: int = 3072):
        self.log_path = ARTIFACTS / f"image-{name}.log"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.argv = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max,-smap,-erms",
                     "-smp", "2", "-m", str(memory_mib), "-display", "none", "-serial", "stdio",
                     "-monitor", "none", "-no-reboot",
                     "-drive", f"file={iso_path},media=cdrom,if=none,id=cd0,readonly=on",
                     "-device", "ide-cd,drive=cd0,bus=ide.0", "-boot", "d"]
        self.lines: list[tuple[float, str]] = []
        self._partial = ""
        self._cond = threading.Condition()
        self._seen = 0  # lines before this index are consumed by expect()
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock_file = None

    def __enter__(self) -> Machine:
        self._lock_file = open(MACHINE_LOCK, "w")
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self._log = open(self.log_path, "w", encoding="utf-8", errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=10)
        self._log.close()
        if self._lock_file is not None:
            self._lock_file.close()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            data = os.read(fd, 4096)
            if not data:
                break
            text = self._partial + data.decode("utf-8", "replace")
            *complete, self._partial = text.split("\n")
            with self._cond:
                now = time.monotonic() - self.t0
                for raw in complete:
                    line = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.rstrip("\r").split("\r")[-1])
                    self.lines.append((now, line))
                    self._log.write(f"[{now:8.3f}] {line}\n")
                self._log.flush()
                self._cond.notify_all()
        with self._cond:
            if self._partial:
                self.lines.append((time.monotonic() - self.t0, self._partial))
            self._cond.notify_all()

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines[-n:])

    def _pending(self) -> str:
        """The unterminated last line (a prompt, a GRUB screen)."""
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self._partial)

    def expect(self, pattern: str, timeout: float, *, partial: bool = False) -> re.Match[str]:
        """Wait for a line matching ``pattern`` after the last match; return the match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(self._seen, len(self.lines)):
                    m = rx.search(self.lines[i][1])
                    if m:
                        self._seen = i + 1
                        return m
                if partial:
                    m = rx.search(self._pending())
                    if m:
                        return m
                assert self.proc is not None
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    why = "QEMU ended" if self.proc.poll() is not None else f"no {pattern!r} within {timeout:.0f} s"
                    raise BootError(f"{why}; log {self.log_path}; last lines:\n{self.tail()}")
                self._cond.wait(timeout=min(left, 1.0))

    def expect_any(self, pattern: str) -> re.Match[str] | None:
        """The first line so far matching ``pattern`` (consumed or not), or None."""
        rx = re.compile(pattern)
        with self._cond:
            return next((m for _, line in self.lines if (m := rx.search(line))), None)

    def when(self, pattern: str) -> float | None:
        """Seconds since QEMU started when a line first matched ``pattern``."""
        rx = re.compile(pattern)
        with self._cond:
            return next((t for t, line in self.lines if rx.search(line)), None)

    def send(self, text: str, pace: float = 0.02) -> None:
        """Type ``text`` on the serial console (slowly: the guest's UART has a small FIFO)."""
        assert self.proc is not None and self.proc.stdin is not None
        for ch in text:
            self.proc.stdin.write(ch.encode())
            self.proc.stdin.flush()
            time.sleep(pace)

    def shell(self, command: str, timeout: float = 120) -> str:
        """Run ``command`` in the root shell; its output (stdout and stderr)."""
        tag = f"{time.monotonic_ns() % 10**9}"
        # the markers are built by the shell, so the echoed command line never matches them
        self.send(f"echo @@BEGIN-$((1+{tag})); {command} 2>&1; echo @@END-$((1+{tag}))\r")
        begin = f"@@BEGIN-{1 + int(tag)}"
        self.expect(re.escape(begin) + "$", timeout)
        start = self._seen
        self.expect(re.escape(f"@@END-{1 + int(tag)}") + "$", timeout)
        with self._cond:
            return "\n".join(line for _, line in self.lines[start:self._seen - 1])
