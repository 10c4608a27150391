"""The ``xl`` toolstack, one function per verb.

Every call is an argv list (no shell), runs under a timeout and raises
:class:`XlError` with the argv, the exit status and xl's own stderr when it
fails. ``xl info`` and ``xl list`` (plain and ``-l`` JSON) are parsed into
frozen dataclasses; the parsers are plain functions so they are tested on
recorded outputs.

xl's output goes to temporary files, not pipes: ``xl create`` and
``xl restore`` leave a daemon behind that watches the domain, and a pipe it
inherited would keep a reader waiting for end-of-file until the domain dies.

Error tree::

    HypervisorError
     +-- XlError            xl exited non-zero, or did not finish in time
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import HypervisorError

T = TypeVar("T")

__all__ = [
    "XlError",
    "XlInfo",
    "ListEntry",
    "DomainConfig",
    "parse_info",
    "parse_list",
    "parse_list_long",
    "create",
    "restore",
    "save",
    "pause",
    "unpause",
    "destroy",
    "mem_set",
    "info",
    "list_domains",
    "list_long",
    "console_argv",
    "domain_exists",
    "is_no_such_domain",
    "write_config",
    "XL",
]

#: the xl program; libxl finds its helpers through its compiled-in path, not PATH
XL = "xl"
#: seconds for verbs that only talk to xenstore and the hypervisor
QUICK = 30.0
#: seconds for verbs that move a whole domain's memory (save, restore, create under TCG)
SLOW = 300.0


class XlError(HypervisorError):
    """``xl`` failed: keeps the argv, the exit status (None: timed out) and stderr."""

    def __init__(self, argv: Sequence[str], status: int | None, stderr: str, timeout: float | None = None):
        why = f"timed out after {timeout:g} s" if status is None else f"exit status {status}"
        super().__init__(" ".join(argv), why, stderr)
        self.argv = list(argv)
        self.status = status
        self.stderr = stderr
        self.timeout = timeout


@dataclass(frozen=True)
class Result:
    """What a finished xl call printed."""

    argv: list[str]
    stdout: str
    stderr: str


#: verbs that only read: safe to run again when xl dies of a signal
_READ_ONLY = ("info", "list")
#: how often a read-only verb is tried when xl dies of a signal (seen under QEMU's TCG:
#: ``libxl_fork.c: atfork_lock: Assertion `!r' failed``, a symptom of Xen's lazy FPU
#: switching there, which the TCG settings of our images and test hosts now turn off)
_READ_TRIES = 3


def _run(args: Sequence[str], timeout: float, pass_fds: Sequence[int] = (), xl: str = XL,
         on_start: Callable[[int], None] | None = None) -> Result:
    """Run ``xl ARGS`` to completion; read-only verbs are retried when xl dies of a signal.

    :raises XlError: non-zero exit, timeout (the process is killed), or xl cannot be started.
    """
    tries = _READ_TRIES if args and args[0] in _READ_ONLY else 1
    for attempt in range(tries):
        try:
            return _run_once(args, timeout, pass_fds, xl, on_start)
        except XlError as e:
            if e.status is None or e.status >= 0 or attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def _run_once(args: Sequence[str], timeout: float, pass_fds: Sequence[int], xl: str,
              on_start: Callable[[int], None] | None = None) -> Result:
    argv = [xl, *args]
    # freed at the end of the with-block; files, not pipes (see the module docstring)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    pass_fds=tuple(pass_fds))
        except OSError as e:
            raise XlError(argv, -1, f"cannot run {xl}: {e}") from e
        if on_start is not None:
            on_start(proc.pid)
        try:
            status: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = None
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    if status != 0:
        raise XlError(argv, status, stderr, timeout if status is None else None)
    return Result(argv, stdout, stderr)


# --- parsed outputs ---------------------------------------------------------


@dataclass(frozen=True)
class XlInfo:
    """``xl info``: the host as Xen sees it. Memory figures are MiB, as xl prints them."""

    host: str
    xen_version: str
    xen_caps: str
    virt_caps: str
    nr_cpus: int
    total_memory: int
    free_memory: int
    outstanding_claims: int
    xen_commandline: str
    fields: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


def parse_info(text: str) -> XlInfo:
    """Parse ``xl info`` (``key   : value`` lines; values may hold colons).

    :raises ValueError: a field we need is missing or not a number.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            fields[key.strip()] = value.strip()

    def num(key: str, default: int | None = None) -> int:
        if key not in fields:
            if default is not None:
                return default
            raise ValueError(f"xl info: no {key!r} line")
        try:
            return int(fields[key])
        except ValueError:
            raise ValueError(f"xl info: {key} is {fields[key]!r}, not a number") from None

    return XlInfo(
        host=fields.get("host", ""),
        xen_version=fields.get("xen_version", ""),
        xen_caps=fields.get("xen_caps", ""),
        virt_caps=fields.get("virt_caps", ""),
        nr_cpus=num("nr_cpus"),
        total_memory=num("total_memory"),
        free_memory=num("free_memory"),
        outstanding_claims=num("outstanding_claims", 0),
        xen_commandline=fields.get("xen_commandline", ""),
        fields=fields,
    )


