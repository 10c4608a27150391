"""The medium's ``xenubuntu/manifest.yaml``: parsed once into frozen dataclasses.

Every error names the file, the flavour and the field. Paths in the manifest are
relative to the folder that holds it and may not leave it, not even through a
symbolic link (:meth:`Manifest.resolve`). Parsing does no I/O beyond reading the
one file (:func:`load_manifest`); :func:`parse_manifest` takes the text, so the
rules are tested as plain functions.

The medium is input like any other: a damaged or hostile manifest must be
refused with a :class:`~xsession.errors.ManifestError`, never crash the daemon
that reads it. So the file has a size limit, the YAML is read by a loader that
refuses duplicate keys, aliases (whose expansion can be exponential) and
nesting deeper than the schema's, and every value has a range that the D-Bus
types publishing it can carry (:data:`LIMITS`, also in docs/manifest.md).

A restore must use exactly the guest-visible machine configuration the
statefile was saved with (QEMU's stream does not carry all of it: a different
CPU model or extra device loads silently and breaks later). The statefile entry
therefore records the configuration it was saved with, and a flavour whose
``machine`` differs from it is rejected, naming the field.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ManifestError, NoSuchFlavour, OutsideMedium

__all__ = [
    "FORMAT",
    "MachineConfig",
    "Statefile",
    "StatePart",
    "LazyImage",
    "Disk",
    "ColdBoot",
    "Flavour",
    "OfficeLayout",
    "Manifest",
    "parse_office",
    "parse_manifest",
    "load_manifest",
    "manifest_to_dict",
    "MANIFEST_RELPATH",
    "MAX_MANIFEST_BYTES",
    "LIMITS",
]

FORMAT = 1
MANIFEST_RELPATH = "xenubuntu/manifest.yaml"
#: a manifest of 64 flavours is a few tens of KiB: anything this big is not one
MAX_MANIFEST_BYTES = 1 << 20
#: the schema nests four levels deep; a little room for what a newer format adds
MAX_DEPTH = 8
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
#: QEMU machine types (``pc-i440fx-7.2``) and Xen domain types (``pvh``)
MACHINE_TYPE_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
#: a CPU model with its flags, as ``-cpu`` takes it (``max,-smap``); no spaces, no options of other devices
CPU_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.,=+-]{0,255}")
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
#: the ranges of every bounded value (documented in docs/manifest.md):
#: name -> (least, most); strings: (least, most) characters
LIMITS: dict[str, tuple[float, float]] = {
    "flavours": (1, 64),
    "title": (1, 200),
    "description": (0, 500),
    "priority": (INT32_MIN, INT32_MAX),       # D-Bus Priority is an int32
    "memory_mib": (1, 1 << 20),                # 1 TiB
    "vcpus": (1, 256),
    "statefile.size": (1, 1 << 40),            # at most the RAM it holds: 1 TiB
    "statefile.raw_size": (1, 1 << 40),
    "cold_boot.timeout_s": (1, 3600),
    "cold_boot.cmdline": (0, 2048),            # the x86 kernel's COMMAND_LINE_SIZE
    "cold_boot.ready_line": (1, 256),
    "path": (1, 1024),
    "created": (0, 64),
    "office.desktops": (2, 63),                # a server and the rest of the 64 flavours
}
BACKENDS = ("qemu", "xen")
COMPRESSIONS = ("zstd", "none")
#: where a flavour comes from: a tiny initrd guest, an installed disk image, a live ISO
SOURCES = ("initrd", "disk", "iso")
#: how a booted flavour says it is ready: a line on its serial console, the guest
#: agent's line on the guest channel, or (flavours we did not build) a settled screen
READINESS = ("console", "channel", "screen")
#: a guest's network: none, or QEMU's user network restricted to the guest and the host (no route out)
NICS = ("none", "user", "internal")


@dataclass(frozen=True)
class MachineConfig:
    """The guest-visible machine: what must be identical at save and restore.

    For QEMU ``machine_type`` is a versioned type (``pc-i440fx-7.2``); for Xen it
    is the domain type (``pv`` or ``pvh``).
    """

    machine_type: str
    memory_mib: int
    vcpus: int = 1
    accel: str = "tcg"
    cpu: str = "qemu64"
    vga: str = "std"
    disk_bus: str = "virtio"
    #: a virtio-serial controller with the guest channel (``org.xenubuntu.guest.0``) and
    #: the guest agent's port (``org.qemu.guest_agent.0``)
    guest_channel: bool = False
    #: a VM generation ID device: its ID changes at every restore, and the guest kernel
    #: reseeds its random generator when it does
    vmgenid: bool = False
    nic: str = "none"
    #: an IDE CD drive (a live ISO's)
    cdrom: bool = False

    def differences(self, other: MachineConfig) -> list[str]:
        """Names and both values of every field that differs, for error messages."""
        out = []
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{f.name} is {mine!r} but the statefile was saved with {theirs!r}")
        return out


@dataclass(frozen=True)
class StatePart:
    """A file of saved state on the medium and how to check it before trusting it."""

    path: str
    size: int
    sha256: str
    compression: str
    raw_size: int


@dataclass(frozen=True)
class LazyImage:
    """The same saved state split for a lazy restore (QEMU 8.2 or later).

    ``ram`` is the guest's RAM as a flat image (zstd); decoded into memory, it is
    mapped copy-on-write as the guest's RAM, so the guest runs at once and pages
    come in as it touches them. ``devices`` is the migration stream without the RAM
    (``x-ignore-shared``). ``held_mib`` is what the decoded image holds in memory
    (its pages that are not zero): the memory plan counts it beside the guest's own.
    """

    ram: StatePart
    devices: StatePart
    held_mib: int


@dataclass(frozen=True)
class Statefile(StatePart):
    """A saved running state: where it is and how to check it before trusting it."""

    saved_with: MachineConfig
    #: the same state for a lazy restore, where the medium has it
    lazy: LazyImage | None = None


@dataclass(frozen=True)
class Disk:
    """The read-only disk base and the overlay that existed when the state was saved."""

    base: str
    saved_overlay: str | None = None
    #: an empty overlay of the saved disk, copied per session (cheaper than creating one)
    session_template: str | None = None


@dataclass(frozen=True)
class ColdBoot:
    """What booting the flavour from scratch needs when its statefile cannot be used."""

    #: None: boot the CD's own boot loader (a live ISO we did not build)
    kernel: str | None
    initrd: str | None
    cmdline: str
    #: what readiness waits for on the console or the channel; empty for a settled screen
    ready_line: str
    timeout_s: float = 120.0


@dataclass(frozen=True)
class Flavour:
    name: str
    title: str
    priority: int
    backend: str
    machine: MachineConfig
    disk: Disk | None
    statefile: Statefile | None
    cold_boot: ColdBoot
    description: str = ""
    source: str = "initrd"
    readiness: str = "console"
    #: the live ISO on the medium, attached read-only as the CD drive (source ``iso``)
    iso: str | None = None
    #: the screen as it was saved (PNG), shown by a chooser before the session runs
    still: str | None = None

    @property
    def memory_mib(self) -> int:
        return self.machine.memory_mib

    @property
    def vcpus(self) -> int:
        return self.machine.vcpus


@dataclass(frozen=True)
class OfficeLayout:
    """The medium's office: which flavour serves (Samba share, calendars) and which
    desktops work in it (docs/manifest.md, "The office")."""

    server: str
    desktops: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """The server, then the desktops: every session the office needs."""
        return (self.server, *self.desktops)


@dataclass(frozen=True)
class Manifest:
    path: str
    default: str
    flavours: tuple[Flavour, ...]
    created: str = ""
    #: None: the medium carries no office
    office: OfficeLayout | None = None

    @property
    def root(self) -> Path:
        """The folder that holds the manifest; manifest paths are relative to it."""
        return Path(self.path).parent

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.flavours)

    def flavour(self, name: str) -> Flavour:
        for f in self.flavours:
            if f.name == name:
                return f
        raise NoSuchFlavour(name, self.names)

    def resolve(self, relpath: str) -> Path:
        """The file a manifest path names, its links followed, which must stay inside the medium.

        :raises OutsideMedium: the path, or a link on the way, leads out of the manifest's folder;
            the message names only the manifest's path, nothing of where it leads.
        """
        root = os.path.realpath(self.root)
        real = os.path.realpath(os.path.join(root, relpath))
        if os.path.commonpath([root, real]) != root:
            raise OutsideMedium(relpath)
        return Path(real)


class _Reader:
    """Walks one mapping of the YAML, naming file, flavour and field in each error."""

    def __init__(self, path: str, data: Any, flavour: str | None = None, prefix: str = ""):
        self.path = path
        self.flavour = flavour
        self.prefix = prefix
        if not isinstance(data, dict):
            raise self.error("must be a mapping", field=prefix.rstrip(".") or None)
        self.data = data

    def error(self, problem: str, field: str | None = None) -> ManifestError:
        return ManifestError(self.path, problem, self.flavour, field)

    def _field(self, key: str) -> str:
        return self.prefix + key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., ) -> Any:
        if key not in self.data:
            if default is ...:
                raise self.error("is missing", self._field(key))
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.error(f"must be {_kind_name(kind)}, not a boolean", self._field(key))
        if not isinstance(value, kind):
            raise self.error(f"must be {_kind_name(kind)}, not {type(value).__name__}", self._field(key))
        return value

    def int_in(self, key: str, limit: str, default: Any = ...) -> int:
        """An integer within ``LIMITS[limit]``."""
        value = self.get(key, int, default)
        low, high = LIMITS[limit]
        if not low <= value <= high:
            raise self.error(f"must be from {int(low)} to {int(high)}, got {_short(value)}", self._field(key))
        return int(value)

    def number_in(self, key: str, limit: str, default: Any = ...) -> float:
        """A finite number within ``LIMITS[limit]`` (``.nan`` and ``.inf`` are not)."""
        value = self.get(key, (int, float), default)
        low, high = LIMITS[limit]
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number) or not low <= number <= high:
            raise self.error(f"must be a number from {low:g} to {high:g}, got {_short(value)}", self._field(key))
        return number

    def text(self, key: str, limit: str, default: Any = ...) -> Any:
        """A string of printable characters (no control characters, valid UTF-8) within a length range."""
        value = self.get(key, str, default)
        if value is None or value is default:
            return value
        low, high = LIMITS[limit]
        if not low <= len(value) <= high:
            raise self.error(f"must be {int(low)} to {int(high)} characters long, got {len(value)}", self._field(key))
        bad = next((c for c in value if ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 or 0xd800 <= ord(c) < 0xe000), None)
        if bad is not None:
            raise self.error(f"must not contain the control character {bad!r}", self._field(key))
        return value

    def matching(self, key: str, pattern: re.Pattern[str], what: str, default: Any = ...) -> str:
        value: str = self.get(key, str, default)
        if not pattern.fullmatch(value):
            raise self.error(f"must be {what}, got {_short(value)}", self._field(key))
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> str:
        value: str = self.get(key, str, default)
        if value not in choices:
            raise self.error(f"must be one of {', '.join(choices)}, got {value!r}", self._field(key))
        return value

    def relpath(self, key: str, default: Any = ...) -> Any:
        value = self.text(key, "path", default)
        if value is None or value is default:
            return value
        norm = posixpath.normpath(value)
        if value.startswith("/") or norm == ".." or norm.startswith("../") or not value:
            raise self.error(f"must be a path inside the medium's xenubuntu folder, got {value!r}", self._field(key))
        return norm

    def sub(self, key: str, default: Any = ...) -> _Reader | None:
        value = self.get(key, dict, default)
        if value is None:
            return None
        return _Reader(self.path, value, self.flavour, self._field(key) + ".")

    def reject_unknown(self, known: set[str]) -> None:
        for key in self.data:
            if key not in known:
                raise self.error("is not a known field", self._field(str(key)))


def _short(value: Any) -> str:
    """A value for an error message: never the whole of a huge one."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", str: "a string", dict: "a mapping", list: "a list", float: "a number",
             bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _machine(r: _Reader) -> MachineConfig:
    r.reject_unknown({f.name for f in dataclasses.fields(MachineConfig)})
    return MachineConfig(
        machine_type=r.matching("machine_type", MACHINE_TYPE_RE, "a machine type such as 'pc-i440fx-7.2' or 'pvh'"),
        memory_mib=r.int_in("memory_mib", "memory_mib"),
        vcpus=r.int_in("vcpus", "vcpus", 1),
        accel=r.choice("accel", ("tcg", "kvm"), "tcg"),
        cpu=r.matching("cpu", CPU_RE, "a CPU model with optional flags, such as 'qemu64' or 'max,-smap'", "qemu64"),
        vga=r.choice("vga", ("std", "none"), "std"),
        disk_bus=r.choice("disk_bus", ("virtio", "ide", "none"), "virtio"),
        guest_channel=r.get("guest_channel", bool, False),
        vmgenid=r.get("vmgenid", bool, False),
        nic=r.choice("nic", NICS, "none"),
        cdrom=r.get("cdrom", bool, False),
    )


