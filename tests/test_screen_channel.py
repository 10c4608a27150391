"""Pure parts of reading a guest: the channel's messages and a screen that settles."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings, strategies as st

from xsession.guestchannel import MAX_LINE, ChannelError, Heartbeat, Ready, parse_line
from xsession.screen import Picture, blank, read_png, read_ppm, same_picture, settled, thumbnail, to_png


def test_the_two_messages_and_nothing_else():
    assert parse_line(b"xenubuntu1 ready xubuntu") == Ready("xubuntu")
    assert parse_line(b"xenubuntu1 heartbeat 42") == Heartbeat(42)
    for bad in (b"", b"xenubuntu1 ready", b"xenubuntu1 ready Xubuntu", b"xenubuntu1 ready xubuntu ",
                b"xenubuntu1 heartbeat 0", b"xenubuntu1 heartbeat -1", b"xenubuntu1 heartbeat 01",
                b"xenubuntu1 heartbeat 1" + b"0" * 19, b"xenubuntu2 ready x", b"xenubuntu1 install /dev/sda",
                b"xenubuntu1 ready xubuntu\r", b"XENUBUNTU1 READY X", b"xenubuntu1  ready x",
                b"xenubuntu1 ready " + b"a" * 40, b"x" * MAX_LINE):
        with pytest.raises(ChannelError):
            parse_line(bad)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.from_regex(rb"xenubuntu1 (ready|heartbeat) [ -~]{0,30}", fullmatch=True)))
def test_any_line_is_a_message_or_a_channel_error(line):
    try:
        message = parse_line(line)
    except ChannelError:
        return
    assert isinstance(message, (Ready, Heartbeat))
    if isinstance(message, Heartbeat):
        assert 1 <= message.seq < 10**19


def _samples(digests: str, step: float = 0.5) -> list[tuple[float, str]]:
    return [(i * step, d) for i, d in enumerate(digests)]


def test_a_screen_settles_after_it_stopped_changing():
    assert not settled(_samples("aaaaaaaaaa"), 3.0)            # never changed: a blank that never started
    assert not settled(_samples("abcdefg"), 3.0)               # still drawing
    assert settled(_samples("abcdefgggggggg"), 3.0)            # changed, then 3 s the same
    assert not settled(_samples("abcdefgggggh"), 3.0)          # a new picture inside the window
    assert settled(_samples("abcdefghghghghghgh"), 3.0)        # a blinking cursor: two pictures, both seen before
    assert not settled(_samples("abcdefghijhijhijhij"), 3.0)   # three pictures take turns: an animation
    assert not settled([], 3.0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from("abcd"), min_size=1, max_size=40), st.floats(0.5, 5.0))
def test_settled_needs_a_change_and_a_quiet_window(digests, quiet):
    samples = _samples("".join(digests))
    if settled(samples, quiet):
        assert len(set(digests)) >= 2
        window = {d for t, d in samples if t >= samples[-1][0] - quiet}
        assert len(window) <= 2


def test_ppm_png_and_thumbnails():
    w, h = 64, 48
    rgb = bytes((x * 4) % 256 for x in range(w * h * 3))
    pic = read_ppm(b"P6\n# QEMU\n%d %d\n255\n" % (w, h) + rgb)
    assert (pic.width, pic.height, pic.rgb) == (w, h, rgb)
    png = to_png(pic)
    assert read_png(png) == pic
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and b"IHDR" in png and png.endswith(b"IEND\xaeB`\x82")
    idat = png[png.index(b"IDAT") + 4:png.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    assert len(raw) == h * (1 + w * 3) and raw[1:1 + w * 3] == rgb[:w * 3]
    small = thumbnail(pic, max_width=16)
    assert (small.width, small.height) == (16, 12) and small.rgb[:3] == rgb[:3]
    assert same_picture(pic, Picture(w, h, rgb)) and not same_picture(pic, small)
    for bad in (b"", b"P5\n1 1\n255\n\x00", b"P6\n2 2\n255\n\x00", b"P6\n1 1\n65535\n\x00\x00\x00"):
        with pytest.raises(ValueError):
            read_ppm(bad)


def _screen(width: int, height: int, marks: list[tuple[int, int, int, int]], background=b"\x00\x00\x00") -> Picture:
    """A screen of one colour with grey rectangles (x, y, w, h) drawn on it."""
    rows = [bytearray(background * width) for _ in range(height)]
    for x, y, w, h in marks:
        for row in rows[y:y + h]:
            row[3 * x:3 * (x + w)] = b"\xaa\xaa\xaa" * w
    return Picture(width, height, b"".join(bytes(r) for r in rows))


def test_a_screen_with_nothing_but_a_cursor_is_blank():
    assert blank(_screen(720, 400, []))                                   # a kernel loading, its cursor off
    assert blank(_screen(720, 400, [(0, 14, 9, 2)]))                      # ... and on
    assert blank(_screen(1024, 768, [(500, 380, 12, 20)], b"\x10\x20\x30"))  # X's pointer on its backdrop
    assert blank(_screen(64, 64, [(0, 0, 32, 32)]))                       # the largest pointer
    assert not blank(_screen(64, 64, [(0, 0, 33, 1)]))
    assert not blank(_screen(64, 64, [(0, 0, 1, 33)]))
    assert not blank(_screen(720, 400, [(0, 0, 54, 16)]))                 # "login:"
    assert not blank(_screen(720, 400, [(0, 0, 2, 2), (700, 380, 2, 2)]))  # two marks far apart
    assert not blank(_screen(720, 400, [(0, 0, 720, 200)]))               # half of it another colour
