"""A private bus that behaves like the system bus, for the demo and the tests.

Debian's ``system.conf`` (its default-deny policy) with the system-only parts
removed (user switch, fork, pid file, standard service folders), listening
privately, and including the project's own bus policy from ``units/``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BUS_NAME", "UNITS", "system_like_config"]

BUS_NAME = "org.xenubuntu.Sessions1"
UNITS = Path(__file__).resolve().parent.parent / "units"
SYSTEM_CONF = Path("/usr/share/dbus-1/system.conf")


def system_like_config(folder: Path, *, listen: str | None = None, includes: Sequence[Path] = (),
                       servicedirs: Sequence[Path] = ()) -> Path:
    """Write ``folder/bus.conf`` and return its path.

    When not run as root, the caller's user may own the name too (on the real
    system bus only root may).
    """
    tree = ET.parse(SYSTEM_CONF)
    top = tree.getroot()
    for tag in ("user", "fork", "pidfile", "syslog", "listen", "include", "includedir",
                "standard_system_servicedirs", "servicehelper"):
        for el in top.findall(tag):
            top.remove(el)
    ET.SubElement(top, "listen").text = listen or f"unix:dir={folder}"
    for d in servicedirs:
        ET.SubElement(top, "servicedir").text = str(d)
    for inc in (*includes, UNITS / f"{BUS_NAME}.conf"):
        ET.SubElement(top, "include").text = str(inc)
    if os.geteuid() != 0:
        policy = ET.SubElement(top, "policy", user=str(os.geteuid()))
        ET.SubElement(policy, "allow", own=BUS_NAME)
        ET.SubElement(policy, "allow", send_destination=BUS_NAME)
    config = folder / "bus.conf"
    tree.write(config)
    return config
