"""The boot-option parser: a bad boot option never stops the boot.

Plain examples pin the boot-option table of README.md; hypothesis checks the
promises that must hold for every command line: no input makes the parser
raise, the last occurrence of an option decides, and a malformed value gives a
warning and the default.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xsession.bootopts import (
    BootOptions,
    RestorePolicy,
    check_flavours,
    parse_cmdline,
    parse_size_mib,
    split_cmdline,
)

NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
names = st.from_regex(NAME, fullmatch=True)
keys = st.sampled_from(["flavour", "restore", "reserve", "sessions", "medium", "share", "lazy", "bogus", "Restore"])
values = st.one_of(
    st.sampled_from(["eager", "lazy", "off", "OFF", "Lazy", "", "512M", "1G", "2048", "0", "-1", "/cdrom", "x,y",
                     "on", "auto", "On"]),
    names,
    st.text(max_size=12),
)
other_words = st.sampled_from(["quiet", "splash", "boot=casper", "root=/dev/sr0", "--", "xenubuntu", '"a b"'])
plain_words = st.one_of(other_words, st.just("xenubuntu."))


@st.composite
def option_words(draw: st.DrawFn) -> str:
    key = draw(keys)
    if draw(st.booleans()):
        return f"xenubuntu.{key}"
    return f"xenubuntu.{key}={draw(values)}"


cmdlines = st.lists(st.one_of(option_words(), plain_words), max_size=12).map(" ".join)


# --- the boot-option table of README.md -------------------------------------------------

def test_defaults_when_nothing_is_given() -> None:
    assert parse_cmdline("BOOT_IMAGE=/casper/vmlinuz boot=casper quiet splash") == BootOptions()


def test_every_option_read() -> None:
    opts = parse_cmdline(
        "quiet xenubuntu.flavour=kubuntu xenubuntu.restore=eager xenubuntu.reserve=1G "
        "xenubuntu.sessions=kubuntu,xubuntu xenubuntu.medium=/run/live/medium xenubuntu.share=off xenubuntu.lazy=On"
    )
    assert opts == BootOptions(flavour="kubuntu", restore=RestorePolicy.EAGER, reserve_mib=1024,
                               sessions=("kubuntu", "xubuntu"), medium="/run/live/medium", share="off", lazy="on")


@pytest.mark.parametrize(("text", "mib"), [
    ("512M", 512), ("1G", 1024), ("1GiB", 1024), ("2048", 2048), ("1T", 1 << 20), ("4096K", 4), ("512m", 512),
    ("1K", None), ("0", None), ("0M", None), ("12X", None), ("", None), ("-1G", None), ("1.5G", None), ("٣G", None),
])
def test_sizes(text: str, mib: int | None) -> None:
    assert parse_size_mib(text) == mib


def test_double_quotes_group_words_as_the_kernel_does() -> None:
    assert split_cmdline('a "b c" xenubuntu.medium="/media/my disk"  d\n') == \
        ["a", "b c", "xenubuntu.medium=/media/my disk", "d"]
    assert parse_cmdline('xenubuntu.medium="/media/my disk"').medium == "/media/my disk"
    # quoted text is one word, so an option inside it is no option
    assert parse_cmdline('foo="a xenubuntu.restore=off b"').restore is RestorePolicy.LAZY


def test_single_quotes_and_backslashes_are_plain_characters() -> None:
    assert split_cmdline("it's a\\ b") == ["it's", "a\\", "b"]
    assert parse_cmdline("xenubuntu.medium=/media/it's").medium == "/media/it's"


@pytest.mark.parametrize(("cmdline", "field"), [
    ("xenubuntu.flavour=Kubuntu", "flavour"),
    ('xenubuntu.flavour="kubuntu\n"', "flavour"),
    ("xenubuntu.restore=sometimes", "restore"),
    ("xenubuntu.reserve=lots", "reserve_mib"),
    ("xenubuntu.sessions=,,", "sessions"),
    ("xenubuntu.sessions=Bad!", "sessions"),
    ("xenubuntu.medium=cdrom", "medium"),
    ("xenubuntu.share=yes", "share"),
    ("xenubuntu.lazy=yes", "lazy"),
    ("xenubuntu.lazy=", "lazy"),
    ("xenubuntu.restore", "restore"),
    ("xenubuntu.restore=", "restore"),
])
def test_bad_values_warn_and_keep_the_default(cmdline: str, field: str) -> None:
    opts = parse_cmdline(cmdline)
    assert getattr(opts, field) == getattr(BootOptions(), field)
    option = "xenubuntu." + field.removesuffix("_mib")
    assert len(opts.warnings) == 1 and option in opts.warnings[0]


def test_unknown_option_warns() -> None:
    opts = parse_cmdline("xenubuntu.colour=blue")
    assert opts.warnings == ("unknown boot option xenubuntu.colour=blue; ignored",)


def test_partly_bad_session_list_keeps_the_good_names() -> None:
    opts = parse_cmdline("xenubuntu.sessions=kubuntu,Bad,xubuntu,kubuntu")
    assert opts.sessions == ("kubuntu", "xubuntu")
    assert len(opts.warnings) == 1 and "Bad" in opts.warnings[0]


def test_check_flavours_replaces_unknown_names() -> None:
    opts = check_flavours(parse_cmdline("xenubuntu.flavour=edubuntu xenubuntu.sessions=xubuntu,nope"),
                          ["ubuntu", "kubuntu", "xubuntu"], "ubuntu")
    assert opts.flavour == "xubuntu" and opts.sessions == ("xubuntu",)
    assert len(opts.warnings) == 2


def test_check_flavours_adds_the_default_to_a_session_list_without_it() -> None:
    opts = check_flavours(parse_cmdline("xenubuntu.flavour=kubuntu xenubuntu.sessions=xubuntu"),
                          ["ubuntu", "kubuntu", "xubuntu"], "ubuntu")
    assert opts.flavour == "kubuntu" and opts.sessions == ("kubuntu", "xubuntu")


# --- properties ---------------------------------------------------------------

@settings(max_examples=400)
@given(st.text())
def test_no_text_makes_it_raise(text: str) -> None:
    opts = parse_cmdline(text)
    assert isinstance(opts.restore, RestorePolicy)
    assert all(isinstance(w, str) for w in opts.warnings)


@settings(max_examples=400)
@given(cmdlines)
def test_no_command_line_makes_it_raise_and_results_are_valid(cmdline: str) -> None:
    opts = parse_cmdline(cmdline)
    assert opts.flavour is None or NAME.fullmatch(opts.flavour)
    assert opts.sessions is None or (opts.sessions and all(NAME.fullmatch(n) for n in opts.sessions))
    assert opts.reserve_mib is None or opts.reserve_mib >= 1
    assert opts.medium is None or opts.medium.startswith("/")
    assert opts.share in ("auto", "off")
    assert opts.lazy in ("auto", "on", "off")


@given(st.lists(st.sampled_from(["eager", "lazy", "off", "EAGER", "Off", "never", ""]), min_size=1, max_size=6),
       st.lists(other_words, max_size=3))
def test_later_occurrences_win(restores: list[str], noise: list[str]) -> None:
    words = [f"xenubuntu.restore={r}" for r in restores]
    opts = parse_cmdline(" ".join(noise + words))
    last = restores[-1].lower()
    if last in ("eager", "lazy", "off"):
        assert opts.restore is RestorePolicy(last)
        assert opts.warnings == ()
    else:
        assert opts.restore is RestorePolicy.LAZY  # a malformed last value gives the default
        assert len(opts.warnings) == 1


@given(names, names)
def test_later_flavour_wins(first: str, second: str) -> None:
    assert parse_cmdline(f"xenubuntu.flavour={first} xenubuntu.flavour={second}").flavour == second


@given(st.text(max_size=20).filter(lambda v: v.lower() not in ("eager", "lazy", "off")))
def test_a_bad_restore_value_warns(value: str) -> None:
    opts = parse_cmdline(f'xenubuntu.restore="{value}"')
    assert opts.restore is RestorePolicy.LAZY
    assert len(opts.warnings) == 1


@given(cmdlines, st.lists(names, min_size=1, max_size=5, unique=True), st.data())
def test_check_flavours_always_names_a_known_flavour(cmdline: str, known: list[str], data: st.DataObject) -> None:
    default = data.draw(st.sampled_from(known))
    opts = check_flavours(parse_cmdline(cmdline), known, default)
    assert opts.flavour in known
    if opts.sessions is not None:
        assert opts.flavour in opts.sessions and set(opts.sessions) <= set(known)
