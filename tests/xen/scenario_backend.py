#!/usr/bin/python3
"""Runs in dom0 on a real Xen: master a medium of two Xen flavours, then drive the
backend through restores, damaged images, cold boots, memory and exits.

Each step prints one ``@@RESULT {json}`` line that tests/test_xen.py checks on
the host; a step that raises reports ``ok: false`` with the error, and the
scenario goes on so one boot tells about every step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import traceback
from pathlib import Path

from xsession.errors import StatefileCorrupt
from xsession.hypervisor import xl
from xsession.hypervisor.xen import XenBackend, XenGuest
from xsession.hypervisor.xenctl import XenControl
from xsession.manifest import load_manifest
from xsession.mastering.xen import TCG_PVH_CPUID, XenFlavourSpec, master_medium
from xsession.statefile import zstd_checks_suffice

GUEST = Path("/payload/guest")
WORK = Path("/tmp/xs")
MEDIUM = WORK / "medium" / "xenubuntu"
LOGS = Path("/var/log/xen/console")
COUNTER = re.compile(r"^COUNTER (\d+)$", re.M)


def report(name: str, ok: bool, **data: object) -> None:
    print("@@RESULT " + json.dumps({"name": name, "ok": ok, **data}, default=str), flush=True)


def step(name: str):
    """Run the decorated function now; report its dict, or its error."""
    def run(fn):
        t0 = time.monotonic()
        try:
            data = fn() or {}
            report(name, bool(data.pop("ok", True)), seconds=round(time.monotonic() - t0, 2), **data)
        except Exception as e:  # reported, and the next steps still run
            report(name, False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])
        return fn
    return run


def counters(text: str) -> list[int]:
    return [int(n) for n in COUNTER.findall(text.replace("\r", ""))]


def wait_counters(guest: XenGuest, n: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = counters(guest.read_console())
        if len(seen) >= n:
            return seen
        time.sleep(0.3)
    return counters(guest.read_console())


backend = XenBackend(console_log_dir=LOGS, poll_s=0.5)
state: dict[str, object] = {}


@step("master")
def _master():
    specs = [
        XenFlavourSpec(name="alpha", title="Alpha (PV)", priority=1, kernel=GUEST / "vmlinuz",
                       initrd=GUEST / "guest.cpio.gz", cmdline="console=hvc0 loglevel=4 xsession.ready=XS-READY-alpha",
                       ready_line="XS-READY-alpha", machine_type="pv", memory_mib=96, settle_s=3.0),
        XenFlavourSpec(name="beta", title="Beta (PVH)", priority=2, kernel=GUEST / "vmlinuz",
                       initrd=GUEST / "guest.cpio.gz", cmdline="console=hvc0 loglevel=4 xsession.ready=XS-READY-beta",
                       ready_line="XS-READY-beta", machine_type="pvh", memory_mib=96, cpuid=TCG_PVH_CPUID,
                       settle_s=3.0, display=False, channel=False),
    ]
    m = master_medium(backend, specs, MEDIUM, WORK / "mastering")
    last = {f.name: max(counters((LOGS / f"guest-{f.name}.log").read_text(errors="replace")), default=0)
            for f in m.flavours}
    state["last"] = last
    on_medium = {f.name: {"size": f.statefile.size, "raw_size": f.statefile.raw_size,
                          "sha256": f.statefile.sha256, "path": f.statefile.path,
                          "type": f.machine.machine_type, "backend": f.backend} for f in m.flavours}
    sizes_ok = all((MEDIUM / v["path"]).stat().st_size == v["size"] for v in on_medium.values())
    left = [r.name for r in xl.list_domains() if r.name != "Domain-0"]
    return {"ok": sizes_ok and not left, "flavours": on_medium, "last_counter": last, "default": m.default,
            "domains_left": left}


manifest = load_manifest(MEDIUM / "manifest.yaml")
order = sorted(manifest.flavours, key=lambda f: (f.name != manifest.default, f.priority, f.name))
guests: dict[str, XenGuest] = {}
overheads: dict[str, int] = {}


def restore_one(flavour, index: int):
    calls: list[tuple[int, int]] = []
    before = backend.host_memory()
    t0 = time.monotonic()
    guest = backend.restore(flavour, manifest, WORK / "run" / flavour.name, lambda d, t: calls.append((d, t)))
    took = time.monotonic() - t0
    after = backend.host_memory()
    guests[flavour.name] = guest
    seen = wait_counters(guest, 3)
    expected = state["last"][flavour.name] + 1  # type: ignore[index]
    row = xl.list_domains(flavour.name)[0]
    overheads[flavour.name] = before.free_mib - after.free_mib - flavour.memory_mib
    image = manifest.resolve(flavour.statefile.path)
    # what the restore relied on: zstd's own checks (no sha256 pass), xenstore and libxenctrl in process
    ctl = XenControl()
    in_process = {"domid": ctl.domid(flavour.name), "dom0": ctl.domid("Domain-0"), "none": ctl.domid("nosuch")}
    # Xen's free memory pays the overhead less its part in dom0 (the device model)
    from_xen = backend.overhead_mib(flavour) - backend.in_dom0_mib(flavour)
    return {"ok": bool(seen) and seen[0] == expected and row.running and guest.is_alive(),
            "order": index, "first_counter": seen[:3], "expected": expected, "restore_s": round(took, 2),
            "progress_last": calls[-1] if calls else None, "progress_calls": len(calls),
            "free_before": before.free_mib, "free_after": after.free_mib, "memory_mib": flavour.memory_mib,
            "overhead_measured": overheads[flavour.name], "overhead_estimate": from_xen,
            "state": row.state, "domid": guest.domid, "checks": "zstd" if zstd_checks_suffice(image, flavour.statefile)
            else "sha256", "in_process": in_process}


for i, f in enumerate(order):
    step(f"restore-{f.name}")(lambda f=f, i=i: restore_one(f, i))


@step("channel")
def _channel():
    """The PV flavour's guest channel after its restore: the guest's heartbeats reach the
    session's reader, and a line from dom0 reaches the guest (it shows it on its console)."""
    alpha, beta = guests["alpha"], guests["beta"]
    reader = alpha.channel
    if reader is None:
        return {"ok": False, "why": "no channel reader"}
    first = reader.wait_heartbeat(0, 60, alpha.is_alive)
    later = reader.wait_heartbeat(first or 0, 30, alpha.is_alive) if first else None
    sent = reader.send(b"xenubuntu1 install 0123456789abcdef done\n")
    deadline = time.monotonic() + 30
    while "FROM-DOM0 xenubuntu1 install 0123456789abcdef done" not in alpha.read_console():
        if time.monotonic() > deadline:
            break
        time.sleep(0.3)
    heard = "FROM-DOM0 xenubuntu1 install 0123456789abcdef done" in alpha.read_console()
    return {"ok": bool(first and later and later > first and sent and heard and beta.channel is None
                       and reader.refused == 0),
            "first_heartbeat": first, "later_heartbeat": later, "sent": sent, "heard": heard,
            "refused": reader.refused, "socket": str(reader.socket_path), "beta_channel": beta.channel is not None}


