"""The memory planner: properties (hypothesis) and worked examples."""

from __future__ import annotations

import random
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xsession.bootopts import BootOptions, RestorePolicy
from xsession.errors import NoSuchFlavour, NotEnoughMemory
from xsession.hypervisor.base import HostMemory
from xsession.manifest import ColdBoot, Flavour, MachineConfig
from xsession.memory import (
    RESERVE_BASE_MIB,
    RESERVE_MAX_MIB,
    Plan,
    Verdict,
    check_request,
    compute_reserve,
    explain,
    fit_check,
    plan,
)

NAMES = ["kubuntu", "ubuntu", "xubuntu", "server", "lubuntu", "edubuntu", "mate", "budgie"]


def flavour(name: str, priority: int, memory_mib: int, backend: str = "qemu") -> Flavour:
    return Flavour(
        name=name, title=name.capitalize(), priority=priority, backend=backend,
        machine=MachineConfig(machine_type="pc-i440fx-7.2", memory_mib=memory_mib),
        disk=None, statefile=None,
        cold_boot=ColdBoot(kernel="k", initrd="i", cmdline="", ready_line="login:"),
    )


DEMO = [flavour("kubuntu", 1, 256), flavour("ubuntu", 2, 256), flavour("xubuntu", 3, 256),
        flavour("server", 4, 192)]


@st.composite
def inputs(draw: st.DrawFn) -> dict:
    n = draw(st.integers(1, len(NAMES)))
    names = NAMES[:n]
    flavours = [flavour(nm, draw(st.integers(0, 5)), draw(st.integers(1, 8192))) for nm in names]
    total = draw(st.integers(0, 40000))
    free = draw(st.integers(0, total))
    running_names = draw(st.lists(st.sampled_from(names), unique=True, max_size=n))
    running = {nm: draw(st.integers(0, 4096)) for nm in running_names}
    overhead = draw(st.one_of(st.integers(0, 256), st.dictionaries(st.sampled_from(names), st.integers(0, 256))))
    options = BootOptions(
        flavour=draw(st.one_of(st.none(), st.sampled_from(names))),
        restore=draw(st.sampled_from(list(RestorePolicy))),
        reserve_mib=draw(st.one_of(st.none(), st.integers(0, 50000))),
    )
    backend = draw(st.sampled_from(["qemu", "xen"]))
    return dict(memory=HostMemory(total, free), flavours=flavours, options=options, running=running,
                overhead=overhead, backend=backend)


@settings(max_examples=300, deadline=None)
@given(inputs())
def test_never_over_commits(args: dict) -> None:
    p = plan(**args)
    now = [d for d in p.decisions if d.verdict is Verdict.NOW]
    if now:
        assert p.available_mib >= 0
    assert p.available_mib == p.total_mib - p.reserve_mib - p.running_mib - sum(d.need_mib for d in now)
    assert p.committed_mib == p.running_mib + p.now_mib
    assert 0 <= p.reserve_mib <= p.total_mib
    # each NOW decision fitted in what was left when its turn came, and left the rest to the next
    free = p.headroom_mib
    for d in now:
        assert d.free_before_mib == free and d.need_mib <= free
        free -= d.need_mib
    # background restores, added up, fit in what the NOW decisions leave
    assert sum(p.decision(n).need_mib for n in p.background) <= max(p.available_mib, 0)
    for d in p.decisions:
        assert (d.verdict is Verdict.NEVER) == (d.need_mib > p.capacity_mib)
        assert d.name not in args["running"]
    assert {d.name for d in p.decisions} == {f.name for f in args["flavours"]} - set(args["running"])