def _flavour(path: str, raw: Any, index: int) -> Flavour:
    name = raw.get("name") if isinstance(raw, dict) else None
    r = _Reader(path, raw, name if isinstance(name, str) else f"#{index + 1}", "")
    name = r.get("name", str)
    if not NAME_RE.fullmatch(name):
        raise r.error("must be lower-case letters, digits or '_', starting with a letter, at most 32 long", "name")
    r.reject_unknown({"name", "title", "priority", "backend", "machine", "disk", "statefile", "cold_boot",
                      "description", "source", "readiness", "iso", "still"})
    backend = r.choice("backend", BACKENDS, "qemu")
    machine = _machine(r.sub("machine"))  # type: ignore[arg-type]
    disk_r = r.sub("disk", None)
    disk = None
    if disk_r is not None:
        disk_r.reject_unknown({"base", "saved_overlay", "session_template"})
        disk = Disk(base=disk_r.relpath("base"), saved_overlay=disk_r.relpath("saved_overlay", None),
                    session_template=disk_r.relpath("session_template", None))
    sf_r = r.sub("statefile", None)
    statefile = None
    if sf_r is not None:
        sf_r.reject_unknown({"path", "size", "sha256", "compression", "raw_size", "saved_with", "lazy"})
        part = _state_part(sf_r, COMPRESSIONS)
        saved_with = _machine(sf_r.sub("saved_with"))  # type: ignore[arg-type]
        lazy_r = sf_r.sub("lazy", None)
        lazy = None if lazy_r is None else _lazy(lazy_r, backend, machine)
        statefile = Statefile(**dataclasses.asdict(part), saved_with=saved_with, lazy=lazy)
        diffs = machine.differences(saved_with)
        if diffs:
            raise r.error("machine configuration differs from the one the statefile needs: " + "; ".join(diffs),
                          "machine")
    cb_r = r.sub("cold_boot")
    assert cb_r is not None
    cb_r.reject_unknown({"kernel", "initrd", "cmdline", "ready_line", "timeout_s"})
    source = r.choice("source", SOURCES, "initrd")
    readiness = r.choice("readiness", READINESS, "console")
    iso = r.relpath("iso", None)
    boots_cd = iso is not None
    cold_boot = ColdBoot(
        kernel=cb_r.relpath("kernel", None if boots_cd else ...),
        initrd=cb_r.relpath("initrd", None if boots_cd else ...),
        cmdline=cb_r.text("cmdline", "cold_boot.cmdline", ""),
        ready_line=cb_r.text("ready_line", "cold_boot.ready_line", "" if readiness == "screen" else ...),
        timeout_s=cb_r.number_in("timeout_s", "cold_boot.timeout_s", 120.0),
    )
    if (cold_boot.kernel is None) != (cold_boot.initrd is None):
        raise cb_r.error("must be given together with cold_boot.initrd (or neither, to boot the CD)",
                         "cold_boot.kernel")
    if backend == "xen" and cold_boot.kernel is None:
        raise cb_r.error("is needed by a Xen flavour (Xen boots no CD)", "cold_boot.kernel")
    if source == "iso" and iso is None:
        raise r.error("is needed for a flavour whose source is a live ISO", "iso")
    if iso is not None and not machine.cdrom:
        raise r.error("needs a CD drive to be attached to: set machine.cdrom", "iso")
    if readiness == "channel" and not machine.guest_channel:
        raise r.error("'channel' needs the guest channel: set machine.guest_channel", "readiness")
    return Flavour(
        name=name,
        title=r.text("title", "title", name),
        priority=r.int_in("priority", "priority", 100),
        backend=backend,
        machine=machine,
        disk=disk,
        statefile=statefile,
        cold_boot=cold_boot,
        description=r.text("description", "description", ""),
        source=source,
        readiness=readiness,
        iso=iso,
        still=r.relpath("still", None),
    )


