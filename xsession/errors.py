"""The project's errors: one root, subclasses that keep their inputs.

Callers catch meanings, not causes::

    XSessionError
     +-- ManifestError          the medium's manifest.yaml does not validate
     +-- NoSuchFlavour          a name that the manifest does not carry
     +-- NotEnoughMemory        a session that does not fit
     +-- MediumUnavailable      the medium (or a file on it) cannot be read
     +-- OutsideMedium          a manifest path (or a link on it) leads out of the medium
     +-- StatefileCorrupt       a statefile failed its size, sha256 or zstd check
     +-- InvalidState           an action that the session's state forbids
     +-- NotAuthorized          a caller that polkit refused
     +-- Failed                 anything else; the cause is chained
          +-- HypervisorError   a hypervisor command or process failed
          +-- NetworkError      dom0's internal network could not be planned or set up
          +-- PoolError         the medium's package pool could not be built or served

Each error writes its own sentence in ``__str__`` ("what failed: why"). The D-Bus
layer maps the class to ``org.xenubuntu.Sessions1.Error.<Name>`` via
:attr:`XSessionError.dbus_name`; anything else becomes ``...Error.Failed``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "XSessionError",
    "ManifestError",
    "NoSuchFlavour",
    "NotEnoughMemory",
    "MediumUnavailable",
    "OutsideMedium",
    "StatefileCorrupt",
    "InvalidState",
    "NotAuthorized",
    "Failed",
    "HypervisorError",
    "NetworkError",
    "PoolError",
]

DBUS_ERROR_PREFIX = "org.xenubuntu.Sessions1.Error."


class XSessionError(Exception):
    """Root of every error the session manager raises on purpose."""

    #: last component of the D-Bus error name
    dbus_name = "Failed"


class ManifestError(XSessionError):
    """The manifest does not validate; names the file, the flavour and the field."""

    dbus_name = "Failed"

    def __init__(self, path: str, problem: str, flavour: str | None = None, field: str | None = None):
        super().__init__(path, problem, flavour, field)
        self.path = path
        self.problem = problem
        self.flavour = flavour
        self.field = field

    def __str__(self) -> str:
        where = self.path
        if self.flavour:
            where += f": flavour {self.flavour!r}"
        if self.field:
            where += f": field {self.field!r}"
        return f"{where}: {self.problem}"


class NoSuchFlavour(XSessionError):
    dbus_name = "NoSuchFlavour"

    def __init__(self, name: str, known: Sequence[str] = ()):
        super().__init__(name, tuple(known))
        self.name = name
        self.known = tuple(known)

    def __str__(self) -> str:
        known = ", ".join(self.known) or "none"
        return f"no flavour named {self.name!r} on this medium (known: {known})"


class NotEnoughMemory(XSessionError):
    dbus_name = "NotEnoughMemory"

    def __init__(self, flavour: str, needed_mib: int, free_mib: int, could_stop: Sequence[str] = ()):
        super().__init__(flavour, needed_mib, free_mib, tuple(could_stop))
        self.flavour = flavour
        self.needed_mib = needed_mib
        self.free_mib = free_mib
        self.could_stop = tuple(could_stop)

    def __str__(self) -> str:
        text = f"{self.flavour} needs {self.needed_mib} MiB but only {self.free_mib} MiB are free"
        if self.could_stop:
            text += "; stopping " + ", ".join(self.could_stop) + " would make room"
        return text


class MediumUnavailable(XSessionError):
    dbus_name = "MediumUnavailable"

    def __init__(self, path: str, why: str):
        super().__init__(path, why)
        self.path = path
        self.why = why

    def __str__(self) -> str:
        return f"medium unavailable: {self.path}: {self.why}"


class OutsideMedium(XSessionError):
    """A manifest path that leads out of the medium, by ``..`` or by a symbolic link.

    Says nothing of where it leads: the reason is readable by anyone on the bus.
    """

    dbus_name = "MediumUnavailable"

    def __init__(self, relpath: str):
        super().__init__(relpath)
        self.relpath = relpath

    def __str__(self) -> str:
        return f"{self.relpath} leads out of the medium (a link to another place?); refused"


class StatefileCorrupt(XSessionError):
    dbus_name = "StatefileCorrupt"

    def __init__(self, path: str, why: str):
        super().__init__(path, why)
        self.path = path
        self.why = why

    def __str__(self) -> str:
        return f"statefile {self.path} is unusable: {self.why}"


class InvalidState(XSessionError):
    dbus_name = "InvalidState"

    def __init__(self, session: str, action: str, state: str, allowed: Sequence[str]):
        super().__init__(session, action, state, tuple(allowed))
        self.session = session
        self.action = action
        self.state = state
        self.allowed = tuple(allowed)

    def __str__(self) -> str:
        allowed = ", ".join(self.allowed) or "no state"
        return f"cannot {self.action} {self.session} while it is {self.state} (allowed from: {allowed})"


class NotAuthorized(XSessionError):
    dbus_name = "NotAuthorized"

    def __init__(self, action: str, why: str = "not authorized"):
        super().__init__(action, why)
        self.action = action
        self.why = why

    def __str__(self) -> str:
        return f"{self.action}: {self.why}"


class Failed(XSessionError):
    dbus_name = "Failed"


class HypervisorError(Failed):
    """A hypervisor process or command failed; keeps what it ran and what it said."""

    def __init__(self, what: str, why: str, output: str = ""):
        super().__init__(what, why, output)
        self.what = what
        self.why = why
        self.output = output

    def __str__(self) -> str:
        text = f"{self.what}: {self.why}"
        tail = self.output.strip().splitlines()[-3:]
        if tail:
            text += " (" + " | ".join(tail) + ")"
        return text


class NetworkError(Failed):
    """dom0's internal network: what (a flavour, a device, a command) and why."""

    def __init__(self, what: str, why: str):
        super().__init__(what, why)
        self.what = what
        self.why = why

    def __str__(self) -> str:
        return f"internal network: {self.what}: {self.why}"


class PoolError(Failed):
    """The medium's package pool: what (a package, a file, a command) and why."""

    def __init__(self, what: str, why: str):
        super().__init__(what, why)
        self.what = what
        self.why = why

    def __str__(self) -> str:
        return f"package pool: {self.what}: {self.why}"
