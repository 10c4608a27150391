"""Can this host's CPU run a statefile's CPU model under KVM?

A statefile records the CPU model it was saved with (``machine.cpu``). Under KVM
the guest runs on the host's CPU, and QEMU can only offer the guest a feature
the host has: one the model needs but the host lacks is dropped with a warning
(or, with ``enforce``, QEMU refuses to start). A restored guest has already
looked at CPUID and uses what it saw, so a dropped feature is an invalid
instruction or a fault later, in the middle of the session. The check is made
before QEMU starts; a model the host cannot run is a named refusal, and the
flavour cold boots instead (a cold-booted guest sees the reduced CPU from its
first instruction on).

Pure: no GLib, no subprocess, no I/O except :func:`read_cpuinfo`, the one helper
that reads a file. The host is described by its ``/proc/cpuinfo`` (:func:`parse_cpuinfo`,
:class:`HostCpu`); the models by a table recorded from QEMU itself
(:mod:`xsession.cpumodel_table`, written by ``tools/cpu-models``), in QEMU's
feature names. :data:`CPUINFO_NAMES` maps those to the flags ``/proc/cpuinfo`` shows.
Every feature of every model is in exactly one of three tables:

- :data:`CPUINFO_NAMES`: the host needs it; the flags that show it;
- :data:`NOT_FROM_HOST`: a KVM guest gets it (or loses it) whatever the host has;
- :data:`UNCHECKED`: the host needs it, but ``/proc/cpuinfo`` cannot show it
  (only QEMU's ``enforce`` can catch a host without it).

The models ``host`` and ``max`` are "this host's CPU": a statefile saved with one
of them restores only on a CPU with exactly the recorded flags.

>>> host = parse_cpuinfo("vendor_id : GenuineIntel\\nmodel name : Intel(R) Core(TM) i5-2400 CPU @ 3.10GHz\\n"
...                      "flags : fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt avx vmx")
>>> host.name, host.virtualisation
('Intel Core i5-2400', 'vmx')
>>> sorted(missing_flags("Nehalem", host))[:4]
['apic', 'clflush', 'cmov', 'cx16']
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import cpumodel_table as _table
from .errors import XSessionError

__all__ = [
    "HostCpu",
    "CpuModelUnsupported",
    "parse_cpuinfo",
    "read_cpuinfo",
    "known_models",
    "required_flags",
    "missing_flags",
    "check_model",
    "supported_models",
    "choose_model",
    "split_cpu_option",
    "CONSERVATIVE_MODELS",
    "HOST_MODELS",
    "FALLBACK_MODEL",
    "CPUINFO_NAMES",
    "NOT_FROM_HOST",
    "UNCHECKED",
    "QEMU_VERSION",
]

QEMU_VERSION = _table.QEMU_VERSION
#: models meaning "all of this host's CPU": restorable only on an identical CPU
HOST_MODELS = ("host", "max")
#: what every x86-64 host runs, under TCG and KVM alike
FALLBACK_MODEL = "qemu64"

#: What mastering under KVM picks from, most capable first within each vendor.
#: Each names one fixed versioned model: a versioned name, or an alias that always
#: means the same version (``Haswell-noTSX`` is ``Haswell-v2``), never a bare name
#: like ``Haswell`` whose version the machine type chooses. Intel: the client cores
#: without TSX (microcode switches TSX off on many hosts), with and without the
#: speculation controls; AMD: the EPYC generations, then the Opterons before Zen.
CONSERVATIVE_MODELS = (
    "Skylake-Client-noTSX-IBRS",
    "Broadwell-noTSX-IBRS",
    "Broadwell-noTSX",
    "Haswell-noTSX-IBRS",
    "Haswell-noTSX",
    "IvyBridge-IBRS",
    "IvyBridge-v1",
    "SandyBridge-IBRS",
    "SandyBridge-v1",
    "Westmere-IBRS",
    "Westmere-v1",
    "Nehalem-IBRS",
    "Nehalem-v1",
    "Penryn-v1",
    "EPYC-Milan-v1",
    "EPYC-Rome-v2",
    "EPYC-Rome-v1",
    "EPYC-v3",
    "EPYC-IBPB",
    "EPYC-v1",
    "Opteron_G5-v1",
    "Opteron_G4-v1",
    "Opteron_G3-v1",
)

# -- QEMU feature names -> /proc/cpuinfo flags ----------------------------------
# Linux prints most CPUID bits under QEMU's name; these are the same, one by one.
_SAME_NAME = (
    "3dnow 3dnowext 3dnowprefetch abm adx aes apic avx avx2 avx512bw avx512cd avx512dq avx512er avx512f "
    "avx512ifma avx512pf avx512vbmi avx512vl bmi1 bmi2 cldemote clflush clflushopt clwb clzero cmov cx16 "
    "cx8 de erms f16c fma fma4 fpu fsgsbase fsrm fxsr gfni hle invpcid la57 lm mca mce misalignsse mmx "
    "mmxext movbe movdir64b movdiri mpx msr mtrr nx osvw pae pat pcid pclmulqdq pdpe1gb pge pku pni popcnt "
    "pse pse36 rdpid rdrand rdseed rdtscp rtm sep smap smep ss sse sse2 sse4a ssse3 syscall tbm tsc umip "
    "vaes vpclmulqdq wbnoinvd xgetbv1 xop xsave xsavec xsaveerptr xsaveopt xsaves"
).split()
# ... and these under another name: QEMU writes dashes and dots where Linux writes
# underscores, and the speculation-control bits show in /proc/cpuinfo only as the
# flags Linux derives from them (Linux hides the raw bits, which differ between
# Intel and AMD, and prints the common "ibrs", "ibpb", "stibp", "ssbd").
_RENAMED: dict[str, tuple[str, ...]] = {
    "sse4.1": ("sse4_1",),
    "sse4.2": ("sse4_2",),
    "lahf-lm": ("lahf_lm",),
    "cr8legacy": ("cr8_legacy",),
    "fxsr-opt": ("fxsr_opt",),
    "perfctr-core": ("perfctr_core",),
    "sha-ni": ("sha_ni",),
    "avx512-4fmaps": ("avx512_4fmaps",),
    "avx512-4vnniw": ("avx512_4vnniw",),
    "avx512-bf16": ("avx512_bf16",),
    "avx512-vpopcntdq": ("avx512_vpopcntdq",),
    "avx512bitalg": ("avx512_bitalg",),
    "avx512vbmi2": ("avx512_vbmi2",),
    "avx512vnni": ("avx512_vnni",),
    # Intel's IA32_SPEC_CTRL: KVM offers it when the host has both IBRS and IBPB
    "spec-ctrl": ("ibrs", "ibpb"),
    "stibp": ("stibp",),
    "ssbd": ("ssbd",),
    # AMD's CPUID 0x80000008 bits
    "ibrs": ("ibrs",),
    "ibpb": ("ibpb",),
    "amd-stibp": ("stibp",),
    "amd-ssbd": ("ssbd",),
}
#: QEMU feature -> the ``/proc/cpuinfo`` flags that show the host has it (all of them)
CPUINFO_NAMES: dict[str, tuple[str, ...]] = {**{n: (n,) for n in _SAME_NAME}, **_RENAMED}

#: QEMU features a KVM guest gets, or loses, whatever the host's flags: why
NOT_FROM_HOST: dict[str, str] = {
    "hypervisor": "QEMU sets it for every KVM guest",
    "x2apic": "KVM's in-kernel APIC emulates it",
    "tsc-deadline": "KVM's in-kernel APIC emulates it",
    "arat": "the emulated APIC timer always runs",
    "topoext": "QEMU offers it whatever KVM reports",
    "arch-capabilities": "KVM emulates the MSR on every host",
    # QEMU's defaults for named models under KVM
    "svm": "QEMU switches it off under KVM",
    "monitor": "QEMU switches it off under KVM",
    "acpi": "QEMU switches it off under KVM",
    # nested SVM, meaningless with svm off
    "npt": "nested SVM only, off with svm",
    "nrip-save": "nested SVM only, off with svm",
    "svme-addr-chk": "nested SVM only, off with svm",
    "vgif": "nested SVM only, off with svm",
}

#: QEMU features a host needs but ``/proc/cpuinfo`` does not show: why
UNCHECKED: dict[str, str] = {
    "ibrs-all": "a bit of the IA32_ARCH_CAPABILITIES MSR, not a CPUID flag",
    "mds-no": "a bit of the IA32_ARCH_CAPABILITIES MSR, not a CPUID flag",
    "pschange-mc-no": "a bit of the IA32_ARCH_CAPABILITIES MSR, not a CPUID flag",
    "rdctl-no": "a bit of the IA32_ARCH_CAPABILITIES MSR, not a CPUID flag",
    "skip-l1dfl-vmentry": "a bit of the IA32_ARCH_CAPABILITIES MSR, not a CPUID flag",
    "taa-no": "a bit of the IA32_ARCH_CAPABILITIES MSR, not a CPUID flag",
    "core-capability": "Linux does not print it",
    "split-lock-detect": "a bit of the IA32_CORE_CAPABILITIES MSR; Linux prints it only when it uses it",
}

#: other spellings QEMU accepts in ``-cpu`` options (after ``_`` became ``-``)
_QEMU_ALIASES = {
    "sse3": "pni", "pclmuldq": "pclmulqdq", "xd": "nx", "i64": "lm", "ffxsr": "fxsr-opt",
    "sse4-1": "sse4.1", "sse4-2": "sse4.2",
}
_TRUE = ("on", "true", "yes")
_FALSE = ("off", "false", "no")


# -- the host -------------------------------------------------------------------
@dataclass(frozen=True)
class HostCpu:
    """The host's CPU as ``/proc/cpuinfo`` shows its first processor."""

    vendor: str                  # "GenuineIntel", "AuthenticAMD"; "" when not given
    model_name: str              # as the kernel prints it; "" when not given
    flags: frozenset[str]
    virtualisation: str | None   # "vmx" (Intel VT-x), "svm" (AMD-V) or None

    @property
    def name(self) -> str:
        """The model name without trademarks, clock and padding, for messages:
        "Intel(R) Core(TM) i5-2400 CPU @ 3.10GHz" -> "Intel Core i5-2400"."""
        text = re.sub(r"\((R|TM|tm)\)", "", self.model_name)
        text = re.sub(r"@.*$", "", text)
        text = re.sub(r"\b(CPU|Processor)\b", "", text)
        text = " ".join(text.split())
        return text or self.vendor or "unknown CPU"