@settings(max_examples=300, deadline=None)
@given(inputs())
def test_the_default_goes_first_whenever_it_fits(args: dict) -> None:
    p = plan(**args)
    default = p.default
    assert default == (args["options"].flavour or min(args["flavours"], key=lambda f: f.priority).name)
    if default in args["running"]:
        return
    d = p.decision(default)
    assert p.decisions[0].name == default
    fits = d.need_mib <= p.headroom_mib
    if args["options"].restore is RestorePolicy.OFF:
        assert p.now == ()
    else:
        assert (d.verdict is Verdict.NOW) == fits
    if args["options"].restore is RestorePolicy.LAZY:
        assert len(p.now) <= 1
        if d.verdict is Verdict.NEVER:  # a stand-in: the first flavour that fits
            fitting = [x.name for x in p.decisions if x.need_mib <= p.headroom_mib]
            assert p.now == tuple(fitting[:1])
        else:
            assert set(p.now) <= {default}
        if d.verdict is Verdict.LATER:
            assert p.background == ()  # nothing takes the memory the default waits for


@settings(max_examples=150, deadline=None)
@given(inputs(), st.randoms(use_true_random=False))
def test_same_input_same_plan(args: dict, rnd: random.Random) -> None:
    first = plan(**args)
    assert plan(**args) == first
    # the caller's order does not matter when priorities differ
    flavours = [flavour(f.name, i, f.memory_mib) for i, f in enumerate(args["flavours"])]
    shuffled = flavours[:]
    rnd.shuffle(shuffled)
    assert plan(**{**args, "flavours": flavours}) == plan(**{**args, "flavours": shuffled})


AVAILABLE_RE = re.compile(
    r"^available = (\d+) total - (\d+) reserve - (\d+) running - (\d+) now \(([\d + ]+)\) = (-?\d+) MiB$", re.M)
COMMITTED_RE = re.compile(r"^committed = (\d+) running \+ (\d+) now = (\d+) MiB$", re.M)


@settings(max_examples=300, deadline=None)
@given(inputs())
def test_the_explanation_adds_up(args: dict) -> None:
    p = plan(**args)
    text = explain(p)
    m = AVAILABLE_RE.search(text)
    assert m, text
    total, reserve, running, now, parts, available = m.groups()
    assert int(total) - int(reserve) - int(running) - int(now) == int(available)
    assert sum(int(x) for x in parts.split(" + ")) == int(now)
    assert (int(total), int(reserve), int(running), int(now), int(available)) == (
        p.total_mib, p.reserve_mib, p.running_mib, p.now_mib, p.available_mib)
    c = COMMITTED_RE.search(text)
    assert c and int(c.group(1)) + int(c.group(2)) == int(c.group(3)) == p.committed_mib
    # one row per decision: memory + overhead = need, in the plan's order
    rows = [ln.split() for ln in text.splitlines() if ln.split() and ln.split()[0] in p.names(Verdict.NOW)
            + p.later + p.never and len(ln.split()) > 6 and ln.split()[1].lstrip("-").isdigit()]
    assert [r[0] for r in rows] == [d.name for d in p.decisions]
    for r, d in zip(rows, p.decisions, strict=True):
        prio, memory, overhead, need, before = (int(x) for x in r[1:6])
        assert memory + overhead == need == d.need_mib
        assert before == d.free_before_mib and r[6] == d.verdict.value
        assert str(d.need_mib) in d.reason


@settings(max_examples=300, deadline=None)
@given(inputs(), st.data())
def test_check_request_names_need_free_and_what_to_stop(args: dict, data: st.DataObject) -> None:
    p = plan(**args)
    name = data.draw(st.sampled_from([f.name for f in args["flavours"]]))
    try:
        check_request(p, name)
    except NotEnoughMemory as e:
        d = p.decision(name)
        assert d.verdict is not Verdict.NOW and d.need_mib > p.available_mib
        assert (e.flavour, e.needed_mib, e.free_mib) == (name, d.need_mib, max(p.available_mib, 0))
        running = dict(p.running)
        assert set(e.could_stop) <= set(running)
        if e.could_stop:
            assert p.available_mib + sum(running[n] for n in e.could_stop) >= d.need_mib
            # no more than needed: without the last one it would not fit
            assert p.available_mib + sum(running[n] for n in e.could_stop[:-1]) < d.need_mib
        else:
            assert d.verdict is Verdict.NEVER or p.available_mib + sum(running.values()) < d.need_mib
        assert str(d.need_mib) in str(e)
    else:
        assert name in args["running"] or p.decision(name).verdict is Verdict.NOW \
            or p.decision(name).need_mib <= p.available_mib