@dataclass(frozen=True)
class ListEntry:
    """One row of plain ``xl list``: the only listing that shows the run state."""

    name: str
    domid: int
    mem_mib: int
    vcpus: int
    state: str
    cpu_time_s: float

    @property
    def running(self) -> bool:
        return "r" in self.state or "b" in self.state

    @property
    def paused(self) -> bool:
        return "p" in self.state

    @property
    def shutdown(self) -> bool:
        return "s" in self.state

    @property
    def crashed(self) -> bool:
        return "c" in self.state

    @property
    def dying(self) -> bool:
        return "d" in self.state


def parse_list(text: str) -> list[ListEntry]:
    """Parse plain ``xl list``: a header, then ``Name ID Mem VCPUs State Time(s)``.

    :raises ValueError: a row that does not have those six columns.
    """
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] == "Name":
            continue
        if len(parts) != 6:
            raise ValueError(f"xl list: unexpected row {line!r}")
        name, domid, mem, vcpus, state, cpu = parts
        try:
            rows.append(ListEntry(name, int(domid), int(mem), int(vcpus), state, float(cpu)))
        except ValueError:
            raise ValueError(f"xl list: unexpected row {line!r}") from None
    return rows


@dataclass(frozen=True)
class DomainConfig:
    """One domain of ``xl list -l``: its id and the configuration libxl keeps for it."""

    domid: int
    name: str
    type: str
    max_vcpus: int
    max_memkb: int
    target_memkb: int
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def max_mib(self) -> int:
        return self.max_memkb // 1024

    @property
    def target_mib(self) -> int:
        return self.target_memkb // 1024


def parse_list_long(text: str) -> list[DomainConfig]:
    """Parse ``xl list -l`` JSON (an array of ``{"domid", "config": {c_info, b_info, ...}}``).

    :raises ValueError: not JSON, or not of that shape.
    """
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"xl list -l: not JSON: {e}") from e
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError("xl list -l: expected a JSON array")
    out = []
    for i, dom in enumerate(data):
        try:
            cfg = dom.get("config") or {}
            c_info = cfg.get("c_info") or {}
            b_info = cfg.get("b_info") or {}
            out.append(DomainConfig(
                domid=int(dom["domid"]),
                name=str(c_info.get("name", "")),
                type=str(c_info.get("type", "")),
                max_vcpus=int(b_info.get("max_vcpus", 0)),
                max_memkb=int(b_info.get("max_memkb", 0)),
                target_memkb=int(b_info.get("target_memkb", 0)),
                config=cfg,
            ))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"xl list -l: domain #{i}: {e!r}") from e
    return out


# --- the verbs ----------------------------------------------------------------


def create(config: str | os.PathLike[str], *, paused: bool = False, timeout: float = SLOW,
           xl: str = XL) -> None:
    """``xl create [-p] CONFIG``: build and start a domain.

    :raises XlError: xl refused (its stderr says why) or timed out.
    """
    _run(["create", *(["-p"] if paused else []), os.fspath(config)], timeout, xl=xl)


def restore(image: str | os.PathLike[str], config: str | os.PathLike[str] | None = None, *,
            paused: bool = True, pass_fds: Sequence[int] = (), timeout: float = SLOW,
            xl: str = XL, on_start: Callable[[int], None] | None = None) -> None:
    """``xl restore [-p] [CONFIG] IMAGE``: rebuild a domain from a save image.

    ``IMAGE`` may be ``/dev/fd/N`` for a pipe the caller feeds (pass ``N`` in
    ``pass_fds``). Paused by default, so the caller can check before the guest runs.

    :raises XlError: the image was refused or the stream broke (xl's words in stderr).
    """
    args = ["restore", *(["-p"] if paused else [])]
    if config is not None:
        args.append(os.fspath(config))
    _run([*args, os.fspath(image)], timeout, pass_fds, xl=xl, on_start=on_start)


