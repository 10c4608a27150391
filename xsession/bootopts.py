"""The ``xenubuntu.*`` kernel command-line options: one parser for every component.

A bad boot option never stops the boot: an unknown option or a malformed value
becomes a warning and the default is used. :func:`parse_cmdline` never raises on
any string.

>>> opts = parse_cmdline("quiet xenubuntu.flavour=kubuntu xenubuntu.restore=eager")
>>> opts.flavour, opts.restore.value, opts.warnings
('kubuntu', 'eager', ())
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

from .netplan import NetworkMode
from .restoreway import LazyPolicy

__all__ = ["RestorePolicy", "NetworkMode", "BootOptions", "parse_cmdline", "parse_size_mib", "check_flavours",
           "split_cmdline", "PREFIX"]

PREFIX = "xenubuntu."
DEFAULT_MEDIA = ("/cdrom", "/run/live/medium")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_SIZE_RE = re.compile(r"^([0-9]{1,9})([KMGT]?)(i?B)?$", re.IGNORECASE)
_SPACE = " \t\n\r\v\f"  # the kernel's isspace()
_UNIT_MIB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024, "": 1 / (1024 * 1024)}


class RestorePolicy(enum.Enum):
    """eager: restore all that fits now; lazy: the default now, the rest when idle
    or asked; off: nothing until asked."""

    EAGER = "eager"
    LAZY = "lazy"
    OFF = "off"


@dataclass(frozen=True)
class BootOptions:
    flavour: str | None = None
    restore: RestorePolicy = RestorePolicy.LAZY
    reserve_mib: int | None = None
    sessions: tuple[str, ...] | None = None
    medium: str | None = None
    #: ``auto``: identical pages of the sessions are merged (KSM) where the host can; ``off``: never
    share: str = "auto"
    #: ``auto``: QEMU sessions map their RAM images where nothing merges pages; ``on``: wherever
    #: the medium and QEMU can; ``off``: their RAM is always streamed (:mod:`.restoreway`)
    lazy: str = LazyPolicy.AUTO
    #: dom0's internal network: internal (default), off, or outside (NAT to the world)
    network: NetworkMode = NetworkMode.INTERNAL
    warnings: tuple[str, ...] = ()

    def with_warnings(self, *more: str) -> BootOptions:
        return replace(self, warnings=self.warnings + tuple(more))


def parse_size_mib(text: str) -> int | None:
    """``512M``, ``1G``, ``2048`` (bytes without a unit are too small to mean
    anything here, so a bare number is read as MiB) -> MiB, or None if malformed
    or less than 1 MiB (``0`` and ``0M`` alike: no reserve is not a size)."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        return None
    number, unit = int(m.group(1)), m.group(2).upper()
    if not unit and not m.group(3):
        mib: float = number  # a bare number is MiB
    else:
        mib = number * _UNIT_MIB[unit]
    return int(mib) if mib >= 1 else None


def split_cmdline(cmdline: str) -> list[str]:
    """The words of a kernel command line, split as the kernel splits them.

    Words are separated by whitespace outside double quotes and the double quotes
    are dropped (``xenubuntu.medium="/media/my disk"`` is one word). Single quotes
    and backslashes mean nothing to the kernel, so they mean nothing here. The boot
    scripts in ``units/`` and ``casper-scripts/`` follow the same rule, so every
    component reads the same options out of the same line.
    """
    words: list[str] = []
    word: list[str] = []
    in_quote = started = False
    for ch in cmdline:
        if ch == '"':
            in_quote = not in_quote
            started = True
        elif ch in _SPACE and not in_quote:
            if started:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(ch)
            started = True
    if started:
        words.append("".join(word))
    return words


