"""The xl output parsers and the Xen backend's pure helpers, on outputs recorded
from Debian's xl 4.17 in the test host's dom0 (tests/xen/recorded/)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from xsession.errors import HypervisorError
from xsession.hypervisor import xl
from xsession.hypervisor.xen import XenBackend, console_log_dir_from_config, xl_settings
from xsession.netplan import guest_mac
from xsession.manifest import ColdBoot, Flavour, MachineConfig, Manifest
from xsession.statefile import batch_scheduling

REC = Path(__file__).parent / "xen" / "recorded"


def rec(name: str) -> str:
    return (REC / name).read_text()


def test_info_fields_and_memory():
    info = xl.parse_info(rec("xl-info.txt"))
    assert (info.total_memory, info.free_memory, info.nr_cpus) == (2047, 1190, 2)
    assert info.xen_version == "4.17.7"
    assert "hvm" in info.virt_caps.split()
    assert info.outstanding_claims == 0
    # values may hold colons: only the first one separates
    assert "dom0_mem=640M,max:640M" in info.xen_commandline
    assert info.fields["release"] == "6.1.0-56-amd64"


def test_info_after_ballooning_dom0():
    assert xl.parse_info(rec("xl-info-dom0-ballooned.txt")).free_memory == 1366


def test_info_without_memory_is_an_error():
    with pytest.raises(ValueError, match="total_memory"):
        xl.parse_info("host : x\nnr_cpus : 2\n")
    with pytest.raises(ValueError, match="not a number"):
        xl.parse_info("nr_cpus : two\ntotal_memory : 1\nfree_memory : 1\n")


def test_list_rows_and_states():
    rows = {r.name: r for r in xl.parse_list(rec("xl-list.txt"))}
    assert list(rows) == ["Domain-0", "gpv", "gpvh"]
    assert (rows["Domain-0"].domid, rows["Domain-0"].mem_mib, rows["Domain-0"].vcpus) == (0, 640, 1)
    assert rows["gpv"].state == "-b----" and rows["gpv"].running and not rows["gpv"].paused
    assert rows["gpvh"].running and rows["gpvh"].cpu_time_s == pytest.approx(0.3)


def test_list_paused():
    (row,) = xl.parse_list(rec("xl-list-paused.txt"))
    assert row.name == "gpv" and row.paused and not row.crashed and not row.shutdown


def test_list_rejects_unexpected_rows():
    with pytest.raises(ValueError, match="unexpected row"):
        xl.parse_list("Name ID Mem VCPUs State Time(s)\nweird row\n")


def test_list_long_configs():
    doms = {d.name: d for d in xl.parse_list_long(rec("xl-list-l.txt"))}
    assert [d.domid for d in doms.values()] == [0, 1, 2]
    assert (doms["gpv"].type, doms["gpvh"].type) == ("pv", "pvh")
    assert doms["gpv"].max_mib == 96 and doms["gpvh"].target_mib == 96 and doms["gpv"].max_vcpus == 1
    assert doms["Domain-0"].max_memkb == 655360
    assert doms["gpvh"].config["c_info"]["uuid"]


def test_list_long_after_ballooning_dom0():
    (dom0,) = xl.parse_list_long(rec("xl-list-l-dom0-ballooned.txt"))
    assert dom0.domid == 0 and dom0.target_mib == 559 and dom0.max_mib == 640


def test_list_long_rejects_non_json():
    assert xl.parse_list_long("") == []
    with pytest.raises(ValueError, match="not JSON"):
        xl.parse_list_long("Name ID\n")
    with pytest.raises(ValueError, match="domain #0"):
        xl.parse_list_long('[{"config": {}}]')


def test_xl_error_keeps_argv_status_and_stderr():
    err = xl.XlError(["xl", "list", "nosuch"], 1, rec("xl-list-no-such-domain.txt"))
    assert isinstance(err, HypervisorError)
    assert err.argv == ["xl", "list", "nosuch"] and err.status == 1
    assert str(err) == "xl list nosuch: exit status 1 (nosuch is an invalid domain identifier (rc=-6))"
    assert xl.is_no_such_domain(err)
    assert xl.is_no_such_domain(xl.XlError(["xl", "list", "3"], 1, "Error: Domain '3' does not exist.\n"))
    timed_out = xl.XlError(["xl", "save", "a", "/x"], None, "", timeout=5)
    assert "timed out after 5 s" in str(timed_out) and not xl.is_no_such_domain(timed_out)


def test_xl_that_cannot_run_is_an_xl_error(tmp_path):
    with pytest.raises(xl.XlError, match="cannot run"):
        xl.info(xl=str(tmp_path / "no-xl-here"))


def _flavour(kind: str, cpu: str = "host") -> tuple[Flavour, Manifest]:
    f = Flavour(name="alpha", title="Alpha", priority=1, backend="xen",
                machine=MachineConfig(machine_type=kind, memory_mib=96, vcpus=2, cpu=cpu),
                disk=None, statefile=None,
                cold_boot=ColdBoot(kernel="pool/vmlinuz", initrd="pool/initrd", cmdline="console=hvc0",
                                   ready_line="READY"))
    return f, Manifest(path="/medium/xenubuntu/manifest.yaml", default="alpha", flavours=(f,))


def test_xl_settings(tmp_path):
    f, m = _flavour("pvh", "host,rdtscp=0,avx=0")
    s = xl_settings(f, m)
    assert s["type"] == "pvh" and s["memory"] == 96 and s["maxmem"] == 96 and s["vcpus"] == 2
    assert s["kernel"] == "/medium/xenubuntu/pool/vmlinuz" and s["cpuid"] == "host,rdtscp=0,avx=0"
    assert s["on_reboot"] == "destroy"
    text = xl.write_config(tmp_path / "a.cfg", s).read_text()
    assert 'cpuid = "host,rdtscp=0,avx=0"\n' in text and "memory = 96\n" in text
    assert "cpuid" not in xl_settings(*_flavour("pv"))
    assert "cpuid" not in xl_settings(*_flavour("pv", "qemu64"))
    with pytest.raises(HypervisorError, match="not a Xen domain type"):
        xl_settings(*_flavour("pc-i440fx-7.2"))


def test_a_flavours_screen_and_channel_are_served_on_its_run_folders_sockets(tmp_path):
    f, m = _flavour("pv")  # vga "std", the default
    s = xl_settings(f, m, tmp_path / "alpha")
    assert s["vfb"] == [f"vnc=1,vncunused=0,vnclisten=unix:{tmp_path / 'alpha' / 'vnc.sock'}"]
    text = xl.write_config(tmp_path / "a.cfg", s).read_text()
    assert f'vfb = ["vnc=1,vncunused=0,vnclisten=unix:{tmp_path / "alpha" / "vnc.sock"}"]\n' in text
    assert "vfb" not in xl_settings(f, m)  # no run folder: nowhere to serve it
    blind = dataclasses.replace(f, machine=dataclasses.replace(f.machine, vga="none"))
    assert "vfb" not in xl_settings(blind, m, tmp_path / "alpha")
    assert "channel" not in s  # no guest channel in this flavour
    talks = dataclasses.replace(f, machine=dataclasses.replace(f.machine, guest_channel=True))
    assert xl_settings(talks, m, tmp_path / "alpha")["channel"] == [
        "name=org.xenubuntu.placeholder,connection=pty",  # libxl drops the first (see xl_settings)
        f"name=org.xenubuntu.guest.0,connection=socket,path={tmp_path / 'alpha' / 'guest.sock'}"]
    # xl splits a device's settings at commas, and a unix socket's path has a length limit
    with pytest.raises(HypervisorError, match="run folder"):
        xl_settings(f, m, tmp_path / "a,b")
    with pytest.raises(HypervisorError, match="run folder"):
        xl_settings(f, m, tmp_path / ("x" * 100))


def test_overhead():
    backend = XenBackend(console_log_dir=None)
    # with a screen (vga "std"): Xen's device model in dom0 comes on top, and stays in dom0
    assert backend.overhead_mib(_flavour("pv")[0]) == 2 + 32 and backend.in_dom0_mib(_flavour("pv")[0]) == 32
    blind = dataclasses.replace(_flavour("pv")[0], machine=dataclasses.replace(_flavour("pv")[0].machine, vga="none"))
    assert backend.overhead_mib(blind) == 2 and backend.in_dom0_mib(blind) == 0
    talks = dataclasses.replace(blind, machine=dataclasses.replace(blind.machine, guest_channel=True))
    assert backend.in_dom0_mib(talks) == 32
    # HAP pool: 4 KiB x (256 x 2 vCPUs + 2 x 96 MiB) = 2816 KiB -> 3 MiB
    assert backend.overhead_mib(_flavour("pvh")[0]) == 5 + 32


def test_console_log_dir_follows_xenconsoled_trace(tmp_path, monkeypatch):
    monkeypatch.delenv("XENCONSOLED_TRACE", raising=False)
    defaults = tmp_path / "xen"
    defaults.write_text('XENCONSOLED_TRACE="guest"\n')
    assert console_log_dir_from_config(defaults) == Path("/var/log/xen/console")
    defaults.write_text("#XENCONSOLED_TRACE=guest\n")
    assert console_log_dir_from_config(defaults) is None
    assert console_log_dir_from_config(tmp_path / "missing") is None
    monkeypatch.setenv("XENCONSOLED_TRACE", "all")
    assert console_log_dir_from_config(tmp_path / "missing") == Path("/var/log/xen/console")


def test_a_flavour_on_the_internal_network_has_a_vif_with_its_own_mac_and_no_hotplug_script(tmp_path):
    """The vif is part of the saved domain (plugged or not), the same MAC at save and
    restore; the manager, not Xen's bash script, puts it on dom0's bridge."""
    f, m = _flavour("pv")
    assert "vif" not in xl_settings(f, m, tmp_path / "alpha")  # nic "none", the default
    on_net = dataclasses.replace(f, machine=dataclasses.replace(f.machine, nic="internal"))
    for rundir in (None, tmp_path / "alpha"):  # guest-visible: there whatever the run folder
        assert xl_settings(on_net, m, rundir)["vif"] == [f"mac={guest_mac('alpha')},script=/bin/true"]
    text = xl.write_config(tmp_path / "a.cfg", xl_settings(on_net, m)).read_text()
    assert f'vif = ["mac={guest_mac("alpha")},script=/bin/true"]\n' in text


def test_restore_tells_its_caller_xls_process_which_can_be_made_a_batch_task(tmp_path):
    """The backend makes ``xl restore`` a batch task as soon as it runs. What xl starts
    inherits the policy (reset-on-fork resets only real-time ones), which is why the
    backend gives the device model the normal policy back (tests/test_xen.py)."""
    fake = tmp_path / "xl"
    fake.write_text("#!/bin/sh\nsleep 0.5\nchrt -p $$ > \"$0.self\"\nsh -c 'chrt -p $$' > \"$0.child\"\n")
    fake.chmod(0o755)
    pids: list[int] = []

    def on_start(pid: int) -> None:
        pids.append(pid)
        batch_scheduling(pid)

    xl.restore(tmp_path / "image", tmp_path / "cfg", xl=str(fake), on_start=on_start)
    assert len(pids) == 1
    assert "SCHED_BATCH" in (tmp_path / "xl.self").read_text()
    assert "SCHED_BATCH" in (tmp_path / "xl.child").read_text()
