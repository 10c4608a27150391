"""Memory shared between sessions: the host's same-page merging (KSM), for real.

The knobs are the running kernel's own (``/sys/kernel/mm/ksm``); the guests are
the demo medium's, restored by xsessiond on a private bus.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from xsession import restoreway
from xsession.sharing import KSM_DIR, SCAN, Ksm, SharingStats, decide, process_merged_bytes

from .buslib import MANAGER_IFACE, MANAGER_PATH
from .guestlib import session_qemu_pid



def _knobs() -> dict[str, str]:
    return {n: (KSM_DIR / n).read_text().strip() for n in ("run", *SCAN)}


def test_the_decision_names_its_reason():
    assert decide("auto", "qemu", True).enabled
    assert not decide("off", "qemu", True).enabled and "xenubuntu.share=off" in decide("off", "qemu", True).reason
    xen = decide("auto", "xen", True)
    assert not xen.enabled and "Xen" in xen.reason
    missing = decide("auto", "qemu", False)
    assert not missing.enabled and "/sys/kernel/mm/ksm" in missing.reason


def test_saved_memory_counts_merged_and_zero_pages():
    assert SharingStats(pages_shared=10, pages_sharing=256, zero_pages=256, page_size=4096).saved_mib == 2
    assert SharingStats().saved_mib == 0


def test_the_knobs_are_set_and_put_back_as_found():
    assert Ksm().available(), "this kernel has no /sys/kernel/mm/ksm"
    before = _knobs()
    ksm = Ksm()
    try:
        ksm.enable({"pages_to_scan": 1234})
        now = _knobs()
        assert now["run"] == "1" and now["pages_to_scan"] == "1234"
        assert now["sleep_millisecs"] == str(SCAN["sleep_millisecs"])
        ksm.enable()  # a second call keeps the first state it found
    finally:
        ksm.restore()
    assert _knobs() == before
    ksm.restore()  # nothing left to put back: a no-op
    assert _knobs() == before


def test_a_missing_ksm_is_reported_not_raised(tmp_path: Path):
    ksm = Ksm(tmp_path / "no-ksm")
    assert not ksm.available() and ksm.stats() == SharingStats()
    with pytest.raises(OSError):
        ksm.enable()
    assert process_merged_bytes(2**22 + 12345) == 0  # no such process


def test_restored_guests_share_pages_and_the_plan_shows_it(xsessiond, client, runtime_dir):
    """Two flavours with the same kernel, restored side by side: the host merges their
    identical pages, the plan shows it, and stopping the manager puts KSM back."""
    before = _knobs()
    daemon = xsessiond("xenubuntu.restore=off xenubuntu.share=auto")
    for name in ("kubuntu", "ubuntu"):
        client.activate(name)
    for name in ("kubuntu", "ubuntu"):
        assert client.wait_state(name, {"running", "failed"}, 180) == "running"
    assert _knobs()["run"] == "1"
    pids = [session_qemu_pid(runtime_dir, n) for n in ("kubuntu", "ubuntu")]
    memory: dict = {}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        memory = client.prop(MANAGER_PATH, MANAGER_IFACE, "Memory")
        if memory["shared_mib"] >= 4 and all(process_merged_bytes(p) >= 1 << 20 for p in pids):
            break
        time.sleep(1)
    assert memory["sharing"].startswith("on:"), memory
    assert memory["shared_mib"] >= 4, memory
    assert all(process_merged_bytes(p) >= 1 << 20 for p in pids), [process_merged_bytes(p) for p in pids]
    # what is merged is shown, never spent: committed and available are as without sharing
    assert memory["committed_mib"] == memory["running_mib"]
    assert daemon.terminate() == 0
    assert _knobs() == before


def test_share_off_leaves_the_host_alone(xsessiond, client):
    before = _knobs()
    xsessiond("xenubuntu.restore=off xenubuntu.share=off")
    memory = client.prop(MANAGER_PATH, MANAGER_IFACE, "Memory")
    assert memory["sharing"] == "off: xenubuntu.share=off" and memory["shared_mib"] == 0
    assert _knobs() == before


@pytest.mark.parametrize("policy, backend, qemu_maps, sharing, lazy, why", [
    ("auto", "qemu", True, False, True, "nothing merges"),
    ("auto", "qemu", True, True, False, "only streamed RAM merges"),
    ("on", "qemu", True, True, True, "xenubuntu.lazy=on"),
    ("on", "qemu", False, False, False, "8.2 or later"),
    ("off", "qemu", True, False, False, "xenubuntu.lazy=off"),
    ("on", "xen", True, False, False, "only QEMU"),
])
def test_the_restore_way_follows_the_option_the_qemu_and_merging(policy, backend, qemu_maps, sharing, lazy, why):
    way = restoreway.decide(policy, backend, lambda: qemu_maps, sharing)
    assert way.lazy is lazy and why in way.reason
