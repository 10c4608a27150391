"""The guest agent's client against what a guest may send: a slow agent, and nonsense.

The peer here is a socket that answers as the script of each test says, so that the
timing a loaded host produces (a synchronisation answered twice, late) and hostile
replies happen every time. The real agent, in real guests, is tried in test_desktops.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings, strategies as st

from xsession.hypervisor.qemu import clock_offset, freshen_script
from xsession.hypervisor.qga import MAX_REPLY, AgentError, GuestAgent

Peer = Callable[[socket.socket], None]


def _requests(conn: socket.socket):
    """The client's requests, one JSON object a line, as they come."""
    buf = b""
    while True:
        while b"\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
        line, buf = buf.split(b"\n", 1)
        yield json.loads(line)


def _serve(path: Path, peer: Peer) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def run() -> None:
        conn, _ = server.accept()
        with conn, server:
            try:
                peer(conn)
            except OSError:
                pass  # the client hung up first

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _sync_reply(request: dict) -> bytes:
    return b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n"


def test_a_synchronisation_answered_late_and_twice_is_not_taken_for_the_next_answer(tmp_path):
    """On a loaded host the agent answers the first synchronisation after the client asked
    again; the second answer then comes when the client waits for its command's."""
    def slow_agent(conn: socket.socket) -> None:
        requests = _requests(conn)
        first = next(requests)
        time.sleep(1.4)                       # the client asks again after 1 s
        conn.sendall(_sync_reply(first))
        second = next(requests)
        assert second["execute"] == "guest-sync-delimited"
        time.sleep(0.3)                       # the client has its answer and sends its command
        conn.sendall(_sync_reply(second))
        command = next(requests)
        conn.sendall(json.dumps({"return": {"asked": command["execute"]}}).encode() + b"\n")
        next(requests, None)

    sock = tmp_path / "qga.sock"
    _serve(sock, slow_agent)
    with GuestAgent(sock, timeout=5.0) as agent:
        assert agent.execute("guest-info") == {"asked": "guest-info"}


def test_what_came_before_the_synchronisation_is_passed_over(tmp_path):
    """A request half read before a save is answered with an error, before the answer to
    the synchronisation; only what follows the 0xFF byte counts."""
    def agent_with_history(conn: socket.socket) -> None:
        requests = _requests(conn)
        sync = next(requests)
        conn.sendall(b'{"error": {"desc": "a request cut by the save"}}\n{"retu' + _sync_reply(sync))
        command = next(requests)
        conn.sendall(json.dumps({"return": command["arguments"]}).encode() + b"\n")
        next(requests, None)

    sock = tmp_path / "qga.sock"
    _serve(sock, agent_with_history)
    with GuestAgent(sock) as agent:
        assert agent.execute("guest-exec-status", {"pid": 7}) == {"pid": 7}


def test_no_agent_is_a_clear_error(tmp_path):
    with pytest.raises(AgentError, match="cannot reach"):
        GuestAgent(tmp_path / "absent.sock").connect()

    def silent(conn: socket.socket) -> None:
        for _ in _requests(conn):
            pass

    sock = tmp_path / "qga.sock"
    _serve(sock, silent)
    with pytest.raises(AgentError, match="did not answer"):
        GuestAgent(sock, timeout=1.5).connect()


def _answering(reply: bytes, hang_up: bool = False) -> Peer:
    """Answers the synchronisation, then the command with ``reply`` (and hangs up)."""
    def peer(conn: socket.socket) -> None:
        requests = _requests(conn)
        conn.sendall(_sync_reply(next(requests)))
        next(requests)
        conn.sendall(reply)
        if not hang_up:
            next(requests, None)
    return peer


@pytest.mark.parametrize("peer, why", [
    (_answering(b"not json\n"), "not JSON"),
    (_answering(b"[1, 2]\n"), "not an object"),
    (_answering(b'{"error": {"desc": "no such command"}}\n'), "no such command"),
    (_answering(b'{"other": 1}\n'), "without a result"),
    (_answering(b"", hang_up=True), "closed"),
    (_answering(b"{" + b" " * (MAX_REPLY + 10)), "longer than"),
    (_answering(b""), "no answer within"),
])
def test_a_bad_answer_ends_the_conversation_with_its_reason(tmp_path, peer, why):
    sock = tmp_path / "qga.sock"
    _serve(sock, peer)
    with GuestAgent(sock, timeout=1.5) as agent, pytest.raises(AgentError, match=why):
        agent.execute("guest-info")


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=300).filter(lambda b: b"\n" not in b))
def test_any_answer_is_a_result_or_an_agent_error(tmp_path_factory, line):
    sock = tmp_path_factory.mktemp("qga") / "qga.sock"
    _serve(sock, _answering(line + b"\n"))
    with GuestAgent(sock, timeout=1.0) as agent:
        try:
            agent.execute("guest-info")
        except AgentError:
            pass


def _clock(answers: list[object]) -> Peer:
    """Answers each guest-get-time with the next of ``answers`` (a callable is asked for it)."""
    def peer(conn: socket.socket) -> None:
        requests = _requests(conn)
        conn.sendall(_sync_reply(next(requests)))
        for answer, request in zip(answers, requests, strict=False):  # answers first: no request is read past them
            assert request["execute"] == "guest-get-time"
            value = answer() if callable(answer) else answer
            conn.sendall(json.dumps({"return": value}).encode() + b"\n")
        next(requests, None)
    return peer


def test_the_guest_clocks_offset_is_taken_from_its_quickest_answer(tmp_path):
    behind = 1000.0

    def slow() -> int:
        time.sleep(0.4)  # a loaded guest: the host's time at the request and at the answer differ
        return int((time.time() - behind) * 1e9)

    def quick() -> int:
        return int((time.time() - behind) * 1e9)

    sock = tmp_path / "qga.sock"
    _serve(sock, _clock([slow, quick, slow]))
    with GuestAgent(sock) as agent:
        offset = clock_offset(agent)
    assert abs(offset - behind) < 0.1, offset  # a slow answer would be off by 0.2 s


@pytest.mark.parametrize("answer", ["1796216435", 1.5, True, -1, 1 << 63, None, {"ns": 1}])
def test_a_guest_time_that_is_not_one_is_an_agent_error(tmp_path, answer):
    sock = tmp_path / "qga.sock"
    _serve(sock, _clock([answer]))
    with GuestAgent(sock) as agent, pytest.raises(AgentError, match="not a time"):
        clock_offset(agent)


def test_the_clock_is_moved_by_the_offset_in_the_guest_and_in_one_process():
    """GNU date sets a relative time in one process: no process start between reading
    the guest's clock and setting it. The script's date string is tried here, on the
    host's date, without setting anything."""
    flavour = SimpleNamespace(machine=SimpleNamespace(nic="none"))
    script = freshen_script(flavour, -12.25)  # type: ignore[arg-type]
    spec = script.split("'")[1]
    assert spec == "-12.250000 seconds" and script.startswith("date -u -s ")
    shown = subprocess.run(["date", "-u", "-d", spec, "+%s.%N"], capture_output=True, text=True, check=True)
    assert abs(float(shown.stdout) - (time.time() - 12.25)) < 1.0