def _state_part(r: _Reader, compressions: tuple[str, ...]) -> StatePart:
    return StatePart(
        path=r.relpath("path"),
        size=r.int_in("size", "statefile.size"),
        sha256=r.matching("sha256", SHA256_RE, "64 lower-case hexadecimal digits"),
        compression=r.choice("compression", compressions),
        raw_size=r.int_in("raw_size", "statefile.raw_size"),
    )


def _lazy(r: _Reader, backend: str, machine: MachineConfig) -> LazyImage:
    """``statefile.lazy``: both parts zstd (decoding checks them), the RAM image exactly
    the guest's memory, QEMU only."""
    r.reject_unknown({"ram", "devices", "held_mib"})
    if backend != "qemu":
        raise r.error("is for QEMU flavours only", r.prefix.rstrip("."))
    ram = _state_part(r.sub("ram"), ("zstd",))  # type: ignore[arg-type]
    devices = _state_part(r.sub("devices"), ("zstd",))  # type: ignore[arg-type]
    if ram.raw_size != machine.memory_mib << 20:
        raise r.error(f"must be the guest's memory, {machine.memory_mib << 20} bytes, got {ram.raw_size}",
                      r.prefix + "ram.raw_size")
    if ram.path == devices.path:
        raise r.error("must not be the RAM image's file", r.prefix + "devices.path")
    held = r.get("held_mib", int)
    if not 0 <= held <= machine.memory_mib:
        raise r.error(f"must be from 0 to the guest's memory ({machine.memory_mib}), got {_short(held)}",
                      r.prefix + "held_mib")
    return LazyImage(ram=ram, devices=devices, held_mib=held)