@settings(max_examples=300, deadline=None)
@given(inputs())
def test_xen_balloons_dom0_only_as_far_as_needed(args: dict) -> None:
    p = plan(**{**args, "backend": "xen"})
    host = args["memory"]
    if p.balloon_target_mib is None:
        assert p.now_mib <= host.free_mib
    else:
        dom0_now = host.total_mib - host.free_mib - p.running_mib
        assert p.balloon_target_mib >= p.reserve_mib
        assert host.free_mib + (dom0_now - p.balloon_target_mib) == p.now_mib
    assert plan(**{**args, "backend": "qemu"}).balloon_target_mib is None


@settings(max_examples=300, deadline=None)
@given(inputs(), st.data())
def test_xen_dom0_keeps_its_reserve_and_the_sessions_device_models_when_it_balloons(
        args: dict, data: st.DataObject) -> None:
    """Part of each flavour's overhead lives in dom0 (Xen's device model): the hypervisor's
    free memory must cover only the rest, and dom0 balloons down no further than its
    reserve plus the device models of the running sessions and of those restored now."""
    overhead = args["overhead"]
    names = [f.name for f in args["flavours"]]
    whole = {n: overhead if isinstance(overhead, int) else overhead.get(n, 0) for n in names}
    parts = {n: data.draw(st.integers(0, whole[n])) for n in names}
    p = plan(**{**args, "backend": "xen", "in_dom0": parts})
    host = args["memory"]
    running = dict(p.running)
    running_parts = sum(parts[n] for n in running)
    now_parts = sum(parts[n] for n in p.now)
    from_hypervisor = p.now_mib - now_parts
    assert dict(p.in_dom0) == parts
    # what the planner decides is the same with or without the split: only dom0's target moves
    assert [d.verdict for d in p.decisions] == [d.verdict for d in plan(**{**args, "backend": "xen"}).decisions]
    if p.balloon_target_mib is None:
        assert from_hypervisor <= host.free_mib
    else:
        dom0_now = host.total_mib - host.free_mib - (p.running_mib - running_parts)
        assert host.free_mib + (dom0_now - p.balloon_target_mib) == from_hypervisor
        assert p.balloon_target_mib >= p.reserve_mib + running_parts + now_parts
        assert p.balloon_target_mib == p.dom0_target(p.now)


def test_a_xen_session_with_a_device_model_leaves_it_in_dom0() -> None:
    from xsession.memory import balloon_target_for
    host = HostMemory(total_mib=8192, free_mib=200)  # dom0 holds nearly everything, as Xen starts it
    targets: list[int] = []
    overhead, in_dom0 = {"kubuntu": 34, "server": 2}, {"kubuntu": 32, "server": 0}
    check = fit_check(lambda: host, DEMO, BootOptions(restore=RestorePolicy.OFF), overhead, "xen",
                      balloon=targets.append, in_dom0=in_dom0)
    check(DEMO[0], {})
    # kubuntu takes its RAM and Xen's 2 MiB from the hypervisor; its device model stays in dom0
    assert targets == [8192 - (256 + 2)]
    p = plan(host, DEMO, BootOptions(restore=RestorePolicy.OFF), {"server": 194}, overhead, "xen", in_dom0=in_dom0)
    assert balloon_target_for(p, "kubuntu") == 8192 - 194 - (256 + 2)
    assert "in dom0 (device models, part of the overhead): kubuntu 32 MiB" in explain(p)


# --- examples ----------------------------------------------------------------------

def test_demo_on_a_2gib_laptop_lazy() -> None:
    p = plan(HostMemory(1966, 1716), DEMO, BootOptions(flavour="kubuntu"), {}, 64)
    assert p.reserve_mib == RESERVE_BASE_MIB + 1966 // 32 == 445 and p.reserve_source == "computed"
    assert (p.now, p.later, p.never) == (("kubuntu",), ("ubuntu", "xubuntu", "server"), ())
    assert p.background == ("ubuntu", "xubuntu", "server")
    assert p.available_mib == 1966 - 445 - 320 == 1201


