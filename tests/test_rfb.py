"""The RFB client that reads a Xen session's screen from its device model's VNC socket.

Against a real VNC server (a restored demo guest's QEMU: the same protocol Xen's
device model speaks) its picture must be the monitor's own screendump, pixel for
pixel; against hostile or broken servers (a unix socket the test serves) it
must end with an RfbError or OSError, never with a wrong picture or a hang.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xsession.hypervisor import rfb
from xsession.hypervisor.qemu import QemuBackend
from xsession.screen import same_picture


def test_the_picture_is_the_monitors_own_screendump(manifest, runtime_dir):
    guest = QemuBackend().restore(manifest.flavour("server"), manifest, runtime_dir / "server", lambda d, t: None)
    try:
        sock = Path(guest.console["vnc"].removeprefix("unix:"))
        # the heartbeat line changes every second: take both until two agree
        for _ in range(10):
            before = guest.screendump()
            picture = rfb.grab(sock)
            after = guest.screendump()
            if same_picture(before, after) and same_picture(before, picture):
                break
            time.sleep(0.3)
        assert (picture.width, picture.height) == (before.width, before.height)
        assert same_picture(picture, before), "the VNC picture is not the screen"
        assert len(set(picture.rgb[i:i + 3] for i in range(0, len(picture.rgb), 3))) >= 2  # text on it
    finally:
        guest.stop()


class Server:
    """A unix socket that answers one connection with ``script(conn)``."""

    def __init__(self, path: Path, script):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, args=(script,), daemon=True)
        self.thread.start()

    def _serve(self, script) -> None:
        conn, _ = self.listener.accept()
        with conn:
            try:
                script(conn)
            except OSError:
                pass
        self.listener.close()


def _server_init(conn: socket.socket, width: int = 4, height: int = 2) -> None:
    conn.sendall(b"RFB 003.008\n")
    conn.recv(12)
    conn.sendall(b"\x01\x01")
    conn.recv(1)
    conn.sendall(struct.pack(">I", 0))
    conn.recv(1)
    conn.sendall(struct.pack(">HH", width, height) + bytes(16) + struct.pack(">I", 4) + b"test")
    # all of the client's three requests (pixel format, encodings, update) before answering, so
    # that a server which then hangs up does so while the client reads, not while it writes
    want = 20 + 8 + 10
    while want > 0 and (got := conn.recv(want)):
        want -= len(got)


def test_a_well_behaved_server_in_two_rectangles(tmp_path):
    def script(conn):
        _server_init(conn)
        red, blue = b"\x00\x00\xff\x00", b"\xff\x00\x00\x00"  # blue, green, red, unused
        conn.sendall(b"\x02")  # a bell first
        conn.sendall(struct.pack(">BxH", 0, 2))
        conn.sendall(struct.pack(">HHHHi", 0, 0, 4, 1, 0) + red * 4)
        conn.sendall(struct.pack(">HHHHi", 0, 1, 4, 1, 0) + blue * 4)
        time.sleep(0.5)

    Server(tmp_path / "ok.sock", script)
    picture = rfb.grab(tmp_path / "ok.sock")
    assert (picture.width, picture.height) == (4, 2)
    assert picture.rgb == b"\xff\x00\x00" * 4 + b"\x00\x00\xff" * 4


@pytest.mark.parametrize("what,script", [
    ("another protocol", lambda c: c.sendall(b"SSH-2.0-OpenSSH\r\n")),
    ("a password", lambda c: (c.sendall(b"RFB 003.008\n"), c.recv(12), c.sendall(b"\x01\x02"))),
    ("a refusal", lambda c: (c.sendall(b"RFB 003.008\n"), c.recv(12), c.sendall(b"\x00"))),
    ("a zero-sized screen", lambda c: _server_init(c, 0, 0)),
    ("a rectangle outside the screen", lambda c: (_server_init(c), c.sendall(
        struct.pack(">BxH", 0, 1) + struct.pack(">HHHHi", 3, 1, 4, 4, 0)))),
    ("an encoding not asked for", lambda c: (_server_init(c), c.sendall(
        struct.pack(">BxH", 0, 1) + struct.pack(">HHHHi", 0, 0, 4, 2, 5)))),
    ("updates that never cover the screen", lambda c: (_server_init(c), c.sendall(
        struct.pack(">BxH", 0, 0) * 100))),
    ("a server that hangs up halfway", lambda c: (_server_init(c), c.sendall(
        struct.pack(">BxH", 0, 1) + struct.pack(">HHHHi", 0, 0, 4, 2, 0) + b"\x00" * 7))),
])
def test_a_broken_or_hostile_server_is_an_error_not_a_picture(tmp_path, what, script):
    Server(tmp_path / "bad.sock", script)
    with pytest.raises(rfb.RfbError):
        rfb.grab(tmp_path / "bad.sock", timeout=5)


def test_no_server_is_an_os_error(tmp_path):
    with pytest.raises(OSError):
        rfb.grab(tmp_path / "nothing.sock")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reply=st.binary(max_size=200), after_init=st.booleans())
def test_any_bytes_from_a_server_give_an_error_or_a_whole_picture(tmp_path_factory, reply, after_init):
    path = tmp_path_factory.mktemp("fuzz") / "s.sock"

    def script(conn):
        if after_init:
            _server_init(conn)
        conn.sendall(reply)

    Server(path, script)
    try:
        picture = rfb.grab(path, timeout=2)
    except (rfb.RfbError, OSError):
        return
    assert len(picture.rgb) == picture.width * picture.height * 3
