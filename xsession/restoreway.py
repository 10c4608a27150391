"""How QEMU sessions are restored: their RAM streamed into memory, or mapped from an image.

A medium mastered for lazy restores carries each QEMU flavour's RAM as an image
beside its statefile. Mapped copy-on-write, the image holds once what a streamed
guest would own: measured with the three desktops, 1177 MiB against 1665 MiB. But
the host's same-page merging (KSM, :mod:`.sharing`) merges anonymous pages only, and
an image's pages belong to a file: where merging is on, the streamed guests come to
961 MiB and the mapped ones stay at 1160. Under emulation neither way is faster.
So ``auto`` maps only where nothing merges (docs/sharing.md has the figures).

:func:`decide` is pure; the manager applies it to its backend before any restore.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LazyPolicy", "RestoreWay", "decide"]


class LazyPolicy:
    """Values of the ``xenubuntu.lazy`` boot option."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"
    ALL = (AUTO, ON, OFF)


@dataclass(frozen=True)
class RestoreWay:
    lazy: bool
    reason: str


def decide(policy: str, backend: str, qemu_maps: Callable[[], bool], sharing: bool) -> RestoreWay:
    """Whether QEMU sessions restore lazily (where their medium has the parts), and why.

    ``qemu_maps``: whether this QEMU runs a guest on a read-only file mapped copy-on-write,
    asked only when the answer matters (it starts QEMU once);
    ``sharing``: the host merges the sessions' identical pages.

    >>> decide("auto", "qemu", lambda: True, sharing=False).lazy
    True
    >>> decide("auto", "qemu", lambda: True, sharing=True).reason
    'identical pages are merged, and only streamed RAM merges: streamed'
    """
    if backend != "qemu":
        return RestoreWay(False, "only QEMU maps a RAM image: streamed")
    if policy == LazyPolicy.OFF:
        return RestoreWay(False, "xenubuntu.lazy=off: streamed")
    if policy != LazyPolicy.ON and sharing:
        return RestoreWay(False, "identical pages are merged, and only streamed RAM merges: streamed")
    if not qemu_maps():
        return RestoreWay(False, "this QEMU cannot map a RAM image copy-on-write (8.2 or later can): streamed")
    if policy == LazyPolicy.ON:
        return RestoreWay(True, "xenubuntu.lazy=on: RAM images mapped where the medium has them")
    return RestoreWay(True, "nothing merges pages: RAM images mapped where the medium has them, held once")
