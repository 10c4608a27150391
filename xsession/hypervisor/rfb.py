"""One picture of a VNC server's screen: the smallest RFB 3.8 client, raw encoding.

Xen's device model serves a domain's PV framebuffer over VNC and offers no
screendump as QEMU's monitor does; the chooser's cards and a screen-ready test
need a still of it. The client asks for 32-bit true colour in a fixed layout,
reads one whole, non-incremental update and returns it as RGB. The server is
dom0's own device model, but its words are checked all the same: a short read,
another protocol, a rectangle outside the screen or an encoding not asked for
is an :class:`RfbError`, never a wrong picture.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from ..screen import Picture

__all__ = ["RfbError", "grab"]

#: 32 bits per pixel, depth 24, little-endian, true colour, 8 bits a channel: blue, green, red, unused
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
#: a screen larger than this is not a framebuffer we serve
MAX_SIDE = 8192
#: a whole screen comes in one update of a few rectangles; a server that never completes it is cut off
MAX_MESSAGES = 64


class RfbError(Exception):
    """The server did not speak RFB as expected."""


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RfbError(f"the server closed the connection ({len(data)} of {n} bytes)")
        data += chunk
    return bytes(data)


def _handshake(sock: socket.socket) -> tuple[int, int]:
    """Version, no security, a shared session; the screen's size."""
    version = _exactly(sock, 12)
    if not version.startswith(b"RFB 003."):
        raise RfbError(f"not an RFB server: {version[:12]!r}")
    sock.sendall(b"RFB 003.008\n")
    count = _exactly(sock, 1)[0]
    if count == 0:
        raise RfbError("the server refused the connection")
    if 1 not in _exactly(sock, count):
        raise RfbError("the server wants a password")
    sock.sendall(b"\x01")
    if struct.unpack(">I", _exactly(sock, 4))[0] != 0:
        raise RfbError("the server refused the security handshake")
    sock.sendall(b"\x01")  # shared: the chooser may be watching too
    width, height = struct.unpack(">HH", _exactly(sock, 4))
    _exactly(sock, 16)  # the server's pixel format: ours is set next
    name_length = struct.unpack(">I", _exactly(sock, 4))[0]
    if name_length > 4096:
        raise RfbError(f"a desktop name of {name_length} bytes")
    _exactly(sock, name_length)
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise RfbError(f"a screen of {width}x{height}")
    return width, height


def grab(path: Path, timeout: float = 10.0) -> Picture:
    """The whole screen of the VNC server on the unix socket ``path``.

    :raises RfbError: the server spoke something else or went away.
    :raises OSError: the socket could not be reached.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        width, height = _handshake(sock)
        sock.sendall(b"\x00\x00\x00\x00" + PIXEL_FORMAT)  # SetPixelFormat
        sock.sendall(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: raw only
        sock.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))  # the whole screen, now
        pixels = bytearray(width * height * 4)
        covered = messages = 0
        while covered < width * height:
            messages += 1
            if messages > MAX_MESSAGES:
                raise RfbError(f"no whole screen in {MAX_MESSAGES} messages")
            kind = _exactly(sock, 1)[0]
            if kind == 2:  # a bell
                continue
            if kind != 0:
                raise RfbError(f"server message {kind} where a screen update was due")
            (rects,) = struct.unpack(">xH", _exactly(sock, 3))
            if rects > MAX_SIDE * 4:
                raise RfbError(f"an update of {rects} rectangles")
            for _ in range(rects):
                x, y, w, h, encoding = struct.unpack(">HHHHi", _exactly(sock, 12))
                if encoding != 0:
                    raise RfbError(f"encoding {encoding}, not the raw one asked for")
                if x + w > width or y + h > height:
                    raise RfbError(f"a rectangle {w}x{h}+{x}+{y} outside the {width}x{height} screen")
                data = _exactly(sock, w * h * 4)
                for row in range(h):
                    start = ((y + row) * width + x) * 4
                    pixels[start:start + w * 4] = data[row * w * 4:(row + 1) * w * 4]
                covered += w * h
    rgb = bytearray(width * height * 3)
    rgb[0::3], rgb[1::3], rgb[2::3] = pixels[2::4], pixels[1::4], pixels[0::4]
    return Picture(width, height, bytes(rgb))