def parse_cpuinfo(text: str) -> HostCpu:
    """The first processor of a ``/proc/cpuinfo`` text.

    Lines are ``key : value``; the first processor's block ends at the first
    empty line after it began. Anything else in the text is ignored.

    :raises ValueError: the first block has no ``flags`` line (not an x86 cpuinfo).
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    if "flags" not in fields:
        raise ValueError("no 'flags' line in the first processor of the cpuinfo text: not an x86 /proc/cpuinfo")
    flags = frozenset(fields["flags"].split())
    virt = "vmx" if "vmx" in flags else "svm" if "svm" in flags else None
    return HostCpu(vendor=fields.get("vendor_id", ""), model_name=fields.get("model name", ""),
                   flags=flags, virtualisation=virt)


def read_cpuinfo(path: str | os.PathLike[str] = "/proc/cpuinfo") -> HostCpu:
    """:func:`parse_cpuinfo` of a file.

    :raises OSError: the file cannot be read.
    :raises ValueError: it is not an x86 cpuinfo.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_cpuinfo(f.read())


# -- the refusal ----------------------------------------------------------------
class CpuModelUnsupported(XSessionError):
    """The statefile's CPU model cannot be restored on this host's CPU.

    ``kind`` says why: ``"missing"`` (the model needs flags the host lacks),
    ``"unknown"`` (a model the table does not know, or a feature option whose
    host flag is unknown), ``"host-only"`` (saved with ``host`` or ``max`` on a
    different CPU, or without a record of that CPU's flags).
    """

    dbus_name = "Failed"

    def __init__(self, model: str, host: str, kind: str, missing: Iterable[str] = (),
                 extra: Iterable[str] = (), detail: str = ""):
        self.model = model
        self.host = host
        self.kind = kind
        self.missing = tuple(sorted(missing))
        self.extra = tuple(sorted(extra))
        self.detail = detail
        super().__init__(model, host, kind, self.missing, self.extra, detail)

    def __str__(self) -> str:
        cpu = f"this host's CPU ({self.host})"
        if self.kind == "missing":
            return f"the statefile's CPU model {self.model} needs {', '.join(self.missing)} that {cpu} lacks"
        if self.kind == "unknown":
            why = f" ({self.detail})" if self.detail else ""
            return f"the statefile's CPU model {self.model!r} is unknown{why}: cannot tell whether {cpu} can run it"
        text = f"the statefile was saved with CPU model {self.model}, which restores only on the CPU it was saved on"
        if self.detail:
            return f"{text}, and {self.detail}"
        parts = []
        if self.missing:
            parts.append(f"lacks {', '.join(self.missing)}")
        if self.extra:
            parts.append(f"has {', '.join(self.extra)} besides")
        return f"{text}; {cpu} differs from it: " + "; ".join(parts)


