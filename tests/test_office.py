"""The office, dom0's side: its channel lines (fuzzed), its ledger (pure), and the
office bound to an engine with real demo guests writing into their real channel."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xsession.engine import State
from xsession.guestchannel import MAX_LINE, ChannelError, Heartbeat, InstallRequest, Ready, parse_line
from xsession.manifest import MANIFEST_RELPATH, load_manifest
from xsession.office.errors import NoOffice
from xsession.office.ledger import MAX_ITEMS, Counters, Ledger, OfficeState, Worker
from xsession.office.manager import OfficeManager
from xsession.office.protocol import ID_RE, Activity, Problem, WorkerState, command_line

from .guestlib import Speaker, in_guest, until, with_office

# --- the protocol -------------------------------------------------------------------------


def test_each_office_line_is_one_exact_message():
    assert parse_line(b"xenubuntu1 office state running") == WorkerState("running")
    assert parse_line(b"xenubuntu1 office saved alice-0003-3fa2c1") == Activity("saved", "alice-0003-3fa2c1")
    assert parse_line(b"xenubuntu1 office saw bob-1") == Activity("saw", "bob-1")
    assert parse_line(b"xenubuntu1 office problem calendar") == Problem("calendar")
    assert Activity("read", "alice-0003-3fa2c1").user == "alice"
    longest = "a" + "b" * 15 + "-" + "9" * 40
    assert parse_line(b"xenubuntu1 office added " + longest.encode()) == Activity("added", longest)


BAD = [
    b"xenubuntu1 office state stopped",              # no such worker state
    b"xenubuntu1 office state running ",             # a trailing space
    b"xenubuntu1 office state  running",
    b"xenubuntu1 office state running\r",            # a CR from a terminal
    b"xenubuntu1 office start",                      # dom0's words, not a guest's
    b"xenubuntu1 office pause",
    b"xenubuntu1 office saved alice",                # an ID is USER-REST
    b"xenubuntu1 office saved alice-",
    b"xenubuntu1 office saved -0003",
    b"xenubuntu1 office saved Alice-0003",           # lower case only
    b"xenubuntu1 office saved 1alice-0003",          # a user starts with a letter
    b"xenubuntu1 office saved alice_x-0003",
    b"xenubuntu1 office saved " + b"a" * 17 + b"-1",                # a user of 17
    b"xenubuntu1 office saved alice-" + b"1" * 41,                  # a rest of 41
    b"xenubuntu1 office saved alice-0003/../../etc",               # never a path
    b"xenubuntu1 office saved alice-0003 bob-0004",
    b"xenubuntu1 office deleted alice-0003",         # no such kind
    b"xenubuntu1 office problem printer",
    b"xenubuntu1 office problem",
    b"xenubuntu1 office",
    b"xenubuntu2 office state running",
    b"XENUBUNTU1 office state running",
    b"xenubuntu1 office state r\xc3\xbcnning",
]


@pytest.mark.parametrize("line", BAD, ids=[repr(b)[:50] for b in BAD])
def test_anything_else_is_a_channel_error(line):
    with pytest.raises(ChannelError):
        parse_line(line)


_OFFICE_PREFIXES = [b"xenubuntu1 office ", b"xenubuntu1 office state ", b"xenubuntu1 office saved ",
                    b"xenubuntu1 office read ", b"xenubuntu1 office problem "]


@settings(max_examples=1000, deadline=None)
@given(st.one_of(
    st.binary(max_size=200),
    st.builds(lambda p, tail: p + tail, st.sampled_from(_OFFICE_PREFIXES), st.binary(max_size=140)),
    st.builds(lambda p, tail: p + tail.encode(), st.sampled_from(_OFFICE_PREFIXES),
              st.text("abcz019-_ /.\n", max_size=80))))
def test_any_line_is_exactly_an_office_message_or_a_channel_error(line):
    try:
        message = parse_line(line)
    except ChannelError:
        return
    assert len(line) < MAX_LINE
    if isinstance(message, WorkerState):
        assert line == b"xenubuntu1 office state " + message.state.encode()
    elif isinstance(message, Activity):
        assert line == f"xenubuntu1 office {message.kind} {message.item}".encode()
        user, rest = message.item.split("-", 1)
        assert 1 <= len(user) <= 16 and 1 <= len(rest) <= 40 and ID_RE.fullmatch(message.item)
    elif isinstance(message, Problem):
        assert line == b"xenubuntu1 office problem " + message.what.encode()
    else:
        assert isinstance(message, (Ready, Heartbeat, InstallRequest))


@given(st.from_regex(re.compile(r"[a-z][a-z0-9]{0,15}-[0-9a-z-]{1,40}"), fullmatch=True),
       st.sampled_from(["saved", "added", "read", "saw"]))
def test_every_id_of_the_protocol_is_taken_whole(item, kind):
    assert parse_line(f"xenubuntu1 office {kind} {item}".encode()) == Activity(kind, item)


def test_dom0_says_start_and_pause_only():
    assert command_line("start") == b"xenubuntu1 office start\n"
    assert command_line("pause") == b"xenubuntu1 office pause\n"
    with pytest.raises(ValueError):
        command_line("reset")


# --- the ledger (pure) ----------------------------------------------------------------------

def test_a_command_is_due_until_the_desktop_acknowledges_it_and_again_when_its_guest_changes():
    ledger = Ledger("server", ["kubuntu", "ubuntu"])
    assert ledger.state is OfficeState.IDLE and ledger.due("kubuntu") is None   # idle: nothing to say
    ledger.start(100.0)
    assert ledger.due("kubuntu") == ledger.due("ubuntu") == "start"
    ledger.hear("kubuntu", WorkerState("idle"), 101.0)
    assert ledger.due("kubuntu") == "start"                 # not what was asked: still due
    ledger.hear("kubuntu", WorkerState("running"), 102.0)
    assert ledger.due("kubuntu") is None and ledger.due("ubuntu") == "start"
    assert ledger.workers["kubuntu"] == Worker("running", "")
    assert ledger.forget("kubuntu") and ledger.due("kubuntu") == "start"   # restored: nothing acknowledged
    assert not ledger.forget("kubuntu")
    ledger.hear("kubuntu", WorkerState("running"), 103.0)
    ledger.pause()
    assert ledger.due("kubuntu") == ledger.due("ubuntu") == "pause"
    ledger.hear("ubuntu", WorkerState("paused"), 104.0)
    assert ledger.due("ubuntu") is None
    assert ledger.due("server") is None                     # the server has no worker


def test_activity_is_counted_and_the_first_cross_desktop_read_is_timed_from_the_start():
    ledger = Ledger("server", ["kubuntu", "ubuntu"], max_records=3)
    ledger.hear("kubuntu", Activity("saved", "alice-1"), 50.0)     # before any start: counted, not timed
    ledger.start(100.0)
    ledger.hear("kubuntu", Activity("added", "alice-2"), 101.0)
    record = ledger.hear("ubuntu", Activity("read", "alice-1"), 104.5)
    assert record is not None and (record.session, record.kind, record.item, record.at) == \
        ("ubuntu", "read", "alice-1", 104.5)
    ledger.hear("ubuntu", Activity("saw", "alice-2"), 106.0)
    ledger.hear("kubuntu", Activity("read", "bob-9"), 107.0)       # another desktop's, unknown to dom0: counted
    assert ledger.counters == Counters(saved=1, added=1, read=2, seen=1, first_read=4.5, first_seen=6.0)
    assert [r.item for r in ledger.records] == ["alice-1", "alice-2", "bob-9"]   # bounded, the latest kept
    ledger.start(200.0)                                             # a new start times anew
    assert ledger.counters.first_read == -1.0 and ledger.counters.read == 2
    ledger.reset()
    assert ledger.counters == Counters() and not ledger.records and ledger.state is OfficeState.IDLE
    assert ledger.started == 0.0 and ledger.workers == {"kubuntu": Worker(), "ubuntu": Worker()}


def test_what_contradicts_the_office_is_refused_and_changes_nothing():
    ledger = Ledger("server", ["kubuntu", "ubuntu"])
    ledger.start(1.0)
    ledger.hear("kubuntu", Activity("saved", "alice-1"), 2.0)
    before = ledger.view()
    for session, message, words in (
            ("xubuntu", Activity("saved", "carol-1"), "no office desktop"),
            ("server", WorkerState("running"), "server"),
            ("kubuntu", Activity("read", "alice-1"), "made itself"),      # reading its own document
            ("ubuntu", Activity("saved", "alice-1"), "which kubuntu made")):
        with pytest.raises(ChannelError, match=words):
            ledger.hear(session, message, 3.0)
    assert ledger.view() == before and len(ledger.records) == 1


def test_a_problem_is_kept_until_that_area_works_again():
    ledger = Ledger("server", ["kubuntu", "ubuntu"])
    ledger.hear("kubuntu", Problem("share"), 1.0)
    ledger.hear("kubuntu", Activity("added", "alice-1"), 2.0)      # the calendar works: the share may not
    assert ledger.workers["kubuntu"].problem == "share"
    ledger.hear("kubuntu", Activity("saved", "alice-2"), 3.0)
    assert ledger.workers["kubuntu"].problem == ""


def test_the_makers_remembered_are_bounded():
    ledger = Ledger("server", ["kubuntu", "ubuntu"])
    for i in range(MAX_ITEMS + 10):
        ledger.hear("kubuntu", Activity("saved", f"alice-{i}"), 1.0)
    assert ledger.counters.saved == MAX_ITEMS + 10
    ledger.hear("kubuntu", Activity("read", "alice-0"), 2.0)      # forgotten: taken as another's
    with pytest.raises(ChannelError):
        ledger.hear("kubuntu", Activity("read", f"alice-{MAX_ITEMS}"), 2.0)


# --- the office bound to an engine, with real demo guests --------------------------------------

def speaker(engine, name: str) -> Speaker:
    """``name``'s guest speaking on its channel to this engine, connected."""
    return Speaker(engine.session(name).console["serial"], lambda: engine.channel(name).last_seq, name).connect()


