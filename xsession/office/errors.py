"""The office's named errors (D-Bus ``org.xenubuntu.Sessions1.Error.<dbus_name>``)::

    XSessionError
     +-- NoOffice        the medium has no office (or the boot options left part of it out)
"""

from __future__ import annotations

from ..errors import XSessionError

__all__ = ["NoOffice"]


class NoOffice(XSessionError):
    dbus_name = "NoOffice"

    def __init__(self, action: str, why: str = "this medium has no office"):
        super().__init__(action, why)
        self.action = action
        self.why = why

    def __str__(self) -> str:
        return f"cannot {self.action} the office: {self.why}"