@step("display")
def _display():
    """The PV flavour's screen, through Xen's device model's VNC socket as the chooser sees it:
    the guest's text console (a counter written to tty1 every second) drawn on its framebuffer,
    read by the backend's own picture (an RFB client); the flavour mastered without a screen
    has none."""
    from xsession.errors import HypervisorError
    from xsession.hypervisor import rfb
    from xsession.screen import read_png

    alpha, beta = guests["alpha"], guests["beta"]
    address = alpha.console.get("vnc", "")
    deadline = time.monotonic() + 60
    picture, lit, error = None, 0, ""
    while time.monotonic() < deadline:
        try:
            picture = read_png(alpha.picture())
        except HypervisorError as e:
            picture, error = None, str(e)
        if picture is not None:
            pixels = [picture.rgb[i:i + 3] for i in range(0, len(picture.rgb), 3)]
            lit = sum(1 for px in pixels if px != b"\0\0\0")
            if lit > 200:
                break
        time.sleep(1.1)
    try:
        beta.picture()
        beta_refused = ""
    except HypervisorError as e:
        beta_refused = str(e)
    again = rfb.grab(alpha.display) if alpha.display is not None else None
    # what Xen's device model costs dom0: the resident memory of each one running
    # and its scheduling policy: the batch xl restore started it, the backend gave it the normal one back
    dm, policies = {}, {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if "xen-qemu-system-i386" in (proc / "cmdline").read_text(errors="replace"):
                rss = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("VmRSS:"))
                dm[proc.name] = int(rss.split()[1]) // 1024
                policies[proc.name] = os.sched_getscheduler(int(proc.name))
        except (OSError, StopIteration):
            continue
    pid_in_xenstore = XenControl().read(f"/local/domain/{alpha.domid}/image/device-model-pid")
    return {"ok": picture is not None and lit > 200 and "vnc" not in beta.console and bool(beta_refused),
            "address": address, "size": [picture.width, picture.height] if picture else None, "lit": lit,
            "error": error, "beta_console": beta.console, "beta_refused": beta_refused,
            "grab_size": [again.width, again.height] if again else None, "device_models_rss_mib": dm,
            "device_model_policies": policies, "normal_policy": os.SCHED_OTHER,
            "alpha_device_model_pid": pid_in_xenstore.decode() if pid_in_xenstore else None}


