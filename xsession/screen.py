"""A guest's screen: when it has settled, and pictures of it (PNG, thumbnails).

QEMU's ``screendump`` writes the display as a binary PPM (P6). A flavour we did
not build cannot tell us it is ready, but its screen can: it changes while the
system boots and stops changing at the desktop. :func:`settled` decides that from
a series of (time, digest) samples; it is pure, so it is tested as a function.

PNG is written here with :mod:`zlib` (a still per flavour at mastering, a
thumbnail now and then): no image library is needed in dom0 for that.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Picture", "read_ppm", "to_png", "read_png", "thumbnail", "digest", "colours", "blank",
           "settled", "same_picture"]


@dataclass(frozen=True)
class Picture:
    width: int
    height: int
    rgb: bytes  # width * height * 3 bytes, rows top to bottom


def read_ppm(data: bytes) -> Picture:
    """A binary PPM (P6, maxval 255), as QEMU's ``screendump`` writes it.

    :raises ValueError: not such a file.
    """
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while end < len(data) and not data[end:end + 1].isspace():
            end += 1
        if end == pos:
            raise ValueError("a PPM header cut short")
        fields.append(data[pos:end])
        pos = end
    magic, w, h, maxval = fields
    if magic != b"P6" or maxval != b"255":
        raise ValueError("not a binary 8-bit PPM")
    width, height = int(w), int(h)
    pos += 1  # the one whitespace after maxval
    rgb = data[pos:pos + width * height * 3]
    if width <= 0 or height <= 0 or len(rgb) != width * height * 3:
        raise ValueError("a PPM whose pixels do not match its size")
    return Picture(width, height, rgb)


def digest(picture: Picture) -> str:
    return hashlib.sha256(picture.rgb).hexdigest()


def same_picture(a: Picture, b: Picture, tolerance: float = 0.0) -> bool:
    """Equal sizes and at most ``tolerance`` (a fraction) of the bytes differing."""
    if (a.width, a.height) != (b.width, b.height):
        return False
    if a.rgb == b.rgb:
        return True
    differing = sum(1 for x, y in zip(a.rgb, b.rgb, strict=True) if x != y)
    return differing <= tolerance * len(a.rgb)


def to_png(picture: Picture) -> bytes:
    """The picture as a PNG (RGB, 8 bits, no filter: simple and small enough for screens)."""
    stride = picture.width * 3
    raw = b"".join(b"\x00" + picture.rgb[y * stride:(y + 1) * stride] for y in range(picture.height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", picture.width, picture.height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def read_png(data: bytes) -> Picture:
    """A PNG as :func:`to_png` writes it (RGB, 8 bits, not interlaced, no filters):
    enough to compare a saved still with a screen.

    :raises ValueError: another kind of PNG, or not one.
    """
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not a PNG")
    pos, idat, header = 8, b"", b""
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    if len(header) != 13:
        raise ValueError("a PNG without its header")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if (depth, colour, interlace) != (8, 2, 0):
        raise ValueError("not an 8-bit RGB PNG")
    raw = zlib.decompress(idat)
    stride = width * 3 + 1
    if len(raw) != stride * height or any(raw[y * stride] for y in range(height)):
        raise ValueError("a PNG with filters or of another size")
    return Picture(width, height, b"".join(raw[y * stride + 1:(y + 1) * stride] for y in range(height)))


def thumbnail(picture: Picture, max_width: int = 320) -> Picture:
    """Every n-th pixel of every n-th row: a quick, good enough card picture."""
    step = max(1, -(-picture.width // max_width))
    if step == 1:
        return picture
    width, height = picture.width // step, picture.height // step
    stride = picture.width * 3
    out = bytearray(width * height * 3)
    for y in range(height):
        row = picture.rgb[y * step * stride:(y * step + 1) * stride]
        for c in range(3):
            out[y * width * 3 + c:(y + 1) * width * 3:3] = row[c::3 * step][:width]
    return Picture(width, height, bytes(out))


def colours(picture: Picture, step: int = 97) -> int:
    """How many colours a sample of the picture's pixels has: a painted desktop has
    dozens, a blank or a text console two or three."""
    rgb = picture.rgb
    return len({rgb[i:i + 3] for i in range(0, len(rgb) - 2, 3 * step)})


def settled(samples: Sequence[tuple[float, str]], quiet_s: float, min_changes: int = 1,
            blink_states: int = 2) -> bool:
    """Whether a screen has settled: it changed at least ``min_changes`` times (it is
    not a blank that never started), and for the last ``quiet_s`` seconds it showed at
    most ``blink_states`` different pictures (a blinking cursor is two) that it had
    already shown before that window (so a screen still drawing new things is not).

    ``samples`` are (time, digest) pairs in time order.
    """
    if not samples or samples[-1][0] - samples[0][0] < quiet_s:
        return False
    changes = sum(1 for (_, a), (_, b) in zip(samples, samples[1:], strict=False) if a != b)
    if changes < min_changes:
        return False
    start = samples[-1][0] - quiet_s
    window = {d for t, d in samples if t >= start}
    before = [d for t, d in samples if t < start]
    if len(window) > blink_states or not before:
        return False
    # each picture of the window was on the screen already when the window began
    return len(window) == 1 and before[-1] in window or window <= set(before[-2 * blink_states:])


#: the largest mouse pointer or text cursor: a screen with nothing more than this on it is blank
CURSOR_BOX = 32


def blank(picture: Picture, box: int = CURSOR_BOX) -> bool:
    """Whether the picture shows nothing but a cursor: every pixel that is not its
    commonest colour (in a sample) fits in a ``box`` by ``box`` square. A booting
    kernel's silent text mode and an X server before its desktop paints are blank;
    a login prompt or a desktop is not."""
    rgb, width = picture.rgb, picture.width
    stride = width * 3
    sample = Counter(rgb[i:i + 3] for i in range(0, len(rgb) - 2, 3 * 97))
    background = sample.most_common(1)[0][0]
    plain_row = background * width
    rows = [y for y in range(picture.height) if rgb[y * stride:(y + 1) * stride] != plain_row]
    if not rows:
        return True
    if rows[-1] - rows[0] >= box:
        return False
    left, right = width, -1
    for y in rows:
        row = rgb[y * stride:(y + 1) * stride]
        xs = [x for x in range(width) if row[3 * x:3 * x + 3] != background]
        left, right = min(left, xs[0]), max(right, xs[-1])
    return right - left < box