def parse_office(raw: Any, names: tuple[str, ...], path: str = MANIFEST_RELPATH) -> OfficeLayout:
    """The ``office`` section: ``{server: NAME, desktops: [NAME, NAME, ...]}``, every name a
    flavour of ``names``, the server none of the desktops, no name twice, at least two desktops.

    :raises ManifestError: naming the file and the field.
    """
    r = _Reader(path, raw, None, "office.")
    r.reject_unknown({"server", "desktops"})
    server = r.get("server", str)
    raw_desktops = r.get("desktops", list)
    if server not in names:
        raise r.error(f"names {_short(server)}, which is not a flavour of this medium", "office.server")
    low, high = LIMITS["office.desktops"]
    if not low <= len(raw_desktops) <= high:
        raise r.error(f"must list {int(low)} to {int(high)} flavours, got {len(raw_desktops)}", "office.desktops")
    desktops: list[str] = []
    for i, name in enumerate(raw_desktops):
        where = f"office.desktops[{i}]"
        if not isinstance(name, str):
            raise r.error(f"must be a flavour's name, not {type(name).__name__}", where)
        if name not in names:
            raise r.error(f"names {_short(name)}, which is not a flavour of this medium", where)
        if name == server:
            raise r.error(f"names the office's server {name!r}; a server is no desktop", where)
        if name in desktops:
            raise r.error(f"names {name!r} a second time", where)
        desktops.append(name)
    return OfficeLayout(server=server, desktops=tuple(desktops))