@step("memory")
def _memory():
    text = subprocess.run(["xl", "info"], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"^(\w+)\s*:\s*(.*)$", text, re.M))
    aborts = 0
    for _ in range(5):  # how often xl itself dies listing restored domains (retried by xl.py)
        aborts += subprocess.run(["xl", "list", "-l"], capture_output=True).returncode < 0
    hm = backend.host_memory()
    doms = {d.name: d for d in backend.domains()}
    rows = {r.name: r for r in xl.list_domains()}
    return {"ok": hm.total_mib == int(fields["total_memory"]) and hm.free_mib == int(fields["free_memory"]),
            "host_memory": [hm.total_mib, hm.free_mib],
            "xl_info": [int(fields["total_memory"]), int(fields["free_memory"])],
            "target_mib": {n: d.target_mib for n, d in doms.items()},
            "list_mem": {n: r.mem_mib for n, r in rows.items()},
            "types": {n: d.type for n, d in doms.items()}, "raw_list_l_aborts_of_5": aborts}


@step("balloon")
def _balloon():
    before = backend.host_memory().free_mib
    dom0 = [d for d in backend.domains() if d.domid == 0][0]
    target = dom0.target_mib - 64
    backend.balloon_dom0(target)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = backend.host_memory().free_mib
        if after - before >= 60:
            break
        time.sleep(0.5)
    dom0_after = [d for d in backend.domains() if d.domid == 0][0]
    return {"ok": after - before >= 60 and abs(dom0_after.target_mib - target) <= 1,
            "free_before": before, "free_after": after, "target": target, "dom0_target_after": dom0_after.target_mib}


@step("adopt")
def _adopt():
    other = XenBackend(console_log_dir=LOGS)
    g = other.adopt("alpha", WORK / "run" / "alpha")
    none = other.adopt("nosuch", WORK / "run" / "nosuch")
    return {"ok": g is not None and g.domid == guests["alpha"].domid and none is None and g.is_alive(),
            "domid": g.domid if g else None, "missing_is_none": none is None}


@step("destroyed-behind-back")
def _behind_back():
    got: list[str] = []
    done = threading.Event()
    beta = guests["beta"]
    beta.on_exit(lambda reason: (got.append(reason), done.set()))
    t0 = time.monotonic()
    subprocess.run(["xl", "destroy", "beta"], check=True, capture_output=True)
    done.wait(15)
    noticed = time.monotonic() - t0
    # a stop asked by the manager must not be reported
    asked: list[str] = []
    alpha = guests["alpha"]
    alpha.on_exit(asked.append)
    alpha.stop()
    alpha.stop()  # idempotent
    time.sleep(2)
    left = [r.name for r in xl.list_domains() if r.name != "Domain-0"]
    return {"ok": len(got) == 1 and "destroyed outside" in got[0] and not asked and not left,
            "reason": got, "noticed_s": round(noticed, 2), "stop_reported": asked, "domains_left": left}