def save(domain: str, image: str | os.PathLike[str], *, timeout: float = SLOW, xl: str = XL) -> None:
    """``xl save DOMAIN IMAGE``: write the domain's state, then destroy it.

    :raises XlError: xl failed (for instance no space left for the image).
    """
    _run(["save", domain, os.fspath(image)], timeout, xl=xl)


def pause(domain: str, *, timeout: float = QUICK, xl: str = XL) -> None:
    """``xl pause DOMAIN``.

    :raises XlError: no such domain, or xl failed.
    """
    _run(["pause", domain], timeout, xl=xl)


def unpause(domain: str, *, timeout: float = QUICK, xl: str = XL) -> None:
    """``xl unpause DOMAIN``.

    :raises XlError: no such domain, or xl failed.
    """
    _run(["unpause", domain], timeout, xl=xl)


def destroy(domain: str, *, timeout: float = QUICK, xl: str = XL) -> None:
    """``xl destroy DOMAIN``: end it at once, no shutdown.

    :raises XlError: no such domain, or xl failed.
    """
    _run(["destroy", domain], timeout, xl=xl)


def mem_set(domain: str, mib: int, *, timeout: float = QUICK, xl: str = XL) -> None:
    """``xl mem-set DOMAIN Nm``: set a domain's balloon target (domain ``0`` is dom0).

    :raises XlError: the target is refused (above the domain's maximum, say).
    """
    _run(["mem-set", domain, f"{int(mib)}m"], timeout, xl=xl)


def _parsed(args: list[str], parse: Callable[[str], T], timeout: float, xl: str) -> T:
    """Run an xl verb and parse what it printed; output we cannot parse is xl's failure too.

    :raises XlError: xl failed, or printed something we cannot parse.
    """
    r = _run(args, timeout, xl=xl)
    try:
        return parse(r.stdout)
    except ValueError as e:
        raise XlError(r.argv, 0, f"{e}\n{r.stdout[-500:]}") from e


def info(*, timeout: float = QUICK, xl: str = XL) -> XlInfo:
    """``xl info``, parsed.

    :raises XlError: xl failed, or printed something we cannot parse.
    """
    return _parsed(["info"], parse_info, timeout, xl)


def list_domains(domain: str | None = None, *, timeout: float = QUICK, xl: str = XL) -> list[ListEntry]:
    """Plain ``xl list [DOMAIN]``, parsed: names, ids, memory and run state.

    :raises XlError: no such domain (when one is named), or xl failed.
    """
    return _parsed(["list", *([domain] if domain else [])], parse_list, timeout, xl)


def list_long(domain: str | None = None, *, timeout: float = QUICK, xl: str = XL) -> list[DomainConfig]:
    """``xl list -l [DOMAIN]``, parsed: each domain's configuration.

    :raises XlError: no such domain (when one is named), or xl failed.
    """
    return _parsed(["list", "-l", *([domain] if domain else [])], parse_list_long, timeout, xl)


def console_argv(domain: str, *, xl: str = XL) -> list[str]:
    """The argv of ``xl console`` for a domain's PV console (a long-running reader)."""
    return [xl, "console", "-t", "pv", domain]


def domain_exists(domain: str, *, timeout: float = QUICK, xl: str = XL) -> ListEntry | None:
    """The domain's ``xl list`` row, or None when xl says there is no such domain.

    :raises XlError: xl failed for another reason.
    """
    try:
        rows = list_domains(domain, timeout=timeout, xl=xl)
    except XlError as e:
        if is_no_such_domain(e):
            return None
        raise
    return rows[0] if rows else None


def is_no_such_domain(error: XlError) -> bool:
    """Whether xl failed because the domain is not there.

    xl words it "NAME is an invalid domain identifier" for a name and
    "Domain 'N' does not exist." for an id.
    """
    return error.status is not None and ("invalid domain identifier" in error.stderr
                                         or "does not exist" in error.stderr)


def write_config(path: Path, settings: Mapping[str, str | int | list[str]]) -> Path:
    """Write an xl config file (``key = value``; strings quoted, lists of strings in brackets)
    and return its path."""
    lines = []
    for key, value in settings.items():
        lines.append(f"{key} = {value}" if isinstance(value, int) else f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