def test_start_reaches_the_workers_until_they_acknowledge_and_their_reports_are_counted(medium: Path, make_engine):
    manifest = load_manifest(with_office(medium, "server", ["kubuntu", "ubuntu"]) / MANIFEST_RELPATH)
    engine = make_engine(manifest, "xenubuntu.restore=off")
    office = OfficeManager(engine)
    events: list = []
    office.subscribe(lambda event, payload: events.append((event, payload)))
    assert office.present and office.view().state is OfficeState.IDLE

    started = office.start()   # the server and both desktops are restored
    assert started.state is OfficeState.RUNNING and started.started > 0
    for name in ("server", "kubuntu", "ubuntu"):
        engine.wait_state(name, {State.RUNNING}, 120)
    guests = {n: speaker(engine, n) for n in ("server", "kubuntu", "ubuntu")}
    kubuntu, ubuntu = guests["kubuntu"], guests["ubuntu"]

    # each heartbeat brings "office start" again until the desktop answers that its worker runs
    starts = lambda: kubuntu.heard().count("xenubuntu1 office start")  # noqa: E731
    first = until(starts, 30, "office start inside kubuntu")
    kubuntu.heartbeat()
    until(lambda: starts() > first, 30, "office start said again")
    kubuntu.say("xenubuntu1 office state running")
    until(lambda: office.view().workers["kubuntu"].acknowledged == "running", 30, "kubuntu's acknowledgement")
    said = starts()
    kubuntu.heartbeat()
    kubuntu.heartbeat()
    time.sleep(0.5)
    assert starts() == said                      # acknowledged: nothing more to say
    assert office.view().workers["ubuntu"].acknowledged == ""
    assert "xenubuntu1 office start" not in guests["server"].heard()   # the server has no worker

    # a document saved on one desktop and read on the other
    kubuntu.say("xenubuntu1 office saved alice-0001-3fa2c1")
    ubuntu.say("xenubuntu1 office read alice-0001-3fa2c1")
    until(lambda: office.view().counters.read == 1, 30, "the read counted")
    view = office.view()
    assert view.counters.saved == 1 and 0 <= view.counters.first_read <= time.time() - view.started
    activity = [p for e, p in events if e == "activity"]
    assert [(r.session, r.kind, r.item) for r in activity] == [
        ("kubuntu", "saved", "alice-0001-3fa2c1"), ("ubuntu", "read", "alice-0001-3fa2c1")]

    # what is no desktop's to say, or contradicts the office, is refused and changes nothing
    before, refused = office.view(), {n: engine.channel(n).refused for n in guests}
    guests["server"].say("xenubuntu1 office saved carol-0001")     # the server is no desktop
    kubuntu.say("xenubuntu1 office read alice-0001-3fa2c1")         # its own document
    ubuntu.say("xenubuntu1 office saved alice-0001/../x")           # not a line of the protocol
    until(lambda: all(engine.channel(n).refused == refused[n] + 1 for n in guests), 30, "three refusals")
    assert office.view() == before and len(office.records()) == 2

    # pause: said to each desktop until it acknowledges
    office.pause()
    ubuntu.heartbeat()
    until(lambda: "xenubuntu1 office pause" in ubuntu.heard(), 30, "office pause inside ubuntu")

    # reset: every session restored afresh from its statefile, the office as mastered
    changes = {n: engine.session(n).last_change for n in guests}
    reset = office.reset()
    assert reset.state is OfficeState.IDLE and reset.counters == Counters() and reset.started == 0
    assert office.records() == []
    for name in guests:
        view = engine.wait_state(name, {State.RUNNING}, 120)
        assert view.last_change > changes[name] and view.origin == "restored"
        assert in_guest(view.console["serial"], "ls /run/to-dom0 2>&1 || true")[0].endswith("No such file or directory")
    assert office.view().workers == {"kubuntu": Worker(), "ubuntu": Worker()}


