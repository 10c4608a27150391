"""The manifest parser: what validates, and errors that name file, flavour and field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from xsession.errors import ManifestError, NoSuchFlavour, OutsideMedium
from xsession.manifest import NAME_RE, load_manifest, manifest_to_dict, parse_manifest

MACHINE = {"machine_type": "pc-i440fx-7.2", "memory_mib": 256, "vcpus": 1, "accel": "tcg", "cpu": "qemu64",
           "vga": "std", "disk_bus": "virtio"}
GOOD = {
    "format": 1,
    "default": "kubuntu",
    "flavours": [
        {
            "name": "kubuntu", "title": "Kubuntu", "priority": 1, "backend": "qemu", "machine": dict(MACHINE),
            "disk": {"base": "flavours/kubuntu/disk-base.qcow2", "saved_overlay": "flavours/kubuntu/disk-saved.qcow2"},
            "statefile": {"path": "flavours/kubuntu/state.zst", "size": 1000, "sha256": "a" * 64,
                          "compression": "zstd", "raw_size": 5000, "saved_with": dict(MACHINE)},
            "cold_boot": {"kernel": "pool/vmlinuz", "initrd": "flavours/kubuntu/initrd.cpio",
                          "cmdline": "console=ttyS0", "ready_line": "XS-READY flavour=kubuntu"},
        },
        {
            "name": "server", "priority": 2, "machine": dict(MACHINE, memory_mib=192),
            "cold_boot": {"kernel": "pool/vmlinuz", "initrd": "flavours/server/initrd.cpio",
                          "ready_line": "XS-READY flavour=server"},
        },
    ],
}


def parse(data) -> object:
    return parse_manifest(yaml.safe_dump(data), "MEDIUM/xenubuntu/manifest.yaml")


def test_a_valid_manifest_parses_and_round_trips():
    m = parse(GOOD)
    assert m.default == "kubuntu" and m.names == ("kubuntu", "server")
    k = m.flavour("kubuntu")
    assert k.memory_mib == 256 and k.statefile.size == 1000 and k.disk.saved_overlay.endswith("disk-saved.qcow2")
    s = m.flavour("server")
    assert s.statefile is None and s.title == "server" and s.cold_boot.timeout_s == 120.0
    again = parse(manifest_to_dict(m))
    assert again == m
    with pytest.raises(NoSuchFlavour) as e:
        m.flavour("edubuntu")
    assert "kubuntu, server" in str(e.value)


def _edit(path: list, value):
    data = copy.deepcopy(GOOD)
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


CASES = [
    (["format"], 2, None, "format", "not supported"),
    (["default"], "edubuntu", None, "default", "not a flavour"),
    (["flavours"], [], None, "flavours", "1 to 64 flavours"),
    (["flavours", 0, "name"], "Kubuntu!", "Kubuntu!", "name", "lower-case"),
    (["flavours", 0, "priority"], "high", "kubuntu", "priority", "integer"),
    (["flavours", 0, "backend"], "vmware", "kubuntu", "backend", "one of qemu, xen"),
    (["flavours", 0, "machine", "memory_mib"], 0, "kubuntu", "machine.memory_mib", "from 1 to 1048576"),
    (["flavours", 0, "machine", "memory_mib"], True, "kubuntu", "machine.memory_mib", "boolean"),
    (["flavours", 0, "machine"], KeyError, "kubuntu", "machine", "missing"),
    (["flavours", 0, "statefile", "sha256"], "xyz", "kubuntu", "statefile.sha256", "hexadecimal"),
    (["flavours", 0, "statefile", "compression"], "lzma", "kubuntu", "statefile.compression", "zstd, none"),
    (["flavours", 0, "statefile", "path"], "../../etc/shadow", "kubuntu", "statefile.path", "inside"),
    (["flavours", 0, "statefile", "path"], "/etc/shadow", "kubuntu", "statefile.path", "inside"),
    (["flavours", 0, "cold_boot", "ready_line"], KeyError, "kubuntu", "cold_boot.ready_line", "missing"),
    (["flavours", 0, "colour"], "blue", "kubuntu", "colour", "not a known field"),
    (["flavours", 1, "name"], "kubuntu", "kubuntu", "name", "appears twice"),
]


@pytest.mark.parametrize("path,value,flavour,field,words", CASES, ids=[".".join(map(str, c[0])) for c in CASES])
def test_errors_name_the_file_the_flavour_and_the_field(path, value, flavour, field, words):
    with pytest.raises(ManifestError) as e:
        parse(_edit(path, value))
    err = e.value
    assert err.path == "MEDIUM/xenubuntu/manifest.yaml"
    assert err.flavour == flavour
    assert err.field == field
    assert words in str(err), str(err)
    assert str(err).startswith("MEDIUM/xenubuntu/manifest.yaml")


@pytest.mark.parametrize("field,value", [("memory_mib", 512), ("machine_type", "pc-q35-7.2"), ("cpu", "max"),
                                         ("vcpus", 2), ("vga", "none")])
def test_a_machine_that_differs_from_what_the_statefile_needs_is_rejected(field, value):
    with pytest.raises(ManifestError) as e:
        parse(_edit(["flavours", 0, "machine", field], value))
    assert e.value.flavour == "kubuntu" and e.value.field == "machine"
    assert f"{field} is {value!r} but the statefile was saved with" in str(e.value)


def test_not_yaml_and_unreadable_files(tmp_path: Path):
    with pytest.raises(ManifestError, match="not valid YAML"):
        parse_manifest("flavours: [", "m.yaml")
    with pytest.raises(ManifestError, match="must be a mapping"):
        parse_manifest("- just\n- a list\n", "m.yaml")
    with pytest.raises(ManifestError, match="cannot be read") as e:
        load_manifest(tmp_path / "nothing.yaml")
    assert str(tmp_path / "nothing.yaml") in str(e.value)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"format: 1\ntitle: \xe9\n")
    with pytest.raises(ManifestError, match="UTF-8"):
        load_manifest(bad)


def test_the_demo_medium_manifest_validates(demo_medium: Path):
    m = load_manifest(demo_medium / "xenubuntu" / "manifest.yaml")
    assert m.default == "kubuntu"
    assert set(m.names) == {"kubuntu", "ubuntu", "xubuntu", "server"}
    for f in m.flavours:
        assert f.statefile is not None and f.statefile.saved_with == f.machine
        assert m.resolve(f.statefile.path).stat().st_size == f.statefile.size


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8), st.floats(allow_nan=False))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(path=st.sampled_from([c[0] for c in CASES] + [["flavours", 0, "statefile"], ["flavours", 0, "disk"],
                                                      ["flavours", 0, "cold_boot", "timeout_s"]]),
       value=yaml_values)
def test_any_value_anywhere_gives_a_manifest_or_a_manifest_error(path, value):
    """Never a TypeError, KeyError or AttributeError from bad input."""
    try:
        parse(_edit(path, value))
    except ManifestError as e:
        assert str(e).startswith("MEDIUM/xenubuntu/manifest.yaml")


# --- hostile manifests: each value that once crashed the daemon before READY --------------

HOSTILE = [
    (["flavours", 0, "priority"], 2147483648, "kubuntu", "priority", "from -2147483648 to 2147483647"),
    (["flavours", 0, "name"], "kubuntu\n", "kubuntu\n", "name", "lower-case"),
    (["flavours", 0, "cold_boot", "timeout_s"], int("9" * 4000), "kubuntu", "cold_boot.timeout_s", "from 1 to 3600"),
    (["flavours", 0, "cold_boot", "timeout_s"], float("nan"), "kubuntu", "cold_boot.timeout_s", "number"),
    (["flavours", 0, "cold_boot", "timeout_s"], float("inf"), "kubuntu", "cold_boot.timeout_s", "number"),
    (["flavours", 0, "statefile", "size"], 18446744073709551616, "kubuntu", "statefile.size", "from 1 to"),
    (["flavours", 0, "title"], "K" * 50_000, "kubuntu", "title", "1 to 200 characters"),
    (["flavours", 0, "title"], "Ku\x00buntu", "kubuntu", "title", "control character"),
    (["flavours", 0, "cold_boot", "cmdline"], "console=ttyS0\nrm", "kubuntu", "cold_boot.cmdline", "control"),
    (["flavours", 0, "machine", "cpu"], "qemu64 -device evil", "kubuntu", "machine.cpu", "CPU model"),
    (["flavours", 0, "machine", "machine_type"], "", "kubuntu", "machine.machine_type", "machine type"),
    (["flavours", 0, "statefile", "path"], "a/" * 600, "kubuntu", "statefile.path", "1 to 1024 characters"),
    (["created"], "2026-13-45", None, "created", "ISO 8601"),
]


@pytest.mark.parametrize("path,value,flavour,field,words", HOSTILE,
                         ids=[".".join(map(str, c[0])) + f"={str(c[1])[:12]!r}" for c in HOSTILE])
def test_out_of_range_values_are_refused_naming_the_field(path, value, flavour, field, words):
    with pytest.raises(ManifestError) as e:
        parse(_edit(path, value))
    assert (e.value.flavour, e.value.field) == (flavour, field)
    assert words in str(e.value), str(e.value)
    assert len(str(e.value)) < 400  # the message never carries the whole of a huge value


def test_yaml_level_attacks_are_manifest_errors(tmp_path: Path):
    good = yaml.safe_dump(GOOD)
    # a date that does not exist, unquoted: YAML's own timestamp would raise ValueError
    with pytest.raises(ManifestError, match="ISO 8601"):
        parse_manifest(good + "created: 2026-13-45\n", "m.yaml")
    assert parse_manifest(good + "created: 2026-12-01T10:00:00Z\n", "m.yaml").created == "2026-12-01T10:00:00Z"
    with pytest.raises(ManifestError, match="appears twice"):
        parse_manifest(good + "format: 1\n", "m.yaml")
    with pytest.raises(ManifestError, match="nesting deeper"):
        parse_manifest("format: 1\nflavours: " + "[" * 5000 + "]" * 5000 + "\n", "m.yaml")
    with pytest.raises(ManifestError, match="aliases"):
        parse_manifest("a: &a [1, 2]\nb: [*a, *a, *a]\n", "m.yaml")
    with pytest.raises(ManifestError, match="cannot be read|not valid"):
        parse_manifest("format: " + "9" * 5000 + "\n", "m.yaml")
    big = tmp_path / "big.yaml"
    big.write_text(good + "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ManifestError, match="larger than"):
        load_manifest(big)


def test_paths_and_links_stay_inside_the_medium(tmp_path: Path):
    medium = tmp_path / "medium" / "xenubuntu"
    (medium / "flavours").mkdir(parents=True)
    (medium / "flavours" / "state.zst").write_bytes(b"x")
    (medium / "flavours" / "out.zst").symlink_to("/etc/passwd")
    (medium / "flavours" / "up").symlink_to(tmp_path)
    (medium / "flavours" / "in.zst").symlink_to("state.zst")
    m = parse_manifest(yaml.safe_dump(GOOD), str(medium / "manifest.yaml"))
    assert m.resolve("flavours/in.zst") == (medium / "flavours" / "state.zst").resolve()
    for rel in ("flavours/out.zst", "flavours/up/x", "flavours/up/medium/xenubuntu/../../secret"):
        with pytest.raises(OutsideMedium) as e:
            m.resolve(rel)
        assert "passwd" not in str(e.value) and str(tmp_path) not in str(e.value)


def _publishable(m) -> None:
    """Every value a flavour puts on D-Bus fits the type the API gives it."""
    from gi.repository import GLib

    from xsession.bus import _session_properties, session_path
    from xsession.engine import SessionView, State
    for f in m.flavours:
        total = f.statefile.size if f.statefile else 0
        view = SessionView(f.name, f.title, State.AVAILABLE, "", 0, total, f.priority, f.memory_mib, {}, 0.0, "")
        types = {"Name": "s", "Title": "s", "State": "s", "StateReason": "s", "Progress": "d", "BytesDone": "t",
                 "BytesTotal": "t", "Priority": "i", "MemoryMiB": "t", "LastChange": "d"}
        for prop, value in _session_properties(view).items():
            if prop in types:
                GLib.Variant(types[prop], value)
        GLib.Variant("o", session_path(f.name))


_texts = st.one_of(st.text(max_size=300), st.sampled_from(["kubuntu", "kubuntu\n", "a" * 33, "\x00", "\ud800"]))
_numbers = st.one_of(st.integers(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
                     st.floats(), st.sampled_from([2147483648, -2147483649, 1 << 64, 0, 1, 3600, 3601]))
_values = st.recursive(st.one_of(st.none(), st.booleans(), _texts, _numbers),
                       lambda inner: st.one_of(st.lists(inner, max_size=3),
                                               st.dictionaries(_texts, inner, max_size=3)), max_leaves=8)
_fields = st.sampled_from([
    ["default"], ["created"], ["format"], ["flavours", 0, "name"], ["flavours", 0, "title"],
    ["flavours", 0, "priority"], ["flavours", 0, "machine", "memory_mib"], ["flavours", 0, "machine", "vcpus"],
    ["flavours", 0, "machine", "cpu"], ["flavours", 0, "machine", "machine_type"],
    ["flavours", 0, "statefile", "size"], ["flavours", 0, "statefile", "raw_size"],
    ["flavours", 0, "statefile", "path"], ["flavours", 0, "cold_boot", "timeout_s"],
    ["flavours", 0, "cold_boot", "cmdline"], ["flavours", 0, "cold_boot", "ready_line"],
    ["flavours", 1, "priority"], ["flavours", 1, "title"], ["flavours", 0, "disk"]])


@settings(max_examples=400, deadline=None)
@given(edits=st.lists(st.tuples(_fields, _values), min_size=1, max_size=3))
def test_generated_manifests_are_in_range_and_publishable_or_refused(edits):
    """Either a Manifest whose every value fits its D-Bus type, or a ManifestError; nothing else."""
    data = copy.deepcopy(GOOD)
    for path, value in edits:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    # the statefile's machine follows the flavour's, so that edits there reach the range checks
    data["flavours"][0]["statefile"]["saved_with"] = data["flavours"][0]["machine"]
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except (yaml.YAMLError, UnicodeEncodeError):
        return
    try:
        m = parse_manifest(text, "m.yaml")
    except ManifestError:
        return
    _publishable(m)
    for f in m.flavours:
        assert NAME_RE.fullmatch(f.name) and -(1 << 31) <= f.priority < (1 << 31)
        assert 0 < f.cold_boot.timeout_s <= 3600 and "\x00" not in f.title


def test_the_documented_ranges_are_the_ones_enforced():
    from xsession.manifest import LIMITS
    doc = (Path(__file__).resolve().parent.parent / "docs" / "manifest.md").read_text()
    for name, (low, high) in LIMITS.items():
        words = f"{int(low)} to {int(high)}"
        assert words in doc, f"docs/manifest.md does not give the range of {name}: {words}"


# --- the office section ------------------------------------------------------------------

def _with_office(office) -> dict:
    """GOOD with a third flavour (a second desktop) and the given ``office`` section."""
    data = copy.deepcopy(GOOD)
    ubuntu = copy.deepcopy(data["flavours"][1])
    ubuntu["name"] = "ubuntu"
    ubuntu["cold_boot"]["ready_line"] = "XS-READY flavour=ubuntu"
    data["flavours"].append(ubuntu)
    data["office"] = office
    return data


def test_an_office_section_parses_and_round_trips_and_its_absence_means_no_office():
    m = parse(_with_office({"server": "server", "desktops": ["kubuntu", "ubuntu"]}))
    assert m.office is not None and m.office.server == "server" and m.office.desktops == ("kubuntu", "ubuntu")
    assert m.office.names == ("server", "kubuntu", "ubuntu")
    assert parse(manifest_to_dict(m)) == m
    assert parse(GOOD).office is None and "office" not in manifest_to_dict(parse(GOOD))


OFFICE_CASES = [
    ({"server": "edubuntu", "desktops": ["kubuntu", "ubuntu"]}, "office.server", "not a flavour"),
    ({"server": "server", "desktops": ["kubuntu", "edubuntu"]}, "office.desktops[1]", "not a flavour"),
    ({"server": "server", "desktops": ["kubuntu", "server"]}, "office.desktops[1]", "no desktop"),
    ({"server": "server", "desktops": ["kubuntu", "kubuntu"]}, "office.desktops[1]", "second time"),
    ({"server": "server", "desktops": ["kubuntu"]}, "office.desktops", "2 to 63 flavours"),
    ({"server": "server", "desktops": []}, "office.desktops", "2 to 63 flavours"),
    ({"server": "server", "desktops": ["kubuntu", 7]}, "office.desktops[1]", "not int"),
    ({"server": "server", "desktops": "kubuntu,ubuntu"}, "office.desktops", "list"),
    ({"server": "server"}, "office.desktops", "missing"),
    ({"desktops": ["kubuntu", "ubuntu"]}, "office.server", "missing"),
    ({"server": ["server"], "desktops": ["kubuntu", "ubuntu"]}, "office.server", "string"),
    ({"server": "server", "desktops": ["kubuntu", "ubuntu"], "calendar": "radicale"}, "office.calendar",
     "not a known field"),
    (None, "office", "mapping"),
    (["server", "kubuntu", "ubuntu"], "office", "mapping"),
]


@pytest.mark.parametrize("office,field,words", OFFICE_CASES, ids=[c[1] + ":" + c[2] for c in OFFICE_CASES])
def test_a_bad_office_section_is_refused_naming_its_field(office, field, words):
    with pytest.raises(ManifestError) as e:
        parse(_with_office(office))
    assert e.value.field == field and words in str(e.value), str(e.value)
    assert str(e.value).startswith("MEDIUM/xenubuntu/manifest.yaml")


@settings(max_examples=300, deadline=None)
@given(office=st.one_of(
    yaml_values,
    st.fixed_dictionaries({"server": st.one_of(st.sampled_from(["server", "kubuntu", "ubuntu", "x"]), yaml_values),
                           "desktops": st.one_of(st.lists(st.one_of(st.sampled_from(["server", "kubuntu", "ubuntu",
                                                                                      "x"]), yaml_values),
                                                          max_size=5), yaml_values)})))
def test_any_office_section_gives_a_valid_office_or_a_manifest_error(office):
    try:
        m = parse(_with_office(office))
    except ManifestError as e:
        assert str(e).startswith("MEDIUM/xenubuntu/manifest.yaml") and (e.field or "").startswith("office")
        return
    o = m.office
    assert o is not None and o.server in m.names and o.server not in o.desktops
    assert len(o.desktops) >= 2 and len(set(o.desktops)) == len(o.desktops) and set(o.desktops) <= set(m.names)


def test_a_mastering_spec_carries_its_office_checked_by_the_manifest_rules(tmp_path: Path):
    from xsession.mastering.master import load_spec

    repo = Path(__file__).resolve().parent.parent
    desktops = load_spec(repo / "demo" / "desktops.yaml")
    assert desktops.office is not None
    assert desktops.office.server == "server" and desktops.office.desktops == ("xubuntu", "lubuntu")
    assert load_spec(repo / "demo" / "flavours.yaml").office is None
    spec = yaml.safe_load((repo / "demo" / "flavours.yaml").read_text())
    spec["office"] = {"server": "server", "desktops": ["kubuntu", "server"]}
    bad = tmp_path / "spec.yaml"
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(ManifestError) as e:
        load_spec(bad)
    assert e.value.field == "office.desktops[1]" and e.value.path == str(bad)


# --- a statefile split for lazy restores ---------------------------------------------------

LAZY = {"ram": {"path": "flavours/kubuntu/lazy-ram.zst", "size": 900, "sha256": "b" * 64, "compression": "zstd",
                "raw_size": 256 << 20},
        "devices": {"path": "flavours/kubuntu/lazy-devices.zst", "size": 90, "sha256": "c" * 64,
                    "compression": "zstd", "raw_size": 600},
        "held_mib": 92}


def _with_lazy(**changes) -> dict:
    data = copy.deepcopy(GOOD)
    data["flavours"][0]["statefile"]["lazy"] = dict(copy.deepcopy(LAZY), **changes)
    return data


def test_a_lazy_section_parses_and_round_trips_and_its_absence_means_none():
    m = parse(_with_lazy())
    lazy = m.flavour("kubuntu").statefile.lazy
    assert lazy.ram.raw_size == 256 << 20 and lazy.devices.path.endswith("lazy-devices.zst") and lazy.held_mib == 92
    assert parse(manifest_to_dict(m)) == m
    assert parse(GOOD).flavour("kubuntu").statefile.lazy is None


LAZY_CASES = [
    ({"ram": dict(LAZY["ram"], raw_size=128 << 20)}, "statefile.lazy.ram.raw_size", "the guest's memory"),
    ({"ram": dict(LAZY["ram"], compression="none")}, "statefile.lazy.ram.compression", "one of zstd"),
    ({"devices": dict(LAZY["devices"], path="../x")}, "statefile.lazy.devices.path", "inside"),
    ({"devices": dict(LAZY["devices"], path=LAZY["ram"]["path"])}, "statefile.lazy.devices.path", "RAM image"),
    ({"held_mib": 257}, "statefile.lazy.held_mib", "from 0 to the guest's memory (256)"),
    ({"held_mib": -1}, "statefile.lazy.held_mib", "from 0"),
    ({"held_mib": "92"}, "statefile.lazy.held_mib", "integer"),
    ({"pages": 3}, "statefile.lazy.pages", "not a known field"),
]


@pytest.mark.parametrize("changes,field,words", LAZY_CASES, ids=[c[1] + ":" + c[2] for c in LAZY_CASES])
def test_a_bad_lazy_section_is_refused_naming_its_field(changes, field, words):
    with pytest.raises(ManifestError) as e:
        parse(_with_lazy(**changes))
    assert e.value.flavour == "kubuntu" and e.value.field == field and words in str(e.value), str(e.value)


def test_a_lazy_section_is_for_qemu_flavours_only():
    data = _with_lazy()
    data["flavours"][0]["backend"] = "xen"
    with pytest.raises(ManifestError) as e:
        parse(data)
    assert e.value.field == "statefile.lazy" and "QEMU" in str(e.value)


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(["ram", "devices", "held_mib", "other"]), value=yaml_values)
def test_any_lazy_section_gives_a_manifest_or_a_manifest_error(key, value):
    try:
        parse(_with_lazy(**{key: value}))
    except ManifestError as e:
        assert str(e).startswith("MEDIUM/xenubuntu/manifest.yaml")
