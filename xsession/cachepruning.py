"""Pruning the machine-wide build caches: the least recently used entries go.

Every change of a recipe makes a new entry (``NAME-KEY``) and leaves the old
one, a GB or more, so a machine that builds often would fill its disk. An entry
records its last use in its folder's modification time (:func:`mark_used`).
Of the entries of one kind, the newest :data:`KEEP_ENTRIES` stay, and so does
any used within :data:`KEEP_RECENT_S` (another clone on this machine may be
using it now). An entry whose lock file another builder holds is left alone.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KEEP_ENTRIES", "KEEP_RECENT_S", "Entry", "stale", "mark_used", "prune", "remove_tree"]

#: entries of one kind kept whatever their age
KEEP_ENTRIES = 3
#: an entry used this recently is kept whatever their number: a test run of another clone
#: on this machine (under an hour) may be using it
KEEP_RECENT_S = 2 * 3600.0


@dataclass(frozen=True)
class Entry:
    path: Path
    last_used: float


def stale(entries: list[Entry], current: Path, now: float, keep: int = KEEP_ENTRIES,
          recent_s: float = KEEP_RECENT_S) -> list[Entry]:
    """The entries to remove: beyond the ``keep`` most recently used (``current``, the
    one just asked for, among them), not used within ``recent_s``, never ``current``."""
    others = sorted((e for e in entries if e.path != current), key=lambda e: e.last_used, reverse=True)
    return [e for e in others[max(0, keep - 1):] if now - e.last_used > recent_s]


def mark_used(entry: Path) -> None:
    """Record that the entry was used now (best effort: a read-only cache stays as it is)."""
    try:
        os.utime(entry)
    except OSError:
        pass


def prune(cache: Path, kind: str, current: Path, report: Callable[[str], None] = lambda line: None,
          lock_file: Callable[[Path], Path] | None = None, *, keep: int = KEEP_ENTRIES,
          recent_s: float = KEEP_RECENT_S) -> list[Path]:
    """Remove the stale entries ``KIND-KEY`` (KEY: 12 to 64 hex digits) of ``cache``; returns them.

    ``lock_file`` names an entry's lock: an entry whose lock another process holds
    (it is being checked or built) is kept. Without it the caller holds the cache's lock.
    """
    pattern = re.compile(re.escape(kind) + r"-[0-9a-f]{12,64}")
    entries = []
    for path in cache.iterdir() if cache.is_dir() else ():
        if pattern.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            try:
                entries.append(Entry(path, path.stat().st_mtime))
            except OSError:
                continue
    now = time.time()
    removed = []
    for entry in stale(entries, current, now, keep, recent_s):
        if lock_file is None:
            remove_tree(entry.path)
        elif not _remove_unlocked(entry.path, lock_file(entry.path)):
            continue
        report(f"cache: removed {entry.path.name}, unused for {(now - entry.last_used) / 86400:.1f} days")
        removed.append(entry.path)
    return removed


def _remove_unlocked(path: Path, lock_file: Path) -> bool:
    """Remove ``path`` while holding its lock; False when another process holds it. The
    lock file stays: a builder waiting on it must share it with the next one."""
    try:
        fd = os.open(lock_file, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        if not path.exists():
            return False  # another pruner was first
        remove_tree(path)
        return True
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a folder, never crossing into another file system: a root file system that
    a failed build left may still hold a mount, and may hold read-only folders."""
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