def parse_manifest(text: str, path: str = MANIFEST_RELPATH) -> Manifest:
    """Validate the manifest's text.

    :raises ManifestError: naming the file, the flavour and the field.
    """
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(path, f"is {len(text)} characters long; a manifest is at most {MAX_MANIFEST_BYTES}")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader, stricter still
    except yaml.YAMLError as e:
        raise ManifestError(path, f"is not valid YAML: {_short_yaml_error(e)}") from e
    except (ValueError, OverflowError, RecursionError) as e:  # an integer of 5000 digits, say
        raise ManifestError(path, f"holds a value that cannot be read: {str(e)[:200]}") from e
    top = _Reader(path, data)
    top.reject_unknown({"format", "default", "created", "flavours", "office"})
    fmt = top.get("format", int)
    if fmt != FORMAT:
        raise top.error(f"format {fmt} is not supported (this manager reads format {FORMAT})", "format")
    raw_flavours = top.get("flavours", list)
    low, high = LIMITS["flavours"]
    if not low <= len(raw_flavours) <= high:
        raise top.error(f"must list {int(low)} to {int(high)} flavours, got {len(raw_flavours)}", "flavours")
    flavours = tuple(_flavour(path, raw, i) for i, raw in enumerate(raw_flavours))
    seen: set[str] = set()
    for f in flavours:
        if f.name in seen:
            raise ManifestError(path, "appears twice", f.name, "name")
        seen.add(f.name)
    default = top.get("default", str, flavours[0].name)
    if default not in seen:
        raise top.error(f"names {_short(default)}, which is not a flavour of this manifest", "default")
    created = top.text("created", "created", "")
    if created:
        try:
            datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError:
            raise top.error(f"must be an ISO 8601 date and time, got {_short(created)}", "created") from None
    office = top.get("office", dict, None)
    return Manifest(path=path, default=default, flavours=flavours, created=created,
                    office=None if office is None else parse_office(office, tuple(f.name for f in flavours), path))


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, stricter: no duplicate keys (which one would win is a
    guess), no aliases (their expansion can be exponential), no nesting deeper
    than :data:`MAX_DEPTH`, and dates left as text for the schema to judge (a
    date such as ``2026-13-45`` otherwise raises from inside the loader)."""

    yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
                               for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a manifest",
                                              event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)  # type: ignore[no-untyped-call]
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: the base class names it
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"the key {_short(key)} appears twice",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep)


def _short_yaml_error(e: yaml.YAMLError) -> str:
    return " ".join(str(e).split())[:300]


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file.

    :raises ManifestError: the file cannot be read, is too big or does not validate.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ManifestError(path, f"cannot be read: {e.strerror or e}") from e
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(path, f"is larger than {MAX_MANIFEST_BYTES} bytes; it cannot be a manifest")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(path, f"is not UTF-8 text: {e}") from e
    return parse_manifest(text, path)


def manifest_to_dict(m: Manifest) -> dict[str, Any]:
    """The YAML-ready form of a manifest (the inverse of :func:`parse_manifest`)."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if v is not None}
        return obj


    out: dict[str, Any] = {
        "format": FORMAT,
        "default": m.default,
        "created": m.created,
        "flavours": [clean(dataclasses.asdict(f)) for f in m.flavours],
    }
    if m.office is not None:
        out["office"] = {"server": m.office.server, "desktops": list(m.office.desktops)}
    return out
