"""The Xen backend against a real Xen: Debian's Xen 4.17 and a dom0 booted in QEMU (TCG).

One boot of the test host for the whole module (tests/xen/run_scenario.py runs
tests/xen/scenario_backend.py in dom0): it masters a medium with two flavours
(alpha: PV, beta: PVH), restores them through the backend in priority order,
checks memory, ballooning, adoption and a domain destroyed behind the
manager's back, then damages one image of each kind and cold-boots. Each test
below checks one ``@@RESULT`` of that run; the serial log of the run is in
tests/artifacts/xen-scenario_backend.log.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "xen"))
from run_scenario import ScenarioRun, run_scenario  # noqa: E402

SCENARIO = Path(__file__).parent / "xen" / "scenario_backend.py"
from xsession.hypervisor.xen import DEVICE_MODEL_MIB  # noqa: E402


@pytest.fixture(scope="module")
def run() -> ScenarioRun:
    return run_scenario(SCENARIO, timeout=900)


def result(run: ScenarioRun, name: str) -> dict:
    r = run.result(name)
    assert r["ok"], f"{name} failed in dom0: {r} (log: {run.log})"
    return r


def test_scenario_ran_to_the_end(run):
    assert run.exit_code == 0, run.log
    assert result(run, "end")["domains_left"] == []


def test_master_two_flavours(run):
    r = result(run, "master")
    assert r["default"] == "alpha"
    fl = r["flavours"]
    assert (fl["alpha"]["type"], fl["beta"]["type"]) == ("pv", "pvh")
    for f in fl.values():
        assert f["backend"] == "xen" and f["path"].endswith(".xl.zst")
        assert f["raw_size"] > 96 << 20 > f["size"] > 0  # the whole RAM is in the image; zstd shrinks it
    assert r["domains_left"] == []  # xl save ended the mastering domains


def test_a_pv_flavour_shows_its_screen_over_vnc_after_a_restore(run):
    """Xen's device model serves the PV framebuffer on the session's VNC socket (the Console
    property's ``vnc``, as QEMU's sessions have); the guest's console text is on it."""
    r = result(run, "display")
    assert r["address"].startswith("unix:") and r["address"].endswith("/alpha/vnc.sock"), r
    assert r["lit"] > 200 and r["size"] == r["grab_size"], r
    # what the planner counts for it in dom0 covers what it holds there
    assert r["device_models_rss_mib"] and all(0 < v <= DEVICE_MODEL_MIB for v in r["device_models_rss_mib"].values())
    assert "vnc" not in r["beta_console"] and "no screen" in r["beta_refused"], r


def test_the_device_model_runs_at_the_normal_policy_after_a_batch_restore(run):
    """``xl restore`` reads the stream as a batch task, and the device model it starts inherits
    that; the backend finds it by xenstore's ``device-model-pid`` and gives it the normal policy
    back, so a key press or a screen update wakes it at once."""
    r = result(run, "display")
    assert r["alpha_device_model_pid"] in r["device_model_policies"], r
    assert set(r["device_model_policies"].values()) == {r["normal_policy"]}, r


def test_a_restored_domain_talks_over_its_guest_channel_both_ways(run):
    """The guest channel (install requests) under Xen: a PV channel served on the session's
    socket, read by the same reader as QEMU's port; heartbeats go on after the restore and
    dom0's answer reaches the guest."""
    r = result(run, "channel")
    assert r["socket"].endswith("/alpha/guest.sock"), r
    assert r["later_heartbeat"] > r["first_heartbeat"] > 0 and r["heard"] and r["refused"] == 0, r
    assert not r["beta_channel"], r


def test_restore_in_priority_order(run):
    assert result(run, "restore-alpha")["order"] == 0
    assert result(run, "restore-beta")["order"] == 1


@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_restored_guest_goes_on_counting(run, name):
    r = result(run, f"restore-{name}")
    assert r["first_counter"][0] == r["expected"], r
    assert r["first_counter"] == list(range(r["expected"], r["expected"] + 3))
    assert "p" not in r["state"]  # unpaused after the checks


@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_restore_relies_on_zstd_checks_and_asks_xen_in_process(run, name):
    """Mastered images promise a content checksum and size, so no sha256 pass; the domain's
    id comes from xenstore (the damaged-image tests below show that damage is still caught)."""
    r = result(run, f"restore-{name}")
    assert r["checks"] == "zstd"
    assert r["in_process"] == {"domid": r["domid"], "dom0": 0, "none": None}


@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_restore_reports_progress(run, name):
    r = result(run, f"restore-{name}")
    size = result(run, "master")["flavours"][name]["size"]
    assert r["progress_last"] == [size, size] and r["progress_calls"] > 1


def test_memory_agrees_with_xl_info(run):
    r = result(run, "memory")
    assert r["host_memory"] == r["xl_info"]
    assert r["target_mib"]["alpha"] == r["target_mib"]["beta"] == 96
    assert r["list_mem"]["alpha"] == r["list_mem"]["beta"] == 96
    assert (r["types"]["alpha"], r["types"]["beta"]) == ("pv", "pvh")
    for name in ("alpha", "beta"):
        rr = result(run, f"restore-{name}")
        # what the restore took from Xen's free memory is the guest plus at most our overhead estimate
        assert 0 <= rr["overhead_measured"] <= rr["overhead_estimate"], rr


def test_balloon_dom0(run):
    r = result(run, "balloon")
    assert r["free_after"] - r["free_before"] >= 60
    assert abs(r["dom0_target_after"] - r["target"]) <= 1


def test_adopt_running_domain(run):
    r = result(run, "adopt")
    assert r["domid"] == result(run, "restore-alpha")["domid"] and r["missing_is_none"]


def test_domain_destroyed_behind_our_back_is_reported(run):
    r = result(run, "destroyed-behind-back")
    assert len(r["reason"]) == 1 and "beta" in r["reason"][0] and "destroyed outside" in r["reason"][0]
    assert r["stop_reported"] == []  # a stop the manager asked for is no surprise


def test_corrupted_image_detected_then_cold_boot(run):
    r = result(run, "corrupt-alpha")
    assert "alpha/state.xl.zst is unusable" in r["error"]
    assert r["domains_left"] == []  # the paused domain was destroyed
    assert r["cold_counters"][:2] == [1, 2] and r["console"] == "xl console"


def test_truncated_image_detected_then_cold_boot(run):
    r = result(run, "truncated-beta")
    assert "beta/state.xl.zst is unusable" in r["error"] and "truncated" in r["error"]
    assert r["domains_left"] == []
    assert r["cold_counters"][:2] == [1, 2] and r["console"] == "xenconsoled log"


def test_a_flavour_on_the_internal_network_keeps_its_address_and_answers_after_a_restore(run):
    """Mastered on dom0's bridge (dnsmasq's fixed lease), restored with its vif on the bridge
    (the backend plugs it before the domain runs): it answers dom0 at the address it was saved
    with; restored with no network it runs unplugged."""
    r = result(run, "network")
    assert r["saved_with"] == [r["lease"]] and r["vif_on"] == r["bridge"]
