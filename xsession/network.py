"""dom0's internal network, applied: a bridge with dom0's address, dnsmasq for DHCP
and DNS, one tap per session, and the forwarding rules of the plan's mode.

Everything here acts on the network namespace the process runs in: dom0's own
in the product, one a test created in the tests. Nothing is routed between the
bridge and any other interface unless the mode is ``outside``: a forward rule
drops it, so that even a guest that sets its own route gets nowhere.

Guests outlive the manager, so :meth:`InternalNetwork.up` takes over a bridge and
taps that a previous manager left, and :meth:`InternalNetwork.close` leaves them
(and dnsmasq) running unless asked to tear them down.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from .errors import NetworkError
from .manifest import Manifest
from .netplan import NetworkMode, NetworkPlan, dnsmasq_argv, plan_network, tap_name

__all__ = ["InternalNetwork", "network_for", "NIC_ON_NETWORK"]

log = logging.getLogger(__name__)

#: the manifest's NIC kind that is attached to the internal network
NIC_ON_NETWORK = "internal"
#: the nftables table holding our rules (ours alone: deleted and written whole)
NFT_TABLE = "xenubuntu"
DNSMASQ_START_S = 10.0
COMMAND_TIMEOUT_S = 15.0


def _run(argv: list[str], what: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetworkError(what, f"{argv[0]}: {e}") from e
    if check and done.returncode != 0:
        raise NetworkError(what, f"{' '.join(argv)} said: {done.stderr.strip()[-300:]}")
    return done


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _forward_rules(plan: NetworkPlan) -> str:
    """The nftables script of the mode: nothing crosses the bridge's edge (internal), or
    the guests' traffic goes out masqueraded and only answers come back (outside)."""
    br = plan.bridge
    # bridged traffic between guests may pass this hook too (br_netfilter), in and out of
    # the bridge: only what crosses the bridge's edge is judged
    into, out_of = f'oifname "{br}" iifname != "{br}"', f'iifname "{br}" oifname != "{br}"'
    head = f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\ntable inet {NFT_TABLE} {{\n"
    if plan.mode is NetworkMode.OUTSIDE:
        return head + (
            "  chain forward { type filter hook forward priority 0; policy accept;\n"
            f"    {into} ct state established,related accept\n"
            f"    {into} drop\n  }}\n"
            "  chain postrouting { type nat hook postrouting priority 100; policy accept;\n"
            f"    ip saddr {plan.subnet} oifname != \"{br}\" masquerade\n  }}\n}}\n")
    return head + (
        "  chain forward { type filter hook forward priority 0; policy accept;\n"
        f"    {out_of} drop\n    {into} drop\n  }}\n}}\n")


class InternalNetwork:
    """The bridge, dnsmasq and the taps of one plan, in this process's network namespace.

    Resources: the bridge, the taps and the nftables table live in the kernel and go
    in :meth:`close` (``teardown=True``); dnsmasq is a process of its own session,
    ended there too. ``rundir`` holds dnsmasq's pid file, leases and log.
    """

    def __init__(self, plan: NetworkPlan, rundir: Path):
        self.plan = plan
        self.rundir = rundir
        self._dnsmasq: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return self.plan.dom0_address

    def up(self) -> None:
        """Bridge with dom0's address, the forwarding rules, dnsmasq; idempotent.

        :raises NetworkError: a step failed (no privilege, no dnsmasq); what was made is removed.
        """
        if self.plan.mode is NetworkMode.OFF:
            return
        self.rundir.mkdir(parents=True, exist_ok=True)
        try:
            br = self.plan.bridge
            if not _link_exists(br):
                _run(["ip", "link", "add", br, "type", "bridge", "stp_state", "0", "forward_delay", "0"],
                     "create the bridge")
            cidr = f"{self.address}/{self.plan.prefix}"
            _run(["ip", "addr", "replace", cidr, "dev", br], "give dom0 its address")
            _run(["ip", "link", "set", br, "up"], "bring the bridge up")
            _run(["nft", "-f", "-"], "write the forwarding rules", stdin=_forward_rules(self.plan))
            if self.plan.mode is NetworkMode.OUTSIDE:
                Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
            self._start_dnsmasq()
        except (NetworkError, OSError) as e:
            self.close(teardown=True)
            if isinstance(e, OSError):
                raise NetworkError("set up", str(e)) from e
            raise
        log.info("internal network %s up: dom0 %s, %d flavours, mode %s", self.plan.bridge, self.address,
                 len(self.plan.leases), self.plan.mode.value)

    def _start_dnsmasq(self) -> None:
        self._stop_dnsmasq()  # one left by a previous manager: its plan may differ
        pidfile = self.rundir / "dnsmasq.pid"
        pidfile.unlink(missing_ok=True)
        with open(self.rundir / "dnsmasq.out", "wb") as out:
            try:
                self._dnsmasq = subprocess.Popen(dnsmasq_argv(self.plan, self.rundir), stdin=subprocess.DEVNULL,
                                                 stdout=out, stderr=out, start_new_session=True)
            except OSError as e:
                raise NetworkError("start dnsmasq", str(e)) from e
        deadline = time.monotonic() + DNSMASQ_START_S
        while not pidfile.exists():
            if self._dnsmasq.poll() is not None:
                said = (self.rundir / "dnsmasq.out").read_text(errors="replace").strip()[-300:]
                raise NetworkError("start dnsmasq", f"it exited with {self._dnsmasq.returncode}: {said}")
            if time.monotonic() > deadline:
                raise NetworkError("start dnsmasq", f"no pid file after {DNSMASQ_START_S:.0f} s")
            time.sleep(0.05)

    def _stop_dnsmasq(self) -> None:
        if self._dnsmasq is not None:
            self._dnsmasq.terminate()
            try:
                self._dnsmasq.wait(5)
            except subprocess.TimeoutExpired:
                self._dnsmasq.kill()
                self._dnsmasq.wait(5)
            self._dnsmasq = None
            return
        pidfile = self.rundir / "dnsmasq.pid"
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if str(pidfile).encode() in cmdline:  # ours, not a reused pid
            os.kill(pid, signal.SIGTERM)

    def attach(self, name: str) -> str | None:
        """The session's tap, on the bridge and up; returns QEMU's ``-netdev`` value
        (None when the network is off: the guest's NIC then has no peer)."""
        if self.plan.mode is NetworkMode.OFF:
            return None
        self.plan.lease(name)  # a flavour of this medium, or NetworkError
        tap = tap_name(name)
        if not _link_exists(tap):
            _run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], f"create the tap of {name}")
        self._on_bridge(name, tap, "tap")
        # without the virtio header the NIC offers the guest no offloads: its features then do
        # not depend on what it is plugged into, so a guest saved on the bridge also restores
        # unplugged (network off) or on another backend
        return f"tap,id=net0,ifname={tap},script=no,downscript=no,vnet_hdr=off"

    def plug(self, name: str, vif: str) -> bool:
        """Put a Xen session's vif (the link Xen's network backend made for its domain) on
        the bridge and up. False when the network is off (the vif stays unplugged).

        :raises NetworkError: not a flavour of this medium, or the vif is not there.
        """
        if self.plan.mode is NetworkMode.OFF:
            return False
        self.plan.lease(name)
        if not _link_exists(vif):
            raise NetworkError(name, f"its vif {vif} is not there (Xen made no network backend)")
        self._on_bridge(name, vif, "vif")
        return True

    def _on_bridge(self, name: str, link: str, kind: str) -> None:
        _run(["ip", "link", "set", link, "master", self.plan.bridge], f"put {name}'s {kind} on the bridge")
        _run(["ip", "link", "set", link, "up"], f"bring {name}'s {kind} up")

    def close(self, teardown: bool = True) -> None:
        """Tear the network down (``teardown``), or leave it to the guests that outlive us."""
        if not teardown:
            self._dnsmasq = None  # it runs in its own session; the next manager takes it over
            return
        self._stop_dnsmasq()
        for lease in self.plan.leases:
            if _link_exists(tap_name(lease.name)):
                _run(["ip", "link", "del", tap_name(lease.name)], "remove a tap", check=False)
        if _link_exists(self.plan.bridge):
            _run(["ip", "link", "del", self.plan.bridge], "remove the bridge", check=False)
        _run(["nft", "delete", "table", "inet", NFT_TABLE], "remove the forwarding rules", check=False)


def network_for(manifest: Manifest, mode: NetworkMode, rundir: Path) -> InternalNetwork | None:
    """The internal network a medium needs: None when none of its flavours has a NIC on
    it, else one with a place for every such flavour (the plan depends on the medium alone,
    never on which sessions this boot restores, so addresses match the mastering)."""
    names = [f.name for f in manifest.flavours if f.machine.nic == NIC_ON_NETWORK]
    if not names:
        return None
    return InternalNetwork(plan_network(names, mode), rundir)