def damaged(name: str, how: str):
    f = manifest.flavour(name)
    path = manifest.resolve(f.statefile.path)
    data = bytearray(path.read_bytes())
    if how == "corrupt":
        mid = len(data) // 2
        data[mid] ^= 0xFF
        data[mid + 4096] ^= 0x55
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    t0 = time.monotonic()
    error = None
    try:
        backend.restore(f, manifest, WORK / "run" / name, lambda d, t: None).stop()
    except StatefileCorrupt as e:
        error = str(e)
    detect_s = time.monotonic() - t0
    left = [r.name for r in xl.list_domains() if r.name != "Domain-0"]
    # the engine's fallback: cold boot; here through `xl console` for one, the log for the other
    cold_backend = XenBackend(console_log_dir=None) if how == "corrupt" else backend
    t0 = time.monotonic()
    guest = cold_backend.cold_boot(f, manifest, WORK / "run" / f"{name}-cold")
    boot_s = time.monotonic() - t0
    seen = wait_counters(guest, 2)
    alive = guest.is_alive()
    guest.stop()
    return {"ok": error is not None and not left and seen[:2] == [1, 2] and alive,
            "error": error, "detect_s": round(detect_s, 2), "domains_left": left, "cold_boot_s": round(boot_s, 2),
            "cold_counters": seen[:3], "console": "xl console" if how == "corrupt" else "xenconsoled log"}


step("corrupt-alpha")(lambda: damaged("alpha", "corrupt"))
step("truncated-beta")(lambda: damaged("beta", "truncate"))

@step("network")
def _network():
    """A PV flavour with a vif, mastered on dom0's internal network (bridge, dnsmasq,
    nftables, as xsessiond sets it up) and restored with its vif put on the bridge: it keeps
    the address it had when saved and answers dom0. Restored with no network, it still runs,
    its NIC unplugged."""
    from xsession.netplan import NetworkMode, plan_network
    from xsession.network import InternalNetwork
    spec = XenFlavourSpec(name="gamma", title="Gamma (PV, on the network)", priority=1, kernel=GUEST / "vmlinuz",
                          initrd=GUEST / "guest.cpio.gz",
                          cmdline="console=hvc0 loglevel=4 xsession.ready=XS-READY-gamma",
                          ready_line="XS-READY-gamma", machine_type="pv", memory_mib=96, settle_s=2.0,
                          display=False, channel=False, nic="internal")
    net_backend = XenBackend(console_log_dir=LOGS, poll_s=0.5)
    m = master_medium(net_backend, [spec], WORK / "netmedium" / "xenubuntu", WORK / "netmastering")
    said = (LOGS / "guest-gamma.log").read_text(errors="replace").replace("\r", "")
    saved_with = re.findall(r"^NET eth0 (\S+)$", said, re.M)
    plan = plan_network(["gamma"], NetworkMode.INTERNAL)
    flavour = m.flavour("gamma")
    net = InternalNetwork(plan, WORK / "net")
    net.up()
    net_backend.network = net
    try:
        guest = net_backend.restore(flavour, m, WORK / "run" / "gamma", lambda d, t: None)
        on = Path(f"/sys/class/net/vif{guest.domid}.0/master").resolve().name
        # the restored guest's netfront reconnects to netback on its own after the domain
        # runs: under emulation on a loaded host that can take longer than a few pings
        deadline = time.monotonic() + 60
        while True:
            ping = subprocess.run(["ping", "-c", "1", "-W", "2", plan.lease("gamma").address], capture_output=True,
                                  text=True, timeout=30)
            if ping.returncode == 0 or time.monotonic() > deadline:
                break
        ran = wait_counters(guest, 2)
        guest.stop()
        net_backend.network = None
        guest = net_backend.restore(flavour, m, WORK / "run" / "gamma-off", lambda d, t: None)
        unplugged = wait_counters(guest, 2)
        off_alive = guest.is_alive()
        guest.stop()
    finally:
        net.close(teardown=True)
    left = [r.name for r in xl.list_domains() if r.name != "Domain-0"]
    return {"ok": saved_with == [plan.lease("gamma").address] and on == plan.bridge and ping.returncode == 0
            and bool(ran) and bool(unplugged) and off_alive and not left,
            "saved_with": saved_with, "lease": plan.lease("gamma").address, "vif_on": on, "bridge": plan.bridge,
            "ping": ping.stdout[-300:] + ping.stderr[-300:], "counters": ran[:2], "unplugged_counters": unplugged[:2],
            "domains_left": left}


left = [r.name for r in xl.list_domains() if r.name != "Domain-0"]
report("end", not left, domains_left=left)
