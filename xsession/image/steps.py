"""Cached build steps: each has inputs, an output folder and a key (a hash of the inputs).

A step's output lives in ``CACHE/NAME-KEY/``. It is built in a temporary folder
beside it and renamed into place when complete, with a record (``step.json``)
of the files it made and their sizes. A step whose output exists and whose
record still matches the files on disk is skipped; a broken output (a file
missing or of another size, no record) is removed and built again. A lock per
step and key (``flock``) makes concurrent builders wait for each other instead
of building the same thing twice; the newest few outputs of each step are kept,
older ones are removed when nobody holds their lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .. import cachepruning

RECORD = "step.json"
KEEP = 2  # outputs kept per step (the current one included)

Report = Callable[[str], None]


class StepError(Exception):
    """A step failed; the message names the step and the tail of its log."""


def key_of(parts: Iterable[object]) -> str:
    """A short hash of the parts (strings, bytes, paths are hashed by content)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(b"file:" + str(part.name).encode() + b"\0")
            with open(part, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        elif isinstance(part, bytes):
            h.update(part)
        else:
            h.update(str(part).encode())
        h.update(b"\0\1")
    return h.hexdigest()[:16]


@dataclass
class StepContext:
    """What a step's build function gets: where to write and how to run commands."""

    name: str
    out: Path  # the temporary output folder (renamed into place on success)
    log: Path
    report: Report
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, argv: list[str], *, what: str = "", timeout: float = 3600, env: dict[str, str] | None = None,
            input: str | None = None) -> None:
        """Run a command with its output appended to the step's log; raise StepError on failure."""
        t0 = time.monotonic()
        if what:
            self.report(f"  {self.name}: {what}")
        with open(self.log, "a") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            full_env = {**os.environ, "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", **(env or {})}
            try:
                p = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=full_env,
                                   input=input, text=True)
            except subprocess.TimeoutExpired as e:
                raise StepError(f"{self.name}: {argv[0]} timed out after {timeout:.0f} s\n{tail(self.log)}") from e
        if what:
            self.timings[what] = round(time.monotonic() - t0, 1)
        if p.returncode != 0:
            raise StepError(f"{self.name}: {' '.join(argv[:3])} ... failed ({p.returncode})\n{tail(self.log)}")


def tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _files(folder: Path) -> dict[str, int]:
    """Every regular file below ``folder`` (symbolic links not followed) with its size."""
    out: dict[str, int] = {}
    for dirpath, _dirnames, filenames in os.walk(folder):
        for n in filenames:
            p = Path(dirpath, n)
            if p.is_symlink() or not p.is_file():
                continue
            rel = str(p.relative_to(folder))
            if rel != RECORD:
                out[rel] = p.stat().st_size
    return out


@dataclass(frozen=True)
class Output:
    """A finished step: its folder, its record, whether it was built this time."""

    name: str
    key: str
    path: Path
    built: bool
    seconds: float
    record: dict


def _intact(path: Path, checked: Iterable[str] | None) -> dict | None:
    """The record of a complete output, or None when it is missing or broken.

    ``checked``: the files whose size is compared with the record (all files of
    the record when None; a root file system has too many to stat quickly).
    """
    try:
        record = json.loads((path / RECORD).read_text())
    except (OSError, ValueError):
        return None
    files = record.get("files", {})
    for rel in (files if checked is None else checked):
        try:
            if (path / rel).stat().st_size != files[rel]:
                return None
        except (OSError, KeyError):
            return None
    return record


class StepCache:
    """Outputs of cached steps in one folder (machine-wide, outside any clone)."""

    def __init__(self, root: Path, report: Report = print):
        self.root = root
        self.report = report
        root.mkdir(parents=True, exist_ok=True)
        (root / "locks").mkdir(exist_ok=True)

    def step(self, name: str, key: str, build: Callable[[StepContext], dict | None], *,
             checked: Iterable[str] | None = None, record_files: bool = True) -> Output:
        """The output of step ``name`` for ``key``: from the cache, or built now.

        ``build`` writes into ``ctx.out`` and may return extra facts for the record.
        ``record_files=False`` records only the files named by ``checked`` (a root
        file system holds tens of thousands).
        """
        path = self.root / f"{name}-{key}"
        with open(self.root / "locks" / f"{name}-{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            t0 = time.monotonic()
            record = _intact(path, checked) if path.exists() else None
            if record is not None:
                os.utime(path)  # the newest used outputs are the ones kept
                self.report(f"{name}: cached ({key})")
                return Output(name, key, path, False, 0.0, record)
            if path.exists():
                self.report(f"{name}: the cached output {key} is incomplete or broken: building it again")
                _remove(path)
            tmp = self.root / f".{name}-{key}.tmp"
            _remove(tmp)
            tmp.mkdir()
            log = self.root / f"{name}-{key}.log"
            log.unlink(missing_ok=True)
            self.report(f"{name}: building ({key}) ...")
            ctx = StepContext(name=name, out=tmp, log=log, report=self.report)
            try:
                facts = build(ctx) or {}
            except BaseException:
                _remove(tmp)
                raise
            seconds = round(time.monotonic() - t0, 1)
            if record_files:
                files = _files(tmp)
            else:
                files = {rel: (tmp / rel).stat().st_size for rel in (checked or ())}
            record = {"step": name, "key": key, "seconds": seconds, "timings": ctx.timings,
                      "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files, **facts}
            (tmp / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            tmp.rename(path)
            self.report(f"{name}: built in {seconds:.0f} s")
        self._prune(name, path)
        return Output(name, key, path, True, seconds, record)

    def _prune(self, name: str, current: Path) -> None:
        """Remove all but the KEEP most recently used outputs of ``name`` that nobody is using."""
        for old in cachepruning.prune(self.root, name, current, self.report,
                                      lambda old: self.root / "locks" / f"{old.name}.lock", keep=KEEP, recent_s=0):
            (self.root / f"{old.name}.log").unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        cachepruning.remove_tree(path)  # a failed build's root file system: read-only folders, mounts
    else:
        path.unlink(missing_ok=True)
