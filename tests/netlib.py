"""Network namespaces the tests create, and commands in the demo guests.

Every network test owns its namespaces: it makes them, runs the manager (and so
QEMU, the bridge and dnsmasq) inside, and deletes them in ``finally``. A
namespace of ours left from an earlier run fails the next test loudly.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from pathlib import Path

from .guestlib import converse

PREFIX = "xstnet-"


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _left_over(name: str) -> bool:
    """A namespace of ours that no live test process owns: its name carries the owner's pid."""
    if not name.startswith(PREFIX) or name in Netns.live:
        return False
    owner = name[len(PREFIX):].split("-", 1)[0]
    if not owner.isdigit() or int(owner) == os.getpid():
        return True
    return not Path(f"/proc/{owner}").exists()  # another test process (a parallel worker) may own it


def host_links() -> list[str]:
    """The host namespace's interfaces (the test process runs in it)."""
    return sorted(os.listdir("/sys/class/net"))


class Netns:
    """A network namespace of the test's own."""

    #: the namespaces open now (a test may hold several)
    live: set[str] = set()

    def __init__(self, role: str):
        leftovers = [n for n in namespaces() if _left_over(n)]
        assert not leftovers, f"network namespaces left by an earlier test: {leftovers}"
        self.name = f"{PREFIX}{os.getpid()}-{role}-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        Netns.live.add(self.name)
        self.run("ip", "link", "set", "lo", "up")

    @property
    def wrap(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.wrap, *argv], capture_output=True, text=True, check=check, timeout=60)

    def links(self) -> list[str]:
        return [line.split(": ")[1].split("@")[0] for line in self.run("ip", "-o", "link").stdout.splitlines()]

    def ipv4_arrived(self) -> int:
        """IPv4 packets that arrived at ``vo0`` (see :func:`link_outside`); neighbour
        discovery and ARP, which dom0 sends by itself, are not counted."""
        out = self.run("nft", "list", "table", "netdev", "xstworld").stdout
        return int(out.split("counter packets ")[1].split()[0])

    def close(self) -> None:
        """End what still runs inside (only processes in this namespace), then delete it."""
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", self.name], check=True)
        Netns.live.discard(self.name)


def link_outside(inside: Netns, outside: Netns) -> None:
    """A veth pair: ``vi0`` 192.168.250.2 in ``inside`` (dom0), ``vo0`` 192.168.250.1 in
    ``outside`` (the world), so a test sees whether anything leaves dom0."""
    subprocess.run(["ip", "-n", inside.name, "link", "add", "vi0", "type", "veth", "peer", "name", "vo0",
                    "netns", outside.name], check=True)
    inside.run("ip", "addr", "add", "192.168.250.2/24", "dev", "vi0")
    inside.run("ip", "link", "set", "vi0", "up")
    outside.run("ip", "addr", "add", "192.168.250.1/24", "dev", "vo0")
    outside.run("ip", "link", "set", "vo0", "up")
    # the world routes the guests' network back to dom0, so only dom0's forwarding decides
    outside.run("ip", "route", "add", "10.77.0.0/24", "via", "192.168.250.2")
    subprocess.run(
        [*outside.wrap, "nft", "-f", "-"], check=True, text=True,
        input='table netdev xstworld {\n chain ingress { type filter hook ingress device "vo0" priority 0;\n'
              '  meta protocol ip counter\n }\n}\n')


def guest_sh(serial_sock: Path | str, command: str, timeout: float = 30.0) -> list[str]:
    """Run a shell command in a demo guest over its serial console; its output lines."""
    def answered(raw: list[bytes]) -> list[str] | None:
        lines = [ln.decode(errors="replace").strip() for ln in raw]
        if any(ln.startswith("PONG sh") for ln in lines):
            return [ln[4:] for ln in lines if ln.startswith("OUT ")]
        return None

    return converse(serial_sock, f"sh:{command}", answered, timeout, f"answer to {command!r}")


def reaches(serial_sock: Path | str, address: str) -> bool:
    """Whether any of three pings from a guest to ``address`` comes back: one can be lost
    while a manager takes the network over on a loaded host (the answer is then late)."""
    out = guest_sh(serial_sock, f"ping -c 3 -W 3 {address} >/dev/null 2>&1 && echo REACHED || echo UNREACHED")
    return "REACHED" in out