# -- models ---------------------------------------------------------------------
def known_models() -> tuple[str, ...]:
    """Every model name the table knows: versioned names and their aliases, sorted."""
    return tuple(sorted({*_table.MODELS, *_table.ALIASES}))


def split_cpu_option(cpu: str) -> tuple[str, frozenset[str], frozenset[str]]:
    """A ``-cpu`` value: the model, the CPUID features it adds, those it removes.

    ``"Haswell-noTSX,+pcid,-invpcid,enforce"`` -> ``("Haswell-noTSX", {"pcid"},
    {"invpcid"})``. Options that are not CPUID features (``enforce``,
    ``migratable=on``, ``hv-relaxed``) are ignored; feature names are QEMU's
    canonical ones (``sse4_2`` becomes ``sse4.2``).
    """
    model, *options = cpu.split(",")
    added: set[str] = set()
    removed: set[str] = set()
    for opt in options:
        on: bool | None
        if opt[:1] in ("+", "-"):
            key, on = opt[1:], opt[0] == "+"
        else:
            key, sep, value = opt.partition("=")
            on = True if not sep or value in _TRUE else False if value in _FALSE else None
        key = key.replace("_", "-")
        key = _QEMU_ALIASES.get(key, key)
        if on is None or key not in _table.FEATURES:
            continue
        (added if on else removed).add(key)
        (removed if on else added).discard(key)
    return model, frozenset(added), frozenset(removed)