def test_eager_skips_what_does_not_fit_and_takes_smaller_ones() -> None:
    flavours = [flavour("kubuntu", 1, 1024), flavour("ubuntu", 2, 2048), flavour("server", 3, 256)]
    p = plan(HostMemory(3000, 3000), flavours, BootOptions(flavour="kubuntu", restore=RestorePolicy.EAGER,
                                                          reserve_mib=500), {}, 0)
    assert p.now == ("kubuntu", "server") and p.later == ("ubuntu",)
    assert "fits the 2500 MiB for sessions" in p.decision("ubuntu").reason
    assert p.available_mib == 3000 - 500 - 1024 - 256


def test_a_flavour_too_big_for_the_machine_is_never() -> None:
    p = plan(HostMemory(2048, 2048), [flavour("big", 1, 4096)], BootOptions(reserve_mib=512), {}, 64)
    d = p.decision("big")
    assert d.verdict is Verdict.NEVER and d.need_mib == 4160
    assert d.reason == "needs 4160 MiB (4096 + 64 overhead); this machine has 1536 MiB for sessions " \
                       "(2048 total - 512 reserve)"
    with pytest.raises(NotEnoughMemory) as e:
        check_request(p, "big")
    assert (e.value.needed_mib, e.value.free_mib, e.value.could_stop) == (4160, 1536, ())


def test_the_default_need_not_be_the_highest_priority() -> None:
    p = plan(HostMemory(8192, 8192), DEMO, BootOptions(flavour="server", restore=RestorePolicy.EAGER), {}, 64)
    assert [d.name for d in p.decisions] == ["server", "kubuntu", "ubuntu", "xubuntu"]
    assert p.decisions[0].verdict is Verdict.NOW


def test_lazy_default_that_can_never_fit_has_a_stand_in() -> None:
    flavours = [flavour("kubuntu", 1, 4096), flavour("ubuntu", 2, 3000), flavour("server", 3, 512),
                flavour("xubuntu", 4, 512)]
    p = plan(HostMemory(2048, 2048), flavours, BootOptions(flavour="kubuntu", reserve_mib=512), {}, 64)
    assert (p.now, p.never, p.background) == (("server",), ("kubuntu", "ubuntu"), ("xubuntu",))
    assert "in place of the default kubuntu" in p.decision("server").reason


def test_lazy_default_that_does_not_fit_blocks_background_restores() -> None:
    p = plan(HostMemory(2048, 2048), DEMO, BootOptions(flavour="kubuntu", reserve_mib=1024),
             {"ubuntu": 320, "xubuntu": 320, "server": 200}, 64)
    assert p.decision("kubuntu").verdict is Verdict.LATER and p.background == ()


def test_check_request_stops_the_lowest_priority_first_and_spares_the_default() -> None:
    p = plan(HostMemory(1536, 1536), DEMO, BootOptions(flavour="kubuntu", reserve_mib=512),
             {"kubuntu": 320, "ubuntu": 320, "server": 256}, 64)
    assert p.available_mib == 128
    with pytest.raises(NotEnoughMemory) as e:
        check_request(p, "xubuntu")
    assert e.value.could_stop == ("server",)
    assert str(e.value) == "xubuntu needs 320 MiB but only 128 MiB are free; stopping server would make room"
    check_request(p, "kubuntu")  # running: nothing to check
    with pytest.raises(NoSuchFlavour):
        check_request(p, "gentoo")


def test_reserve_from_the_boot_option_and_its_limits() -> None:
    p = plan(HostMemory(1024, 1024), DEMO, BootOptions(reserve_mib=4096), {}, 0)
    assert p.reserve_mib == 1024 and p.reserve_source == "boot option" and p.notes
    assert compute_reserve(2048) == 448 and compute_reserve(8192) == 640
    assert compute_reserve(32768) == RESERVE_MAX_MIB and compute_reserve(100) == 100


