"""The install's named errors (D-Bus ``org.xenubuntu.Sessions1.Error.<dbus_name>``)::

    XSessionError
     +-- NoSuchJob            a job number that is not (or no longer) there
     +-- TargetRefused        a disk that may not be installed onto, and why
     |    +-- NoSuchTarget         not a whole disk udev knows
     |    +-- TargetIsLiveMedium   it holds the live medium
     |    +-- TargetInUse          mounted, a mounted partition, swap, LVM/dm holders
     |    +-- TargetTooSmall       fewer bytes than the flavour needs
     +-- HostUnfit            the check before writing failed (memory, disk, CPU), with numbers
     +-- InstallFailed        a step of the install failed; the disk's state is said
"""

from __future__ import annotations

from ..errors import XSessionError

__all__ = ["NoSuchJob", "TargetRefused", "NoSuchTarget", "TargetIsLiveMedium", "TargetInUse", "TargetTooSmall",
           "HostUnfit", "InstallFailed"]


class NoSuchJob(XSessionError):
    dbus_name = "NoSuchJob"

    def __init__(self, number: int):
        super().__init__(number)
        self.number = number

    def __str__(self) -> str:
        return f"no install job {self.number}"


class TargetRefused(XSessionError):
    """A disk that may not be installed onto."""

    dbus_name = "TargetRefused"

    def __init__(self, device: str, why: str):
        super().__init__(device, why)
        self.device = device
        self.why = why

    def __str__(self) -> str:
        return f"cannot install onto {self.device}: {self.why}"


class NoSuchTarget(TargetRefused):
    dbus_name = "NoSuchTarget"


class TargetIsLiveMedium(TargetRefused):
    dbus_name = "TargetIsLiveMedium"


class TargetInUse(TargetRefused):
    dbus_name = "TargetInUse"


class TargetTooSmall(TargetRefused):
    dbus_name = "TargetTooSmall"

    def __init__(self, device: str, size: int, needed: int):
        super().__init__(device, f"it has {size} bytes ({size / 2**20:.0f} MiB); "
                                 f"the flavour needs {needed} bytes ({needed / 2**20:.0f} MiB)")
        self.size = size
        self.needed = needed


class HostUnfit(XSessionError):
    """The check before writing: what is missing, with numbers."""

    dbus_name = "HostUnfit"

    def __init__(self, problems: list[str]):
        super().__init__(problems)
        self.problems = problems

    def __str__(self) -> str:
        return "this computer cannot run the installed flavour: " + "; ".join(self.problems)


class InstallFailed(XSessionError):
    """A step failed; ``disk_state`` says what is on the disk now."""

    dbus_name = "InstallFailed"

    def __init__(self, step: str, why: str, disk_state: str):
        super().__init__(step, why, disk_state)
        self.step = step
        self.why = why
        self.disk_state = disk_state

    def __str__(self) -> str:
        return f"{self.step} failed: {self.why} ({self.disk_state})"