def _host_flags_for(features: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """The cpuinfo flags these QEMU features need, and the features no table knows."""
    flags: set[str] = set()
    unknown: set[str] = set()
    for feat in features:
        if feat in CPUINFO_NAMES:
            flags.update(CPUINFO_NAMES[feat])
        elif feat not in NOT_FROM_HOST and feat not in UNCHECKED:
            unknown.add(feat)
    return frozenset(flags), frozenset(unknown)


def _required(cpu: str) -> frozenset[str] | str:
    """The cpuinfo flags a ``-cpu`` value needs under KVM, or why that cannot be told."""
    model, added, removed = split_cpu_option(cpu)
    if model in HOST_MODELS:
        return f"{model} is this host's CPU"
    versioned = _table.ALIASES.get(model, model)
    if versioned not in _table.MODELS:
        return f"not a CPU model of QEMU {QEMU_VERSION}"
    features = (set(_table.MODELS[versioned][2]) | added) - removed
    flags, unknown = _host_flags_for(features)
    if unknown:
        return f"no known host flag for {', '.join(sorted(unknown))}"
    return flags


def required_flags(cpu: str) -> frozenset[str]:
    """The ``/proc/cpuinfo`` flags a host needs to run ``cpu`` (a ``-cpu`` value) under KVM.

    :raises ValueError: an unknown model, ``host`` or ``max``, or an added feature
        whose host flag is unknown.
    """
    need = _required(cpu)
    if isinstance(need, str):
        raise ValueError(f"CPU model {cpu!r}: {need}")
    return need


def missing_flags(model: str, host: HostCpu, saved_flags: Iterable[str] | None = None) -> frozenset[str]:
    """The flags ``model`` (a ``-cpu`` value) needs that ``host`` lacks; empty when it can run it.

    For ``host`` and ``max``: the recorded ``saved_flags`` the host lacks.

    :raises CpuModelUnsupported: cannot tell (an unknown model; ``host`` or ``max``
        without ``saved_flags``).
    """
    name = split_cpu_option(model)[0]
    if name in HOST_MODELS:
        if saved_flags is None:
            raise CpuModelUnsupported(model, host.name, "host-only",
                                      detail="the statefile does not record that CPU's flags")
        return frozenset(saved_flags) - host.flags
    need = _required(model)
    if isinstance(need, str):
        raise CpuModelUnsupported(model, host.name, "unknown", detail=need)
    return need - host.flags


def check_model(model: str, host: HostCpu, saved_flags: Iterable[str] | None = None) -> None:
    """Refuse a statefile whose CPU model ``host`` cannot run under KVM.

    ``model`` is the statefile's ``machine.cpu``; ``saved_flags`` the flags of the
    CPU it was saved on, needed (and then compared exactly) for ``host`` and ``max``.

    :raises CpuModelUnsupported: naming the model, the host's CPU and the missing
        flags; or the model is unknown; or a ``host``/``max`` statefile from another CPU.
    """
    missing = missing_flags(model, host, saved_flags)
    if split_cpu_option(model)[0] in HOST_MODELS:
        extra = host.flags - frozenset(saved_flags or ())
        if missing or extra:
            raise CpuModelUnsupported(model, host.name, "host-only", missing=missing, extra=extra)
        return
    if missing:
        raise CpuModelUnsupported(model, host.name, "missing", missing=missing)


def supported_models(host: HostCpu, models: Sequence[str] | None = None) -> tuple[str, ...]:
    """The models (default: all known) that ``host`` can run under KVM, in the order given."""
    out = []
    for m in known_models() if models is None else models:
        need = _required(m)
        if not isinstance(need, str) and need <= host.flags:
            out.append(m)
    return tuple(out)


def _vendor(model: str) -> str:
    name = split_cpu_option(model)[0]
    versioned = _table.ALIASES.get(name, name)
    return _table.MODELS[versioned][0] if versioned in _table.MODELS else ""


def choose_model(host: HostCpu, candidates: Sequence[str] = CONSERVATIVE_MODELS) -> str:
    """The CPU model mastering under KVM saves with: the first of ``candidates``
    (most capable first) from the host's vendor that the host can run; else
    :data:`FALLBACK_MODEL`. A shorter list caps how new a CPU the statefile needs."""
    for m in supported_models(host, candidates):
        if _vendor(m) == host.vendor:
            return m
    return FALLBACK_MODEL
