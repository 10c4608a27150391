"""docs/memory.md is what bench/plan_table.py prints: the table stays true."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_docs_memory_table_is_current() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "plan_table.py")], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    assert "| 2 GiB laptop, DVD drive |" in out and "| 32 GiB workstation, NVMe disk |" in out
    assert (ROOT / "docs" / "memory.md").read_text() == out, \
        "docs/memory.md is stale: python3 bench/plan_table.py > docs/memory.md"
