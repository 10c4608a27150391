"""Pruning the machine-wide caches: the decision (fuzzed) and the removal on real
folders and real locks."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from hypothesis import given, strategies as st

from xsession.cachepruning import KEEP_ENTRIES, KEEP_RECENT_S, Entry, mark_used, prune, stale

DAY = 86400.0
NOW = 1_800_000_000.0


@given(st.lists(st.floats(min_value=0, max_value=60 * DAY), max_size=12), st.integers(min_value=0, max_value=11),
       st.integers(min_value=1, max_value=5))
def test_stale_never_takes_the_current_a_recent_or_one_of_the_newest(ages, current_index, keep):
    entries = [Entry(Path(f"/c/x-{i:012x}"), NOW - age) for i, age in enumerate(ages)]
    current = entries[current_index].path if current_index < len(entries) else Path("/c/x-ffffffffffff")
    gone = stale(entries, current, NOW, keep)
    assert set(gone) <= set(entries)
    assert all(e.path != current and NOW - e.last_used > KEEP_RECENT_S for e in gone)
    kept_others = [e for e in entries if e not in gone and e.path != current]
    newest_others = sorted((e for e in entries if e.path != current), key=lambda e: e.last_used, reverse=True)
    assert set(newest_others[:keep - 1]) <= set(kept_others)
    # what goes is older than everything of its kind that stays (the current aside)
    assert all(g.last_used <= k.last_used for g in gone for k in kept_others)


def _entry(cache: Path, name: str, age_days: float) -> Path:
    path = cache / name
    path.mkdir()
    (path / "MANIFEST").write_text("x\n")
    (path / "MANIFEST").chmod(0o444)  # builds are read-only
    when = time.time() - age_days * DAY
    os.utime(path, (when, when))
    return path


def test_prune_removes_the_least_recently_used_and_leaves_others_alone(tmp_path):
    old = [_entry(tmp_path, f"server-{i:012x}", 10 + i) for i in range(4)]
    recent = _entry(tmp_path, "server-0000000000aa", 0.05)  # about an hour ago
    current = _entry(tmp_path, "server-0000000000bb", 30)
    locked = _entry(tmp_path, "server-0000000000cc", 40)
    strangers = [_entry(tmp_path, name, 50) for name in
                 ("server-short", "xubuntu-0000000000dd", ".build-server-0000000000ee.x1", "server-0000000000ff.tmp")]
    (tmp_path / "server-000000000011").write_text("a file, not an entry")
    lines: list[str] = []
    with open(tmp_path / ".server-0000000000cc.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another builder checks it now
        mark_used(current)
        removed = prune(tmp_path, "server", current, lines.append, lambda p: p.parent / f".{p.name}.lock")
    # kept: the current, the recent one, and the newest of the rest up to KEEP_ENTRIES in all
    assert KEEP_ENTRIES == 3
    assert sorted(removed) == sorted(old[1:])
    assert all(p.is_dir() for p in (current, recent, locked, old[0], *strangers))
    assert not any(p.exists() for p in old[1:])
    assert (tmp_path / "server-000000000011").is_file()
    assert len(lines) == 3 and all("unused for" in line for line in lines), lines
    # a second pass finds nothing more to do
    assert prune(tmp_path, "server", current, lines.append, lambda p: p.parent / f".{p.name}.lock") == [locked]


def test_prune_of_a_missing_cache_is_nothing(tmp_path):
    assert prune(tmp_path / "none", "server", tmp_path / "none" / "server-000000000000") == []


def test_two_pruners_at_once_keep_the_same_entries_and_remove_each_once(tmp_path):
    """Two test workers (or two clones) ask for the same build at once: both prune."""
    names = [f"xubuntu-{i:012x}" for i in range(10)]
    for i, name in enumerate(names):
        _entry(tmp_path, name, 1 + i / 10)
    current = tmp_path / names[5]
    code = ("import sys; from pathlib import Path; from xsession import cachepruning as cp; "
            "cur = Path(sys.argv[1]); cp.mark_used(cur); "
            "[print(p.name) for p in cp.prune(cur.parent, 'xubuntu', cur, "
            "lock_file=lambda o: o.parent / f'.{o.name}.lock')]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(current)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    removed = [line for p in procs for line in p.communicate(timeout=60)[0].split()]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(
        [names[0], names[1], names[5]])
    assert sorted(removed) == sorted(set(names) - {names[0], names[1], names[5]})
