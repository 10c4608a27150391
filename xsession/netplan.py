"""dom0's internal network, decided: addresses, names and dnsmasq's command line.

Pure: no I/O. :mod:`xsession.network` applies a :class:`NetworkPlan`.

Every flavour's MAC and address follow from its name and the medium's flavour
names alone, so the guest mastered with an address finds the same one after
every restore: its saved network state (lease, ARP entries, open connections)
stays valid. Leases are fixed and never expire; dnsmasq answers no other
machine. In ``internal`` mode the guests get no router: dom0 and each other
are all they can reach.

>>> plan = plan_network(["server", "xubuntu"], NetworkMode.INTERNAL)
>>> plan.lease("server").hostname, plan.dom0_address
('server', '10.77.0.1')
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import NetworkError

__all__ = ["NetworkMode", "Lease", "NetworkPlan", "plan_network", "guest_mac", "tap_name", "dnsmasq_argv",
           "BRIDGE", "SUBNET", "DOMAIN", "POOL_PORT"]

#: the bridge in dom0 (kernel interface names are at most 15 bytes)
BRIDGE = "xsbr0"
#: the internal network; dom0 has its first address
SUBNET = ipaddress.IPv4Network("10.77.0.0/24")
#: guests' DNS domain (``.internal`` is reserved for private use)
DOMAIN = "xenubuntu.internal"
#: the package pool's HTTP port on dom0's address
POOL_PORT = 80
#: guests get host numbers from this range; below and above stay for dom0's own use
_FIRST_HOST, _LAST_HOST = 10, 249


class NetworkMode(enum.Enum):
    """internal: dom0 and the guests only; off: no network; outside: the guests may
    also reach the outside world through dom0 (NAT)."""

    INTERNAL = "internal"
    OFF = "off"
    OUTSIDE = "outside"


@dataclass(frozen=True)
class Lease:
    """One flavour's fixed place on the network."""

    name: str
    mac: str
    address: str

    @property
    def hostname(self) -> str:
        return self.name.replace("_", "-")  # a DNS label has no underscore


@dataclass(frozen=True)
class NetworkPlan:
    mode: NetworkMode
    leases: tuple[Lease, ...]
    bridge: str = BRIDGE
    subnet: str = str(SUBNET)
    domain: str = DOMAIN

    @property
    def dom0_address(self) -> str:
        return str(ipaddress.IPv4Network(self.subnet).network_address + 1)

    @property
    def prefix(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen

    def lease(self, name: str) -> Lease:
        """:raises NetworkError: the flavour has no place on this network."""
        for lease in self.leases:
            if lease.name == name:
                return lease
        raise NetworkError(name, "has no address on the internal network (not a flavour of this medium)")


def guest_mac(name: str) -> str:
    """A locally administered MAC of the flavour's own, the same at save and restore
    (the guest's saved network state names it)."""
    h = hashlib.sha256(name.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def tap_name(name: str) -> str:
    """The tap device of a flavour's session: readable when the name fits, else hashed."""
    if len(name) <= 12:
        return f"xs-{name}"
    return "xs-" + hashlib.sha256(name.encode()).hexdigest()[:12]


def plan_network(names: Iterable[str], mode: NetworkMode) -> NetworkPlan:
    """Addresses for every flavour of a medium: a hash of the name picks the host
    number; a collision moves to the next free one, in name order, so the same set
    of names always gives the same plan.

    :raises NetworkError: more flavours than addresses, or two names share a MAC.
    """
    unique = sorted(set(names))
    span = _LAST_HOST - _FIRST_HOST + 1
    if len(unique) > span:
        raise NetworkError("the medium", f"has {len(unique)} flavours; the internal network holds {span}")
    taken: dict[int, str] = {}
    macs: dict[str, str] = {}
    leases = []
    base = SUBNET.network_address
    for name in unique:
        mac = guest_mac(name)
        if mac in macs:
            raise NetworkError(name, f"has the same MAC address as {macs[mac]} ({mac})")
        macs[mac] = name
        host = _FIRST_HOST + int.from_bytes(hashlib.sha256(name.encode()).digest()[4:8], "big") % span
        while host in taken:
            host = _FIRST_HOST + (host - _FIRST_HOST + 1) % span
        taken[host] = name
        leases.append(Lease(name=name, mac=mac, address=str(base + host)))
    return NetworkPlan(mode=mode, leases=tuple(leases))


def dnsmasq_argv(plan: NetworkPlan, rundir: Path) -> list[str]:
    """dnsmasq serving exactly the plan: fixed leases for the flavours' MACs, names for
    them and dom0 under the plan's domain, nothing forwarded upstream, and a router
    only in ``outside`` mode."""
    dom0 = plan.dom0_address
    net = ipaddress.IPv4Network(plan.subnet)
    argv = [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-hosts", "--no-poll",
        "--bind-interfaces", f"--interface={plan.bridge}", "--except-interface=lo", f"--listen-address={dom0}",
        f"--dhcp-range={net.network_address},static,{net.netmask},infinite",
        "--dhcp-authoritative", f"--domain={plan.domain}", f"--local=/{plan.domain}/",
        f"--host-record=dom0.{plan.domain},dom0,{dom0}",
        f"--dhcp-option=option:dns-server,{dom0}", f"--dhcp-option=option:domain-search,{plan.domain}",
        f"--dhcp-leasefile={rundir / 'dnsmasq.leases'}", f"--pid-file={rundir / 'dnsmasq.pid'}",
        f"--log-facility={rundir / 'dnsmasq.log'}", "--log-dhcp",
    ]
    if plan.mode is NetworkMode.OUTSIDE:  # dom0 routes, and asks its own resolvers for other names
        argv.append(f"--dhcp-option=option:router,{dom0}")
    else:  # an empty option: no default route at all; no name is looked up outside
        argv += ["--dhcp-option=option:router", "--no-resolv"]
    for lease in plan.leases:
        argv.append(f"--dhcp-host={lease.mac},{lease.address},{lease.hostname},infinite")
        argv.append(f"--host-record={lease.hostname}.{plan.domain},{lease.hostname},{lease.address}")
    return argv
