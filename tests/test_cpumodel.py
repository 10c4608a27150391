"""The CPU model check: recorded /proc/cpuinfo files, the table against QEMU, properties."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xsession import cpumodel_table as table
from xsession.cpumodel import (
    CONSERVATIVE_MODELS,
    CPUINFO_NAMES,
    FALLBACK_MODEL,
    NOT_FROM_HOST,
    UNCHECKED,
    CpuModelUnsupported,
    HostCpu,
    check_model,
    choose_model,
    known_models,
    missing_flags,
    parse_cpuinfo,
    read_cpuinfo,
    required_flags,
    split_cpu_option,
    supported_models,
)
from xsession.errors import XSessionError

ROOT = Path(__file__).resolve().parent.parent
CPUINFO = Path(__file__).resolve().parent / "cpuinfo"


def host(name: str) -> HostCpu:
    return read_cpuinfo(CPUINFO / f"{name}.txt")


# -- recorded hosts ---------------------------------------------------------------
# file -> (vendor, short name, virtualisation, chosen model)
HOSTS = {
    "intel-core2-e8400": ("GenuineIntel", "Intel Core2 Duo E8400", "vmx", "Penryn-v1"),
    "intel-core-i5-2400": ("GenuineIntel", "Intel Core i5-2400", "vmx", "SandyBridge-IBRS"),
    "intel-core-i7-12700k": ("GenuineIntel", "12th Gen Intel Core i7-12700K", "vmx", "Skylake-Client-noTSX-IBRS"),
    "amd-ryzen7-3700x": ("AuthenticAMD", "AMD Ryzen 7 3700X 8-Core", "svm", "EPYC-Rome-v2"),
    # a cloud guest: no svm (no nested KVM), and its hypervisor hides rdseed, ibpb and stibp
    "amd-epyc-guest": ("AuthenticAMD", "AMD EPYC", None, "Opteron_G3-v1"),
}


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_recorded_hosts_parse(name: str) -> None:
    vendor, short, virt, _ = HOSTS[name]
    h = host(name)
    assert (h.vendor, h.name, h.virtualisation) == (vendor, short, virt)
    assert {"fpu", "sse2", "lm"} <= h.flags


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_choose_model_on_recorded_hosts(name: str) -> None:
    chosen = choose_model(host(name))
    assert chosen == HOSTS[name][3]
    check_model(chosen, host(name))


# which of the models a medium would use each recorded host can run under KVM
SUPPORTS = {
    "intel-core2-e8400": {"qemu64", "kvm64", "Penryn"},
    "intel-core-i5-2400": {"qemu64", "kvm64", "Penryn", "Nehalem", "Westmere", "SandyBridge", "SandyBridge-IBRS"},
    "intel-core-i7-12700k": {"qemu64", "kvm64", "Penryn", "Nehalem", "Westmere", "SandyBridge", "SandyBridge-IBRS",
                             "IvyBridge", "Haswell-noTSX", "Haswell-noTSX-IBRS", "Broadwell-noTSX",
                             "Skylake-Client-noTSX-IBRS"},
    "amd-ryzen7-3700x": {"qemu64", "kvm64", "Penryn", "Nehalem", "Westmere", "SandyBridge", "SandyBridge-IBRS",
                         "EPYC", "EPYC-IBPB", "EPYC-Rome"},
    "amd-epyc-guest": {"qemu64", "kvm64", "Penryn", "Nehalem", "Westmere", "SandyBridge", "IvyBridge",
                       "Haswell-noTSX"},
}
MEDIUM_MODELS = ("qemu64", "kvm64", "Penryn", "Nehalem", "Westmere", "SandyBridge", "SandyBridge-IBRS", "IvyBridge",
                 "Haswell-noTSX", "Haswell-noTSX-IBRS", "Broadwell-noTSX", "Skylake-Client-noTSX-IBRS", "EPYC",
                 "EPYC-IBPB", "EPYC-Rome", "EPYC-Milan")


@pytest.mark.parametrize("name", sorted(SUPPORTS))
def test_supported_models_on_recorded_hosts(name: str) -> None:
    assert set(supported_models(host(name), MEDIUM_MODELS)) == SUPPORTS[name]


def test_refusal_names_model_missing_flags_and_host() -> None:
    with pytest.raises(CpuModelUnsupported) as e:
        check_model("Haswell-noTSX", host("intel-core-i5-2400"))
    assert str(e.value) == (
        "the statefile's CPU model Haswell-noTSX needs abm, avx2, bmi1, bmi2, erms, f16c, fma, fsgsbase, invpcid, "
        "movbe, rdrand, smep that this host's CPU (Intel Core i5-2400) lacks")
    assert e.value.missing == ("abm", "avx2", "bmi1", "bmi2", "erms", "f16c", "fma", "fsgsbase", "invpcid",
                               "movbe", "rdrand", "smep")
    assert isinstance(e.value, XSessionError) and e.value.dbus_name == "Failed"


def test_old_core2_lacks_nehalem() -> None:
    assert missing_flags("Nehalem", host("intel-core2-e8400")) == {"popcnt", "sse4_2"}
    with pytest.raises(CpuModelUnsupported, match=r"Nehalem needs popcnt, sse4_2 that this host's CPU "
                                                  r"\(Intel Core2 Duo E8400\) lacks"):
        check_model("Nehalem", host("intel-core2-e8400"))


def test_zen2_lacks_pcid_and_erms_for_intel_models() -> None:
    assert missing_flags("Haswell-noTSX", host("amd-ryzen7-3700x")) == {"erms", "invpcid", "pcid"}
    assert missing_flags("EPYC-Milan", host("amd-ryzen7-3700x")) == {"erms", "fsrm", "invpcid", "pcid", "pku"}


def test_kvm_supplies_x2apic_and_tsc_deadline() -> None:
    # Zen 2 desktop parts report neither, yet KVM's in-kernel APIC gives both to SandyBridge guests
    h = host("amd-ryzen7-3700x")
    assert "x2apic" not in h.flags and "tsc_deadline_timer" not in h.flags
    check_model("SandyBridge", h)


def test_unknown_model_is_a_named_refusal() -> None:
    with pytest.raises(CpuModelUnsupported) as e:
        check_model("Pentium-Pro-9000", host("intel-core-i5-2400"))
    assert e.value.kind == "unknown"
    assert str(e.value) == ("the statefile's CPU model 'Pentium-Pro-9000' is unknown (not a CPU model of QEMU "
                            f"{table.QEMU_VERSION}): cannot tell whether this host's CPU (Intel Core i5-2400) "
                            "can run it")


@pytest.mark.parametrize("model", ["host", "max"])
def test_host_model_restores_only_on_identical_flags(model: str) -> None:
    h = host("intel-core-i5-2400")
    check_model(model, h, saved_flags=h.flags)
    with pytest.raises(CpuModelUnsupported, match="does not record that CPU's flags"):
        check_model(model, h)
    with pytest.raises(CpuModelUnsupported) as e:
        check_model(model, h, saved_flags=(h.flags - {"avx"}) | {"avx2"})
    assert (e.value.kind, e.value.missing, e.value.extra) == ("host-only", ("avx2",), ("avx",))
    assert str(e.value).endswith("this host's CPU (Intel Core i5-2400) differs from it: lacks avx2; has avx besides")


def test_cpu_options_add_and_remove_features() -> None:
    assert split_cpu_option("Haswell-noTSX,+pcid,-invpcid,enforce,sse4_2=off,migratable=on") == (
        "Haswell-noTSX", frozenset({"pcid"}), frozenset({"invpcid", "sse4.2"}))
    h = host("amd-ryzen7-3700x")
    assert missing_flags("Haswell-noTSX,-pcid,-invpcid,-erms", h) == frozenset()
    assert missing_flags("SandyBridge,+avx512f", h) == {"avx512f"}
    # a feature QEMU knows but the mapping does not: cannot tell
    with pytest.raises(CpuModelUnsupported, match="no known host flag for amx-tile"):
        check_model("SandyBridge,+amx-tile", h)


def test_aliases_and_versions_mean_the_same_model() -> None:
    assert required_flags("Haswell-noTSX") == required_flags("Haswell-v2")
    assert required_flags("Haswell") == required_flags("Haswell-v1")  # what pc machine types of 7.2 choose
    assert {"hle", "rtm"} <= required_flags("Haswell") - required_flags("Haswell-noTSX")
    with pytest.raises(ValueError):
        required_flags("host")


# -- the table and the mapping ----------------------------------------------------
def test_table_has_the_models_a_medium_uses() -> None:
    for m in (*MEDIUM_MODELS, *CONSERVATIVE_MODELS, FALLBACK_MODEL):
        assert m in known_models()
    assert "host" not in known_models() and "max" not in known_models()
    assert table.ALIASES["Haswell-noTSX"] == "Haswell-v2"
    assert table.ALIASES["Skylake-Client-noTSX-IBRS"] == "Skylake-Client-v3"


def test_every_feature_of_every_model_is_classified_once() -> None:
    used = {f for _, _, feats in table.MODELS.values() for f in feats}
    for feat in used:
        homes = [feat in CPUINFO_NAMES, feat in NOT_FROM_HOST, feat in UNCHECKED]
        assert homes.count(True) == 1, feat
    for name in (*CPUINFO_NAMES, *NOT_FROM_HOST, *UNCHECKED):
        assert name in table.FEATURES, name  # only QEMU's own names


def test_mapping_names_are_cpuinfo_names() -> None:
    for qemu, flags in CPUINFO_NAMES.items():
        assert flags, qemu
        for f in flags:
            assert re.fullmatch(r"[a-z0-9_]+", f), (qemu, f)
    # the renames a reader would otherwise get wrong
    assert CPUINFO_NAMES["sse4.2"] == ("sse4_2",)
    assert CPUINFO_NAMES["sse4.1"] == ("sse4_1",)
    assert CPUINFO_NAMES["lahf-lm"] == ("lahf_lm",)
    assert CPUINFO_NAMES["pni"] == ("pni",)  # SSE3: Linux prints "pni" too
    assert CPUINFO_NAMES["pclmulqdq"] == ("pclmulqdq",)
    assert CPUINFO_NAMES["cr8legacy"] == ("cr8_legacy",)
    assert CPUINFO_NAMES["fxsr-opt"] == ("fxsr_opt",)
    assert CPUINFO_NAMES["sha-ni"] == ("sha_ni",)
    assert CPUINFO_NAMES["avx512vnni"] == ("avx512_vnni",)
    assert CPUINFO_NAMES["spec-ctrl"] == ("ibrs", "ibpb")
    assert CPUINFO_NAMES["amd-stibp"] == ("stibp",)


def test_every_mapped_flag_appears_in_some_recorded_host_or_is_known_rare() -> None:
    # a typo in the mapping would make a model unrunnable everywhere; recorded hosts show most names
    seen = set().union(*(host(n).flags for n in HOSTS))
    rare = {"3dnow", "3dnowext", "fma4", "xop", "tbm", "mpx", "hle", "rtm", "la57", "cldemote", "avx512er",
            "avx512pf", "avx512_4fmaps", "avx512_4vnniw", "avx512ifma", "avx512vbmi", "avx512bw", "avx512cd",
            "avx512dq", "avx512f", "avx512vl", "avx512_bf16", "avx512_vpopcntdq", "avx512_bitalg", "avx512_vbmi2",
            "avx512_vnni"}
    for flags in CPUINFO_NAMES.values():
        for f in flags:
            assert f in seen or f in rare, f


def test_conservative_models_are_fixed_versions() -> None:
    for m in CONSERVATIVE_MODELS:
        target = table.ALIASES.get(m, m)
        assert target in table.MODELS, m
        # a bare name ("Haswell") whose version the machine type picks is not fixed
        assert re.sub(r"-v\d+$", "", target) != m, m
    assert FALLBACK_MODEL in known_models()


def _generator() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("cpu_models_tool", str(ROOT / "tools" / "cpu-models"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_table_is_what_the_installed_qemu_says() -> None:
    """Versioned models never change once released: every recorded one is what QEMU still expands it to."""
    rec = _generator().record()
    for name, (vendor, desc, feats) in table.MODELS.items():
        assert rec["models"][name] == (vendor, desc, feats), name
    for name, target in table.ALIASES.items():
        assert rec["aliases"][name] == target, name
    if rec["version"] == table.QEMU_VERSION:
        # same QEMU: the committed module is exactly what the script writes
        assert _generator().render(rec) == (ROOT / "xsession" / "cpumodel_table.py").read_text()


# -- properties -------------------------------------------------------------------
ALL_FLAGS = sorted({f for flags in CPUINFO_NAMES.values() for f in flags} | {"vmx", "svm", "constant_tsc"})
TABLE_MODELS = sorted(known_models())


@st.composite
def hosts(draw: st.DrawFn) -> HostCpu:
    flags = frozenset(draw(st.sets(st.sampled_from(ALL_FLAGS))))
    return HostCpu(vendor=draw(st.sampled_from(["GenuineIntel", "AuthenticAMD", "HygonGenuine", ""])),
                   model_name=draw(st.text(max_size=40)), flags=flags,
                   virtualisation="vmx" if "vmx" in flags else "svm" if "svm" in flags else None)


@settings(max_examples=300, deadline=None)
@given(hosts(), st.sampled_from(TABLE_MODELS))
def test_check_refuses_exactly_when_flags_are_missing(h: HostCpu, model: str) -> None:
    missing = missing_flags(model, h)
    if missing:
        with pytest.raises(CpuModelUnsupported) as e:
            check_model(model, h)
        assert set(e.value.missing) == missing and model in str(e.value)
    else:
        check_model(model, h)


@settings(max_examples=300, deadline=None)
@given(hosts())
def test_choose_model_is_always_runnable(h: HostCpu) -> None:
    chosen = choose_model(h)
    assert chosen in CONSERVATIVE_MODELS or chosen == FALLBACK_MODEL
    if chosen != FALLBACK_MODEL:
        assert not missing_flags(chosen, h)
        check_model(chosen, h)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(),
    st.lists(st.sampled_from(["flags\t: fpu sse", "vendor_id : X", "model name:", ":", "", "processor : 0",
                              "flags", "flags:", "\x00", "\u2028"]), max_size=8).map("\n".join),
))
def test_parse_cpuinfo_raises_only_value_error(text: str) -> None:
    try:
        h = parse_cpuinfo(text)
    except ValueError:
        return
    assert isinstance(h.flags, frozenset)
    assert h.name  # never empty, for messages