def test_overhead_from_the_backend_callable() -> None:
    p = plan(HostMemory(4096, 4096), DEMO, BootOptions(), {}, lambda f: f.memory_mib // 8 + 32)
    assert p.decision("kubuntu").overhead_mib == 64 and p.decision("server").overhead_mib == 56


def test_accepts_a_hardware_profile() -> None:
    from xsession.hardware import HardwareProfile, Virtualization
    profile = HardwareProfile(8192, 7000, "meminfo", 4, None, (), (), Virtualization(True, False))
    assert plan(profile, DEMO, BootOptions(), {}, 64) == plan(HostMemory(8192, 7000), DEMO, BootOptions(), {}, 64)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="backend"):
        plan(HostMemory(1, 1), DEMO, BootOptions(), backend="vmware")
    with pytest.raises(ValueError, match="repeat"):
        plan(HostMemory(1, 1), DEMO + DEMO[:1], BootOptions())
    with pytest.raises(TypeError):
        plan(2048, DEMO, BootOptions())


def test_as_dict_holds_plain_values() -> None:
    p = plan(HostMemory(8192, 1000), DEMO, BootOptions(restore=RestorePolicy.EAGER), {"x": 5000}, 64, "xen")
    d = p.as_dict()
    assert d["balloon"] is True and d["balloon_target_mib"] == p.balloon_target_mib
    for key, value in d.items():
        assert isinstance(value, (str, int, bool, list)), key
    assert isinstance(p, Plan)


def test_the_planner_imports_no_io() -> None:
    code = ("import sys, xsession.memory; bad = {'pyudev', 'gi', 'subprocess', 'xsession.hardware'} "
            "& set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fit_check_hook_for_the_engine() -> None:
    readings = iter([HostMemory(2048, 2048), HostMemory(2048, 2048)])
    check = fit_check(lambda: next(readings), DEMO, BootOptions(flavour="kubuntu", reserve_mib=1024), 64)
    check(DEMO[0], {})  # kubuntu: 320 of 1024
    with pytest.raises(NotEnoughMemory) as e:
        check(DEMO[1], {"kubuntu": 320, "server": 256, "xubuntu": 320})
    assert (e.value.needed_mib, e.value.free_mib) == (320, 128)
    assert e.value.could_stop == ("server",)


def test_on_xen_a_request_that_fits_only_after_ballooning_sets_dom0s_target_first() -> None:
    from xsession.memory import balloon_target_for
    host = HostMemory(total_mib=8192, free_mib=200)  # dom0 holds nearly everything, as Xen starts it
    targets: list[int] = []
    check = fit_check(lambda: host, DEMO, BootOptions(restore=RestorePolicy.OFF), 64, "xen", balloon=targets.append)
    check(DEMO[0], {})
    need = 256 + 64
    assert targets == [8192 - 0 - need]  # dom0 gives back exactly what the free memory lacks
    p = plan(host, DEMO, BootOptions(restore=RestorePolicy.OFF), {}, 64, "xen")
    assert balloon_target_for(p, "kubuntu") == targets[0] >= p.reserve_mib
    # room enough already, or QEMU (dom0 is the host): no balloon
    roomy = HostMemory(total_mib=8192, free_mib=4000)
    fit_check(lambda: roomy, DEMO, BootOptions(restore=RestorePolicy.OFF), 64, "xen", balloon=targets.append)(
        DEMO[0], {})
    fit_check(lambda: host, DEMO, BootOptions(restore=RestorePolicy.OFF), 64, "qemu", balloon=targets.append)(
        DEMO[0], {})
    assert len(targets) == 1


@settings(max_examples=200, deadline=None)
@given(inputs(), st.integers(min_value=-10, max_value=1 << 20))
def test_merged_pages_are_shown_but_never_spent_on_a_session(args: dict, shared: int) -> None:
    """KSM's saving is measured, and a write un-merges a page: a plan that counted it
    could admit a session the host cannot hold once the guests diverge."""
    without, with_sharing = plan(**args), plan(**args, shared_mib=shared)
    assert with_sharing.decisions == without.decisions
    assert with_sharing.available_mib == without.available_mib
    assert with_sharing.shared_mib == max(0, shared) == with_sharing.as_dict()["shared_mib"]
    if shared > 0:
        assert f"shared {shared} MiB" in explain(with_sharing)
