"""A real flavour installs from the medium's package pool, which dom0 serves on its
internal network: the manager runs in a network namespace the test creates, restores
the server flavour, and the guest's own apt does the rest.

Uses the desktop medium (machine-wide cache, see ``xsession.demomedia``).
"""

from __future__ import annotations

import json
from pathlib import Path


from xsession.hypervisor.qga import GuestAgent
from xsession.manifest import MANIFEST_RELPATH, load_manifest
from xsession.netplan import NetworkMode, plan_network

from .buslib import Client
from .conftest import linked_copy
from .netlib import Netns, host_links

#: in the xubuntu flavour (so in the pool), not in the server's
EXTRA = "fonts-dejavu-core"




def _in_guest(agent: GuestAgent, script: str, timeout: float = 300.0) -> tuple[int, str]:
    status, out, err = agent.run(["/bin/sh", "-c", script], timeout=timeout)
    return status, (out + err).decode(errors="replace")


def test_a_package_installed_in_a_restored_session_comes_from_dom0s_signed_pool(
        desktop_medium: Path, dom0: Netns, xsessiond, private_bus: str, runtime_dir: Path, tmp_path: Path):
    manifest = load_manifest(desktop_medium / MANIFEST_RELPATH)
    assert {f.machine.nic for f in manifest.flavours} == {"internal"}
    report = json.loads((desktop_medium / "xenubuntu" / "pool" / "report.json").read_text())
    assert report["packages"] > 0 and report["bytes_without_sharing"] > report["bytes"]
    assert list((desktop_medium / "xenubuntu" / "pool" / "main").glob(f"*/{EXTRA}_*.deb")), "not in the pool"
    before = host_links()
    medium = linked_copy(desktop_medium, tmp_path / "dmedium")
    daemon = xsessiond("xenubuntu.restore=off", medium_path=medium, wrap=dom0.wrap)
    client = Client(private_bus)
    client.activate("server")
    client.wait_state("server", {"running"}, timeout=180)
    dom0_address = plan_network([f.name for f in manifest.flavours], NetworkMode.INTERNAL).dom0_address
    with GuestAgent(runtime_dir / "sessions" / "server" / "qga.sock", timeout=30.0) as agent:
        status, said = _in_guest(agent, f"dpkg -s {EXTRA}")
        assert status != 0, f"{EXTRA} is already in the server flavour: pick another package"
        # the pool is the only source, and its signature is checked
        status, said = _in_guest(agent, "cat /etc/apt/sources.list.d/*.sources; grep -v '^#' /etc/apt/sources.list")
        assert f"URIs: http://{dom0_address}/" in said and "Signed-By:" in said and "deb " not in said
        status, said = _in_guest(agent, "apt-get -q update 2>&1")
        assert status == 0 and "W:" not in said and "E:" not in said, said
        status, said = _in_guest(agent, f"DEBIAN_FRONTEND=noninteractive apt-get -q -y install {EXTRA} 2>&1")
        assert status == 0, said
        assert f"http://{dom0_address} xenubuntu/main" in said, said
        status, said = _in_guest(agent, f"dpkg -s {EXTRA}")
        assert status == 0 and "Status: install ok installed" in said
        # a package the pool does not have fails cleanly, and changes nothing
        status, said = _in_guest(agent, "DEBIAN_FRONTEND=noninteractive apt-get -q -y install no-such-package 2>&1")
        assert status == 100 and "Unable to locate package no-such-package" in said, said
        # dom0 now serves a Release that does not match its signature: the guest's apt refuses it
        inrelease = medium / "xenubuntu" / "pool" / "dists" / "xenubuntu" / "InRelease"
        text = inrelease.read_text()
        inrelease.unlink()  # a linked copy: replaced, never changed in place
        inrelease.write_text(text.replace("Label: XenUbuntu medium pool", "Label: XenUbuntu medium poo1"))
        (inrelease.parent / "Release.gpg").unlink()
        status, said = _in_guest(agent, "apt-get -q update 2>&1")
        assert status != 0 or "W:" in said, said
        assert "BADSIG" in said or "signatures were invalid" in said or "not signed" in said, said
    assert "GET /main/f/" + EXTRA in daemon.log_text()  # served by dom0's pool
    client.close()
    assert host_links() == before
