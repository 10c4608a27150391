"""The medium's ``xenubuntu/manifest.yaml``: parsed once into frozen dataclasses.

Every error names the file, the flavour and the field. Paths in the manifest are
relative to the folder that holds it and may not leave it. Parsing does no I/O
beyond reading the one file (:func:`load_manifest`); :func:`parse_manifest`
takes the text, so the rules are tested as plain functions.

A restore must use exactly the guest-visible machine configuration the
statefile was saved with (QEMU's stream does not carry all of it: a different
CPU model or extra device loads silently and breaks later). The statefile entry
therefore records the configuration it was saved with, and a flavour whose
``machine`` differs from it is rejected, naming the field.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ManifestError, NoSuchFlavour

__all__ = [
    "FORMAT",
    "MachineConfig",
    "Statefile",
    "Disk",
    "ColdBoot",
    "Flavour",
    "Manifest",
    "parse_manifest",
    "load_manifest",
    "manifest_to_dict",
    "MANIFEST_RELPATH",
]

FORMAT = 1
MANIFEST_RELPATH = "xenubuntu/manifest.yaml"
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
BACKENDS = ("qemu", "xen")
COMPRESSIONS = ("zstd", "none")


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

    def differences(self, other: MachineConfig) -> list[str]:
        """Names and both values of every field that differs, for error messages."""
        out = []
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{f.name} is {mine!r} but the statefile was saved with {theirs!r}")
        return out


@dataclass(frozen=True)
class Statefile:
    """A saved running state: where it is and how to check it before trusting it."""

    path: str
    size: int
    sha256: str
    compression: str
    raw_size: int
    saved_with: MachineConfig


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

    kernel: str
    initrd: str
    cmdline: str
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

    @property
    def memory_mib(self) -> int:
        return self.machine.memory_mib

    @property
    def vcpus(self) -> int:
        return self.machine.vcpus


@dataclass(frozen=True)
class Manifest:
    path: str
    default: str
    flavours: tuple[Flavour, ...]
    created: str = ""

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
        return self.root / relpath


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

    def positive_int(self, key: str, default: Any = ..., maximum: int | None = None) -> int:
        value = self.get(key, int, default)
        if value < 1 or (maximum is not None and value > maximum):
            bound = f" and at most {maximum}" if maximum is not None else ""
            raise self.error(f"must be at least 1{bound}, got {value}", self._field(key))
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise self.error(f"must be one of {', '.join(choices)}, got {value!r}", self._field(key))
        return value

    def relpath(self, key: str, default: Any = ...) -> Any:
        value = self.get(key, str, default)
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


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", str: "a string", dict: "a mapping", list: "a list", float: "a number", bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _machine(r: _Reader) -> MachineConfig:
    r.reject_unknown({f.name for f in dataclasses.fields(MachineConfig)})
    return MachineConfig(
        machine_type=r.get("machine_type", str),
        memory_mib=r.positive_int("memory_mib", maximum=1 << 20),
        vcpus=r.positive_int("vcpus", 1, maximum=256),
        accel=r.choice("accel", ("tcg", "kvm"), "tcg"),
        cpu=r.get("cpu", str, "qemu64"),
        vga=r.choice("vga", ("std", "none"), "std"),
        disk_bus=r.choice("disk_bus", ("virtio", "ide", "none"), "virtio"),
    )


def _flavour(path: str, raw: Any, index: int) -> Flavour:
    name = raw.get("name") if isinstance(raw, dict) else None
    r = _Reader(path, raw, name if isinstance(name, str) else f"#{index + 1}", "")
    name = r.get("name", str)
    if not NAME_RE.match(name):
        raise r.error("must be lower-case letters, digits or '_', starting with a letter, at most 32 long", "name")
    r.reject_unknown({"name", "title", "priority", "backend", "machine", "disk", "statefile", "cold_boot"})
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
        sf_r.reject_unknown({"path", "size", "sha256", "compression", "raw_size", "saved_with"})
        sha = sf_r.get("sha256", str)
        if not SHA256_RE.match(sha):
            raise sf_r.error("must be 64 lower-case hexadecimal digits", "statefile.sha256")
        saved_with = _machine(sf_r.sub("saved_with"))  # type: ignore[arg-type]
        statefile = Statefile(
            path=sf_r.relpath("path"),
            size=sf_r.positive_int("size"),
            sha256=sha,
            compression=sf_r.choice("compression", COMPRESSIONS),
            raw_size=sf_r.positive_int("raw_size"),
            saved_with=saved_with,
        )
        diffs = machine.differences(saved_with)
        if diffs:
            raise r.error("machine configuration differs from the one the statefile needs: " + "; ".join(diffs),
                          "machine")
    cb_r = r.sub("cold_boot")
    assert cb_r is not None
    cb_r.reject_unknown({"kernel", "initrd", "cmdline", "ready_line", "timeout_s"})
    timeout = cb_r.get("timeout_s", (int, float), 120.0)
    if timeout <= 0:
        raise cb_r.error("must be positive", "cold_boot.timeout_s")
    cold_boot = ColdBoot(
        kernel=cb_r.relpath("kernel"),
        initrd=cb_r.relpath("initrd"),
        cmdline=cb_r.get("cmdline", str, ""),
        ready_line=cb_r.get("ready_line", str),
        timeout_s=float(timeout),
    )
    return Flavour(
        name=name,
        title=r.get("title", str, name),
        priority=r.get("priority", int, 100),
        backend=backend,
        machine=machine,
        disk=disk,
        statefile=statefile,
        cold_boot=cold_boot,
    )


def parse_manifest(text: str, path: str = MANIFEST_RELPATH) -> Manifest:
    """Validate the manifest's text.

    :raises ManifestError: naming the file, the flavour and the field.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ManifestError(path, f"is not valid YAML: {e}") from e
    top = _Reader(path, data)
    top.reject_unknown({"format", "default", "created", "flavours"})
    fmt = top.get("format", int)
    if fmt != FORMAT:
        raise top.error(f"format {fmt} is not supported (this manager reads format {FORMAT})", "format")
    raw_flavours = top.get("flavours", list)
    if not raw_flavours:
        raise top.error("must list at least one flavour", "flavours")
    flavours = tuple(_flavour(path, raw, i) for i, raw in enumerate(raw_flavours))
    seen: set[str] = set()
    for f in flavours:
        if f.name in seen:
            raise ManifestError(path, "appears twice", f.name, "name")
        seen.add(f.name)
    default = top.get("default", str, flavours[0].name)
    if default not in seen:
        raise top.error(f"names {default!r}, which is not a flavour of this manifest", "default")
    created = top.get("created", str, "")
    return Manifest(path=path, default=default, flavours=flavours, created=created)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file.

    :raises ManifestError: the file cannot be read or does not validate.
    """
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ManifestError(path, f"cannot be read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ManifestError(path, f"is not UTF-8 text: {e}") from e
    return parse_manifest(text, path)


def manifest_to_dict(m: Manifest) -> dict[str, Any]:
    """The YAML-ready form of a manifest (the inverse of :func:`parse_manifest`)."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if v is not None}
        return obj


    return {
        "format": FORMAT,
        "default": m.default,
        "created": m.created,
        "flavours": [clean(dataclasses.asdict(f)) for f in m.flavours],
    }
