"""The manifest parser: what validates, and errors that name file, flavour and field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from xsession.errors import ManifestError, NoSuchFlavour
from xsession.manifest import load_manifest, manifest_to_dict, parse_manifest

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
    (["flavours"], [], None, "flavours", "at least one"),
    (["flavours", 0, "name"], "Kubuntu!", "Kubuntu!", "name", "lower-case"),
    (["flavours", 0, "priority"], "high", "kubuntu", "priority", "integer"),
    (["flavours", 0, "backend"], "vmware", "kubuntu", "backend", "one of qemu, xen"),
    (["flavours", 0, "machine", "memory_mib"], 0, "kubuntu", "machine.memory_mib", "at least 1"),
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
