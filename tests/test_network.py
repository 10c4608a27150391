"""dom0's internal network: the plan (pure), and two demo guests mastered on it and
restored on it, inside network namespaces the tests create."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xsession.bootopts import parse_cmdline
from xsession.errors import NetworkError
from xsession.manifest import MANIFEST_RELPATH, load_manifest
from xsession.netplan import (BRIDGE, DOMAIN, SUBNET, NetworkMode, dnsmasq_argv, guest_mac, plan_network,
                              tap_name)

from .buslib import Client
from .netlib import Netns, guest_sh, host_links, link_outside, reaches

NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True)


# --- the plan ---------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.sets(NAMES, min_size=1, max_size=60), st.sampled_from(list(NetworkMode)))
def test_every_flavour_gets_its_own_address_and_mac_the_same_every_time(names, mode):
    plan = plan_network(names, mode)
    again = plan_network(sorted(names, reverse=True), mode)
    assert plan == again  # order of the names does not matter: mastering and restore agree
    addresses = [ipaddress.IPv4Address(lease.address) for lease in plan.leases]
    assert len(set(addresses)) == len(names)
    assert len({lease.mac for lease in plan.leases}) == len(names)
    dom0 = ipaddress.IPv4Address(plan.dom0_address)
    for a in addresses:
        assert a in SUBNET and a not in (SUBNET.network_address, SUBNET.broadcast_address, dom0)
    for lease in plan.leases:
        assert lease.mac == guest_mac(lease.name) and int(lease.mac.split(":")[0], 16) & 2  # locally administered
        assert len(tap_name(lease.name)) <= 15 and "_" not in lease.hostname


def test_a_flavour_keeps_its_address_when_others_come_and_go_unless_they_collide():
    alone = plan_network(["server"], NetworkMode.INTERNAL).lease("server").address
    with_others = plan_network(["server", "ubuntu", "xubuntu"], NetworkMode.INTERNAL).lease("server").address
    assert alone == with_others


def test_too_many_flavours_and_unknown_names_are_named_errors():
    with pytest.raises(NetworkError, match="holds 240"):
        plan_network([f"f{i}" for i in range(241)], NetworkMode.INTERNAL)
    with pytest.raises(NetworkError, match="nosuch: has no address"):
        plan_network(["server"], NetworkMode.INTERNAL).lease("nosuch")


def test_dnsmasq_gives_a_router_and_asks_upstream_only_in_outside_mode(tmp_path: Path):
    inside = dnsmasq_argv(plan_network(["a", "b"], NetworkMode.INTERNAL), tmp_path)
    outside = dnsmasq_argv(plan_network(["a", "b"], NetworkMode.OUTSIDE), tmp_path)
    assert "--dhcp-option=option:router" in inside and "--no-resolv" in inside
    assert "--dhcp-option=option:router,10.77.0.1" in outside and "--no-resolv" not in outside
    assert f"--interface={BRIDGE}" in inside and f"--local=/{DOMAIN}/" in inside
    assert sum(a.startswith("--dhcp-host=") for a in inside) == 2
    assert any(a.startswith("--dhcp-range=") and ",static," in a for a in inside)  # nobody else gets a lease


@pytest.mark.parametrize("value,mode,warned", [
    ("", NetworkMode.INTERNAL, False), ("xenubuntu.network=off", NetworkMode.OFF, False),
    ("xenubuntu.network=OUTSIDE", NetworkMode.OUTSIDE, False),
    ("xenubuntu.network=internal", NetworkMode.INTERNAL, False),
    ("xenubuntu.network=world", NetworkMode.INTERNAL, True), ("xenubuntu.network=", NetworkMode.INTERNAL, True)])
def test_the_network_boot_option(value, mode, warned):
    opts = parse_cmdline(f"quiet {value}")
    assert opts.network is mode
    assert bool([w for w in opts.warnings if "network" in w]) == warned


def test_a_spec_names_the_nic_of_each_flavour_or_is_refused(tmp_path: Path):
    from xsession.errors import ManifestError
    from xsession.mastering.master import load_spec
    spec = tmp_path / "spec.yaml"
    spec.write_text(NET_SPEC)
    assert [f.nic for f in load_spec(spec).flavours] == ["internal", "internal"]
    spec.write_text(NET_SPEC.replace("nic: internal}", "nic: bridged}", 1))
    with pytest.raises(ManifestError, match="nic of ubuntu must be one of none, user, internal"):
        load_spec(spec)


# --- real guests in namespaces -----------------------------------------------------------

NET_SPEC = """\
default: ubuntu
flavours:
  - {name: ubuntu, title: "Ubuntu", priority: 1, memory_mib: 192, initrd: initrd-ubuntu.cpio, nic: internal}
  - {name: server, title: "Ubuntu Server", priority: 2, memory_mib: 192, initrd: initrd-server.cpio, nic: internal}
