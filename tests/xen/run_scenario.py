#!/usr/bin/env python3
"""Boot Xen 4.17 with our dom0 inside QEMU (TCG) and run one scenario in dom0.

The scenario is an executable (usually Python) that dom0's /init runs as
``/payload/scenario`` with ``PYTHONPATH=/payload``; the ``xsession`` package,
the test guest's kernel and initramfs (``/payload/guest/``) and any extra files
travel with it in a second cpio archive appended to dom0's initramfs (Linux
unpacks concatenated archives), so nothing needs 9p or a disk. What the
scenario prints reaches this side over the serial console; lines starting with
``@@`` are its results. The run has a hard timeout: QEMU is killed at the end.

TCG, because Xen cannot run on a KVM without real nested virtualisation, and
``-cpu max,-smap`` because with SMAP dom0 faults at once under TCG;
``spec-ctrl=eager-fpu`` because TCG raises no #NM for XSAVE, which Xen's lazy
FPU switching relies on (see ``xsession.image.cli.TCG_XEN``).

Usage by hand::

    tests/xen/run_scenario.py SCENARIO [--timeout S] [--log FILE] [--file DEST=SRC ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

#: Xen's own command line: serial console, a fixed-size dom0 with one vCPU, no reboot on a crash
XEN_ARGS = ("console=com1 com1=115200,8n1 dom0_mem={dom0}M,max:{dom0}M dom0_max_vcpus={vcpus} "
            "loglvl=all guest_loglvl=all noreboot spec-ctrl=eager-fpu")
DOM0_ARGS = "console=hvc0 earlyprintk=xen loglevel=4"


class ScenarioError(Exception):
    """The test host could not be built or booted, or the scenario did not finish."""


@dataclass
class ScenarioRun:
    """What one boot of the test host reported."""

    exit_code: int | None
    lines: list[str]
    log: Path
    wall_s: float
    results: list[dict] = field(default_factory=list)

    def result(self, name: str) -> dict:
        """The ``@@RESULT`` record called ``name``.

        :raises KeyError: the scenario did not report it (see the log).
        """
        for r in self.results:
            if r.get("name") == name:
                return r
        raise KeyError(f"the scenario reported no result {name!r}; see {self.log}")


def build_host() -> Path:
    """Build (or find in the cache) the test host's images; returns their folder.

    :raises ScenarioError: the build script failed.
    """
    p = subprocess.run([str(HERE / "build-host.sh")], capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise ScenarioError(f"build-host.sh failed ({p.returncode}): {p.stderr[-2000:]}")
    return Path(p.stdout.strip().splitlines()[-1])


def _payload(dest: Path, images: Path, scenario: Path, files: dict[str, Path]) -> None:
    """The cpio archive appended to dom0's initramfs."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "payload"
        shutil.copytree(ROOT / "xsession", root / "xsession",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (root / "guest").mkdir()
        shutil.copy(images / "vmlinuz", root / "guest" / "vmlinuz")
        shutil.copy(images / "guest.cpio.gz", root / "guest" / "guest.cpio.gz")
        shutil.copy(scenario, root / "scenario")
        (root / "scenario").chmod(0o755)
        for rel, src in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / rel)
        names = subprocess.run(["find", "payload"], cwd=tmp, capture_output=True, check=True).stdout
        with open(dest, "wb") as out:
            cpio = subprocess.Popen(["cpio", "--quiet", "-o", "-H", "newc"], cwd=tmp,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            gz = subprocess.Popen(["gzip", "-1"], stdin=cpio.stdout, stdout=out)
            assert cpio.stdin and cpio.stdout
            cpio.stdout.close()
            cpio.stdin.write(names)
            cpio.stdin.close()
            if cpio.wait() != 0 or gz.wait() != 0:
                raise ScenarioError("could not pack the payload")


def run_scenario(scenario: Path, files: dict[str, Path] | None = None, *, timeout: float = 600,
                 log: Path | None = None, memory_mib: int = 2048, dom0_mib: int = 640,
                 dom0_vcpus: int = 1, echo: bool = False) -> ScenarioRun:
    """Boot the test host, run ``scenario`` in dom0, return its ``@@`` lines.

    :raises ScenarioError: the host could not be built, QEMU failed to start,
        or the scenario did not finish within ``timeout`` seconds.
    """
    images = build_host()
    log = log or ROOT / "tests" / "artifacts" / f"xen-{scenario.stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xen-host-") as tmp:
        work = Path(tmp)
        shutil.copy(images / "xen", work / "xen")
        shutil.copy(images / "vmlinuz", work / "vmlinuz")
        _payload(work / "payload.cpio.gz", images, scenario, files or {})
        with open(work / "dom0.cpio.gz", "wb") as out:
            for part in (images / "dom0.cpio.gz", work / "payload.cpio.gz"):
                out.write(part.read_bytes())
        # multiboot modules: "file args" separated by commas, so relative names only
        argv = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max,-smap",
                "-smp", "2", "-m", str(memory_mib), "-display", "none", "-serial", "stdio",
                "-monitor", "none", "-no-reboot",
                "-kernel", "xen", "-append", XEN_ARGS.format(dom0=dom0_mib, vcpus=dom0_vcpus),
                "-initrd", f"vmlinuz {DOM0_ARGS},dom0.cpio.gz"]
        t0 = time.monotonic()
        lines: list[str] = []
        try:
            qemu = subprocess.Popen(argv, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
        except OSError as e:
            raise ScenarioError(f"cannot start QEMU: {e}") from e
        # freed below: QEMU is killed on every path out of this block
        timer = threading.Timer(timeout, qemu.kill)
        timer.start()
        exit_code: int | None = None
        try:
            assert qemu.stdout is not None
            with open(log, "w", encoding="utf-8", errors="replace") as lf:
                for raw in qemu.stdout:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n").split("\r")[-1]
                    stamped = f"[{time.monotonic() - t0:8.3f}] {line}"
                    lf.write(stamped + "\n")
                    lf.flush()
                    if echo:
                        print(stamped, flush=True)
                    if line.startswith("@@"):
                        lines.append(line)
                        if line.startswith("@@SCENARIO-EXIT"):
                            exit_code = int(line.split()[1])
            qemu.wait(timeout=30)
        finally:
            timer.cancel()
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
        wall = time.monotonic() - t0
    if exit_code is None:
        why = f"timed out after {timeout:.0f} s" if wall >= timeout else f"QEMU ended ({qemu.returncode})"
        raise ScenarioError(f"the scenario did not finish: {why}; see {log}")
    results = [json.loads(line.split(None, 1)[1]) for line in lines if line.startswith("@@RESULT ")]
    return ScenarioRun(exit_code, lines, log, wall, results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", type=Path)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--log", type=Path)
    ap.add_argument("--file", action="append", default=[], help="DEST=SRC: extra file under /payload")
    args = ap.parse_args()
    files = {d: Path(s) for d, s in (f.split("=", 1) for f in args.file)}
    try:
        run = run_scenario(args.scenario, files, timeout=args.timeout, log=args.log, echo=True)
    except ScenarioError as e:
        print(f"run_scenario: {e}", file=sys.stderr)
        return 2
    print(f"== scenario exit {run.exit_code}, wall time {run.wall_s:.1f} s, log {run.log}")
    return 0 if run.exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
