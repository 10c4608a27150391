"""The smallest VNC (RFB 3.8) client: one full framebuffer picture, raw encoding.

Runs in the test host's dom0 (Python's standard library only) to look at a
domain's PV framebuffer as the chooser would see it through Xen's device model.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass


class RfbError(Exception):
    """The server did not speak RFB as expected."""


@dataclass(frozen=True)
class Frame:
    width: int
    height: int
    bytes_per_pixel: int
    name: str
    pixels: bytes

    def colours(self) -> int:
        """How many different pixel values the picture holds."""
        bpp = self.bytes_per_pixel
        return len({self.pixels[i:i + bpp] for i in range(0, len(self.pixels), bpp)})

    def lit(self) -> int:
        """How many pixels are not the most common one (the background)."""
        bpp = self.bytes_per_pixel
        counts: dict[bytes, int] = {}
        for i in range(0, len(self.pixels), bpp):
            px = self.pixels[i:i + bpp]
            counts[px] = counts.get(px, 0) + 1
        return len(self.pixels) // bpp - max(counts.values(), default=0)


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RfbError(f"the server closed the connection ({len(data)} of {n} bytes)")
        data += chunk
    return data


def grab(path: str, timeout: float = 30.0) -> Frame:
    """Connect to the VNC server on the unix socket ``path`` and read one whole picture."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        version = _exactly(sock, 12)
        if not version.startswith(b"RFB 003."):
            raise RfbError(f"not an RFB server: {version!r}")
        sock.sendall(b"RFB 003.008\n")
        types = _exactly(sock, _exactly(sock, 1)[0])
        if 1 not in types:
            raise RfbError(f"no 'None' security type among {list(types)}")
        sock.sendall(b"\x01")
        if struct.unpack(">I", _exactly(sock, 4))[0] != 0:
            raise RfbError("security handshake refused")
        sock.sendall(b"\x01")  # shared: the chooser may be watching too
        width, height = struct.unpack(">HH", _exactly(sock, 4))
        fmt = _exactly(sock, 16)
        name = _exactly(sock, struct.unpack(">I", _exactly(sock, 4))[0]).decode(errors="replace")
        bpp = fmt[0] // 8
        sock.sendall(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: raw only
        sock.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))  # the whole picture
        pixels = bytearray(width * height * bpp)
        covered = 0
        while covered < width * height:
            kind = _exactly(sock, 1)[0]
            if kind != 0:  # not a FramebufferUpdate (a bell, a colour map): nothing to read for 2
                if kind == 2:
                    continue
                raise RfbError(f"unexpected server message {kind}")
            _, rects = struct.unpack(">xH", _exactly(sock, 3))
            for _ in range(rects):
                x, y, w, h, encoding = struct.unpack(">HHHHi", _exactly(sock, 12))
                if encoding != 0:
                    raise RfbError(f"encoding {encoding}, asked for raw only")
                data = _exactly(sock, w * h * bpp)
                for row in range(h):
                    start = ((y + row) * width + x) * bpp
                    pixels[start:start + w * bpp] = data[row * w * bpp:(row + 1) * w * bpp]
                covered += w * h
        return Frame(width, height, bpp, name, bytes(pixels))