def parse_cmdline(cmdline: str) -> BootOptions:
    """Read the ``xenubuntu.*`` options out of a kernel command line.

    Later occurrences win, as the kernel's own parameters do: the last
    ``xenubuntu.restore`` decides, even when its value is malformed (then the
    default applies and a warning says why).
    """
    opts = BootOptions()
    warnings: list[str] = []
    values: dict[str, str | None] = {}
    for word in split_cmdline(cmdline):
        if not word.startswith(PREFIX):
            continue
        key, eq, text = word[len(PREFIX):].partition("=")
        values[key] = text if eq else None

    for key, value in values.items():
        shown = f"{PREFIX}{key}" + (f"={value}" if value is not None else "")
        if value is None or value == "":
            warnings.append(f"boot option {shown} has no value; ignored")
            continue
        if key == "flavour":
            if _NAME_RE.fullmatch(value):
                opts = replace(opts, flavour=value)
            else:
                warnings.append(f"boot option {shown}: not a flavour name; using the medium's default")
        elif key == "restore":
            try:
                opts = replace(opts, restore=RestorePolicy(value.lower()))
            except ValueError:
                warnings.append(f"boot option {shown}: expected eager, lazy or off; using lazy")
        elif key == "reserve":
            mib = parse_size_mib(value)
            if mib is None:
                warnings.append(f"boot option {shown}: expected a size such as 512M or 1G; computing the reserve")
            else:
                opts = replace(opts, reserve_mib=mib)
        elif key == "sessions":
            names = [n for n in value.split(",") if n]
            good = tuple(dict.fromkeys(n for n in names if _NAME_RE.fullmatch(n)))
            bad = [n for n in names if not _NAME_RE.fullmatch(n)]
            if good:
                opts = replace(opts, sessions=good)
                if bad:
                    warnings.append(f"boot option {shown}: ignoring malformed name(s) {', '.join(bad)}")
            else:
                warnings.append(f"boot option {shown}: no usable flavour name; using all flavours")
        elif key == "network":
            try:
                opts = replace(opts, network=NetworkMode(value.lower()))
            except ValueError:
                warnings.append(f"boot option {shown}: expected internal, off or outside; "
                                "using internal (no route to the outside)")
        elif key == "medium":
            if value.startswith("/") and "\0" not in value:
                opts = replace(opts, medium=value)
            else:
                warnings.append(f"boot option {shown}: expected an absolute path; searching the usual places")
        elif key == "share":
            if value.lower() in ("auto", "off"):
                opts = replace(opts, share=value.lower())
            else:
                warnings.append(f"boot option {shown}: expected auto or off; using auto")
        elif key == "lazy":
            if value.lower() in LazyPolicy.ALL:
                opts = replace(opts, lazy=value.lower())
            else:
                warnings.append(f"boot option {shown}: expected auto, on or off; using auto")
        else:
            warnings.append(f"unknown boot option {shown}; ignored")
    return opts.with_warnings(*warnings)


def check_flavours(opts: BootOptions, known: Iterable[str], manifest_default: str) -> BootOptions:
    """Reconcile the options with the flavours a medium carries.

    An unknown default or session name becomes a warning; the result names only
    flavours that exist, and its ``flavour`` is always set.
    """
    known = tuple(known)
    warnings: list[str] = []
    sessions = opts.sessions
    if sessions is not None:
        unknown = [n for n in sessions if n not in known]
        if unknown:
            warnings.append(f"boot option {PREFIX}sessions names unknown flavour(s) {', '.join(unknown)}; ignored")
        sessions = tuple(n for n in sessions if n in known) or None
        if sessions is None:
            warnings.append(f"boot option {PREFIX}sessions leaves no flavour; using all flavours")
    allowed = sessions if sessions is not None else known
    flavour = opts.flavour
    if flavour is not None and flavour not in known:
        warnings.append(f"boot option {PREFIX}flavour={flavour}: no such flavour on this medium; "
                        f"using {manifest_default}")
        flavour = None
    if flavour is not None and flavour not in allowed:
        warnings.append(f"boot option {PREFIX}flavour={flavour} is not among {PREFIX}sessions; adding it")
        sessions = (flavour,) + tuple(allowed)
    if flavour is None:
        flavour = manifest_default if manifest_default in allowed else allowed[0]
    return replace(opts, flavour=flavour, sessions=sessions, warnings=opts.warnings + tuple(warnings))
