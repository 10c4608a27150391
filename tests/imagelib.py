"""The bootable image in tests: the image, its Xen flavours and a machine that boots it.

The Xen flavours are the demo's (demo/flavours.yaml, built by
demo/build-guests.sh) as Xen PV domains, mastered in the image's own dom0 (a
statefile must be saved by the Xen the image carries).

:class:`Machine` boots the ISO as a CD in QEMU (TCG), from BIOS or EFI
firmware, and talks to it over the serial console: GRUB's menu, Xen's and the
kernels' messages, then a root shell (the test image has one on the serial
consoles). Every line is kept with the seconds since QEMU started; the log
goes to tests/artifacts/.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from xsession.image import dom0, iso
from xsession.image.build import DEFAULT_CACHE, Result, XenFlavours, build_image
from xsession.image.cli import SERIAL_DOM0, SERIAL_PLAIN, SERIAL_XEN, TCG_KERNEL, TCG_XEN
from xsession.image.debs import build_debs

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
#: one TCG machine at a time on this host, whichever test (or clone) boots it
MACHINE_LOCK = Path("/var/lock/xenubuntu-image-boot.lock")
#: Debian's EFI firmware for QEMU (package ovmf)
OVMF = Path("/usr/share/OVMF")


def demo_xen_flavours() -> XenFlavours:
    """The demo's busybox flavours (demo/flavours.yaml), built, to master as Xen PV domains."""
    guests = REPO / ".cache" / "guests"
    subprocess.run([str(REPO / "demo" / "build-guests.sh"), str(guests)], check=True, capture_output=True)
    return XenFlavours(spec=REPO / "demo" / "flavours.yaml", guests=guests)


def build_test_image(medium: Path | None, out: Path, report=print, verbose: str = "",
                     xen_flavours: XenFlavours | None = None) -> Result:
    """The product's .deb from this tree, then the image for a serial console under TCG, with a root shell.

    ``verbose``: words for both kernels' command lines (more messages on the console).
    ``xen_flavours`` instead of a medium: the medium is mastered in the image's own dom0."""
    debs = build_debs(REPO, out.parent / "debs")
    extra = iso.Extra(xen=f"{SERIAL_XEN} {TCG_XEN}", dom0=f"{SERIAL_DOM0} {TCG_KERNEL} {verbose}".strip(),
                      plain=f"{SERIAL_PLAIN} {TCG_KERNEL} {verbose}".strip(), serial=True)
    import qemu.qmp  # the QEMU backend's QMP library (no Debian package): the folder of "qemu"

    qmp = Path(qemu.qmp.__file__).resolve().parent.parent
    opts = dom0.Options(root_shell=True, python_modules=(qmp,))
    return build_image(medium, debs, out, cache_dir=DEFAULT_CACHE, opts=opts, extra=extra, report=report,
                       xen_flavours=xen_flavours)


class BootError(AssertionError):
    pass


class Machine:
    """QEMU (TCG) booting an ISO from its CD drive, driven over the serial console."""

    def __init__(self, iso_path: Path, name: str, memory_mib: int = 3072, firmware: str = "bios"):
        """``firmware``: ``bios`` (SeaBIOS) or ``efi`` (OVMF, with a fresh copy of its variables)."""
        self.log_path = ARTIFACTS / f"image-{name}.log"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.argv = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max,-smap,-erms",
                     "-smp", "2", "-m", str(memory_mib), "-display", "none", "-serial", "stdio",
                     "-monitor", "none", "-no-reboot",
                     "-drive", f"file={iso_path},media=cdrom,if=none,id=cd0,readonly=on",
                     "-device", "ide-cd,drive=cd0,bus=ide.0", "-boot", "d"]
        self._tmp = tempfile.TemporaryDirectory(prefix="xenubuntu-machine-")
        self.qmp_path = Path(self._tmp.name) / "qmp.sock"
        self.argv += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        self._vars: tempfile.TemporaryDirectory[str] | None = None
        if firmware == "efi":
            self._vars = tempfile.TemporaryDirectory(prefix="xenubuntu-ovmf-")
            vars_copy = Path(self._vars.name) / "OVMF_VARS.fd"
            shutil.copyfile(OVMF / "OVMF_VARS.fd", vars_copy)
            self.argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF / 'OVMF_CODE.fd'}",
                          "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
        elif firmware != "bios":
            raise ValueError(f"firmware {firmware!r}: bios or efi")
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
        if self._vars is not None:
            self._vars.cleanup()
        self._tmp.cleanup()

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

    def qmp(self, command: str, **arguments: object) -> object:
        """One QMP command on the machine's monitor; its ``return`` value."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(60)
            sock.connect(str(self.qmp_path))
            f = sock.makefile("rwb")

            def call(name: str, args: dict) -> object:
                f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "error" in reply:
                        raise BootError(f"QMP {name}: {reply['error']}")
                    if "return" in reply:
                        return reply["return"]

            json.loads(f.readline())  # the greeting
            call("qmp_capabilities", {})
            return call(command, dict(arguments))

    def screendump(self, path: Path) -> Path:
        """The whole machine's screen (its VGA) as a PNG."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.qmp("screendump", filename=str(path), format="png")
        return path

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