kernel: vmlinuz
cmdline: "console=ttyS0 panic=-1 quiet no_timer_check"
disk_mib: 16
"""


@pytest.fixture(scope="module")
def network_medium(demo_medium: Path, tmp_path_factory) -> Iterator[Path]:
    """Two demo guests with NICs on the internal network, mastered inside a namespace of their own."""
    guests = demo_medium.parent / "guests"
    work = tmp_path_factory.mktemp("netmedium")
    (work / "spec.yaml").write_text(NET_SPEC)
    before = host_links()
    ns = Netns("master")
    try:
        done = subprocess.run([*ns.wrap, sys.executable, "-m", "xsession.mastering.cli", str(work / "spec.yaml"),
                               "--guests", str(guests), "--out", str(work / "medium")],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "internal network up: dom0 10.77.0.1, 2 flavour(s)" in done.stdout
    finally:
        ns.close()
    assert host_links() == before  # the bridge and taps were made in the namespace only
    yield work / "medium"
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def netns() -> Iterator[list[Netns]]:
    made: list[Netns] = []
    yield made
    for ns in made:
        ns.close()


def _serial(runtime_dir: Path, name: str) -> Path:
    return runtime_dir / "sessions" / name / "serial.sock"


def _restore_both(xsessiond, private_bus: str, medium: Path, ns: Netns, option: str) -> Client:
    xsessiond(f"xenubuntu.restore=eager {option}", medium_path=medium, wrap=ns.wrap)
    client = Client(private_bus)
    for name in ("ubuntu", "server"):
        client.wait_state(name, {"running"}, timeout=120)
    return client


def test_two_guests_restored_on_the_internal_network_keep_their_addresses_and_reach_only_dom0_and_each_other(
        network_medium: Path, netns: list[Netns], xsessiond, private_bus: str, runtime_dir: Path):
    manifest = load_manifest(network_medium / MANIFEST_RELPATH)
    assert {f.machine.nic for f in manifest.flavours} == {"internal"}
    plan = plan_network(["ubuntu", "server"], NetworkMode.INTERNAL)
    before = host_links()
    dom0 = Netns("dom0")
    netns.append(dom0)
    world = Netns("world")
    netns.append(world)
    link_outside(dom0, world)
    dom0.run("sysctl", "-qw", "net.ipv4.ip_forward=1")  # even a routing dom0 lets nothing out in internal mode
    client = _restore_both(xsessiond, private_bus, network_medium, dom0, "")
    assert BRIDGE in dom0.links() and "xs-ubuntu" in dom0.links() and "xs-server" in dom0.links()
    ubuntu, server = _serial(runtime_dir, "ubuntu"), _serial(runtime_dir, "server")
    # the addresses they were saved with, which the plan gives them again
    assert guest_sh(ubuntu, "cat /run/address") == [plan.lease("ubuntu").address]
    assert guest_sh(server, "cat /run/address") == [plan.lease("server").address]
    # no DHCP was needed after the restore: the saved infinite leases are still valid
    leases = runtime_dir / "network" / "dnsmasq.leases"
    assert not leases.exists() or leases.read_text().strip() == ""
    assert reaches(ubuntu, plan.lease("server").address)
    assert reaches(server, plan.lease("ubuntu").address)
    assert reaches(ubuntu, plan.dom0_address)
    # names from dom0's DNS
    answer = " ".join(guest_sh(ubuntu, f"nslookup server.{DOMAIN} {plan.dom0_address}"))
    assert plan.lease("server").address in answer
    # no route out, and a route the guest makes itself leads nowhere: dom0 forwards nothing
    assert not [r for r in guest_sh(ubuntu, "ip route") if r.startswith("default")]
    arrived = world.ipv4_arrived()
    guest_sh(ubuntu, f"ip route add default via {plan.dom0_address}")
    assert not reaches(ubuntu, "192.168.250.1")
    assert world.ipv4_arrived() == arrived  # not one packet reached the world
    client.close()
    assert host_links() == before


def test_outside_mode_routes_the_guests_out_through_dom0(
        network_medium: Path, netns: list[Netns], xsessiond, private_bus: str, runtime_dir: Path):
    plan = plan_network(["ubuntu", "server"], NetworkMode.OUTSIDE)
    dom0 = Netns("dom0")
    netns.append(dom0)
    world = Netns("world")
    netns.append(world)
    link_outside(dom0, world)
    client = _restore_both(xsessiond, private_bus, network_medium, dom0, "xenubuntu.network=outside")
    ubuntu = _serial(runtime_dir, "ubuntu")
    assert not reaches(ubuntu, "192.168.250.1")  # saved without a router
    guest_sh(ubuntu, "kill -USR1 $(pidof udhcpc)")  # a renewal brings the router of outside mode
    guest_sh(ubuntu, "sleep 2")
    assert [r for r in guest_sh(ubuntu, "ip route") if r.startswith(f"default via {plan.dom0_address}")]
    arrived = world.ipv4_arrived()
    assert reaches(ubuntu, "192.168.250.1")
    assert world.ipv4_arrived() > arrived  # the counter sees what leaves
    client.close()


def test_with_the_network_off_the_guests_run_unplugged_and_no_bridge_is_made(
        network_medium: Path, netns: list[Netns], xsessiond, private_bus: str, runtime_dir: Path):
    dom0 = Netns("dom0")
    netns.append(dom0)
    client = _restore_both(xsessiond, private_bus, network_medium, dom0, "xenubuntu.network=off")
    assert BRIDGE not in dom0.links()
    ubuntu = _serial(runtime_dir, "ubuntu")
    plan = plan_network(["ubuntu", "server"], NetworkMode.OFF)
    # restored, not cold-booted: the NIC it was saved with loads unplugged, its address kept
    assert guest_sh(ubuntu, "cat /run/address") == [plan.lease("ubuntu").address]
    assert b"XS-BOOT" not in (runtime_dir / "sessions" / "ubuntu" / "console.log").read_bytes()
    assert not reaches(ubuntu, plan.dom0_address)
    client.close()


def test_guests_that_outlive_the_manager_keep_their_network_and_the_next_manager_takes_it_over(
        network_medium: Path, netns: list[Netns], xsessiond, private_bus: str, runtime_dir: Path):
    plan = plan_network(["ubuntu", "server"], NetworkMode.INTERNAL)
    dom0 = Netns("dom0")
    netns.append(dom0)
    first = xsessiond("xenubuntu.restore=eager", medium_path=network_medium, wrap=dom0.wrap, stop_guests=False)
    client = Client(private_bus)
    for name in ("ubuntu", "server"):
        client.wait_state(name, {"running"}, timeout=120)
    client.close()
    assert first.terminate() == 0
    ubuntu = _serial(runtime_dir, "ubuntu")
    assert BRIDGE in dom0.links() and reaches(ubuntu, plan.lease("server").address)  # still plugged in
    xsessiond("xenubuntu.restore=off", medium_path=network_medium, wrap=dom0.wrap)  # adopts; stops them at the end
    client = Client(private_bus)
    assert client.states() == {"ubuntu": "running", "server": "running"}
    assert reaches(ubuntu, plan.lease("server").address) and reaches(ubuntu, plan.dom0_address)
    answer = " ".join(guest_sh(ubuntu, f"nslookup server.{DOMAIN} {plan.dom0_address}"))
    assert plan.lease("server").address in answer  # the new manager's dnsmasq answers
    client.close()


def test_a_session_whose_tap_cannot_join_the_bridge_runs_unplugged_and_says_why(
        network_medium: Path, netns: list[Netns], xsessiond, private_bus: str, runtime_dir: Path):
    """An interface named like the bridge that is no bridge: the network comes up, the taps
    cannot join it, and the guests are restored anyway (unplugged), with the reason logged."""
    dom0 = Netns("dom0")
    netns.append(dom0)
    dom0.run("ip", "link", "add", BRIDGE, "type", "veth", "peer", "name", "xsbr0-peer")
    daemon = xsessiond("xenubuntu.restore=eager", medium_path=network_medium, wrap=dom0.wrap)
    client = Client(private_bus)
    for name in ("ubuntu", "server"):
        client.wait_state(name, {"running"}, timeout=120)
        assert b"XS-BOOT" not in (runtime_dir / "sessions" / name / "console.log").read_bytes()  # restored
    assert "ubuntu: runs without the internal network" in daemon.log_text()
    assert not reaches(_serial(runtime_dir, "ubuntu"), plan_network(["ubuntu"], NetworkMode.INTERNAL).dom0_address)
    client.close()


_PLUG = """
import subprocess, sys
from pathlib import Path
from xsession.errors import NetworkError
from xsession.netplan import NetworkMode, plan_network
from xsession.network import InternalNetwork
net = InternalNetwork(plan_network(["gamma"], NetworkMode[sys.argv[2]]), Path(sys.argv[1]))
net.up()
subprocess.run(["ip", "link", "add", "vif7.0", "type", "veth", "peer", "name", "vif7peer"], check=True)
print("plugged", net.plug("gamma", "vif7.0"))
master = Path("/sys/class/net/vif7.0/master")
print("master", master.resolve().name if master.exists() else "-")
for name, vif in (("gamma", "vif8.0"), ("nosuch", "vif7.0")):
    try:
        net.plug(name, vif)
    except NetworkError as e:
        print("refused", e)
net.close()
"""


@pytest.mark.parametrize("mode", ["INTERNAL", "OFF"])
def test_a_xen_vif_goes_on_the_bridge_and_a_missing_one_or_a_stranger_is_refused(netns, tmp_path: Path, mode):
    """Xen's network backend makes the vif (``vifDOMID.0``); the manager puts it on the
    bridge, as it does a QEMU session's tap (here one end of a veth pair stands in for the vif,
    made by the kernel as netback would). With the network off it stays unplugged."""
    ns = Netns("plug")
    netns.append(ns)
    out = subprocess.run([*ns.wrap, sys.executable, "-c", _PLUG, str(tmp_path), mode], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    if mode == "OFF":
        assert lines[:2] == ["plugged False", "master -"], lines
    else:
        assert lines[:2] == ["plugged True", f"master {plan_network(['gamma'], NetworkMode.INTERNAL).bridge}"], lines
        assert "refused" in lines[2] and "vif8.0 is not there" in lines[2], lines
        assert "refused" in lines[3] and "nosuch" in lines[3], lines