def test_a_session_outside_the_office_is_refused_and_a_medium_without_one_has_none(medium: Path, make_engine):
    plain = make_engine(load_manifest(medium / MANIFEST_RELPATH), "xenubuntu.restore=off")
    absent = OfficeManager(plain)
    assert not absent.present and absent.view().state is OfficeState.ABSENT
    for action in (absent.start, absent.pause, absent.reset):
        with pytest.raises(NoOffice):
            action()
    plain.shutdown()

    manifest = load_manifest(with_office(medium, "server", ["kubuntu", "ubuntu"]) / MANIFEST_RELPATH)
    engine = make_engine(manifest, "xenubuntu.restore=off")
    office = OfficeManager(engine)
    engine.activate("xubuntu")
    engine.wait_state("xubuntu", {State.RUNNING}, 120)
    xubuntu = speaker(engine, "xubuntu")
    xubuntu.say("xenubuntu1 office saved carol-0001")
    xubuntu.say("xenubuntu1 office state running")
    until(lambda: engine.channel("xubuntu").refused == 2, 30, "two refusals")
    assert xubuntu.heartbeat() == engine.channel("xubuntu").last_seq      # its heartbeats are heard as ever
    assert office.view().counters == Counters() and office.records() == []
    assert "xenubuntu1 office" not in " ".join(xubuntu.heard())

    # the boot options leave the server out: no office, and the warnings say why
    partial = make_engine(manifest, "xenubuntu.restore=off xenubuntu.sessions=kubuntu,ubuntu")
    assert not OfficeManager(partial).present
    assert any("leave out server" in w for w in partial.warnings)
