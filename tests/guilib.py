"""Driving the front-end for real in tests: Xvfb, xdotool, screenshots, and reading a
guest's VGA text console out of a VNC framebuffer.

Reading the framebuffer without OCR: the demo guests show their name on the VGA
text console (80x25 cells of 9x16 pixels in QEMU's VNC framebuffer). The guest
itself tells what the console holds: ``/dev/vcs1`` read over its serial console.
:func:`learn_font` pairs each cell's pixels with the character the guest says is
there; it fails if one glyph stands for two characters or one character has two
glyphs, so a blank, stale, garbled or shifted picture cannot pass. The font
learned from one session's own display (the test's own VNC connection to its
socket) then reads another picture, cell by cell, with :func:`read_text`: a
glyph the font does not know reads as ``?``, so a console that shows the wrong
session (Kubuntu's K where Xubuntu's X belongs) reads wrong.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CELL_W, CELL_H = 9, 16
COLS, ROWS = 80, 25
#: rows whose text changes every second: never compared between two moments
CHANGING = ("heartbeat",)


def start_xvfb(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """An Xvfb on a free display number (``-displayfd`` lets the server pick it)."""
    read, write = os.pipe()
    out = open(log, "wb")  # closed by the caller's process ending; Xvfb writes little
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x800x24", "-nolisten", "tcp",
                             "-noreset"], pass_fds=(write,), stdout=out, stderr=out)
    os.close(write)
    with os.fdopen(read) as r:
        number = r.readline().strip()
    if not number:
        proc.kill()
        raise AssertionError(f"Xvfb gave no display number: {log.read_text(errors='replace')}")
    return proc, f":{number}"


def pump(until: Callable[[], Any], timeout: float, what: str) -> Any:
    """Run the GLib main loop until ``until()`` is true; its value. Fails naming ``what``."""
    from gi.repository import GLib
    ctx = GLib.MainContext.default()
    deadline = time.monotonic() + timeout
    while True:
        while ctx.pending():
            ctx.iteration(False)
        value = until()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        ctx.iteration(False)
        time.sleep(0.01)


def settle(seconds: float) -> None:
    """Let the main loop run for a while (drawing, signals in flight)."""
    deadline = time.monotonic() + seconds
    pump(lambda: time.monotonic() > deadline, seconds + 5, "settling")


def xdotool(display: str, *args: str) -> None:
    subprocess.run(["xdotool", *args], check=True, timeout=20, env=dict(os.environ, DISPLAY=display))


def click(display: str, widget: Any) -> None:
    """A real mouse click (xdotool) in the middle of ``widget`` on the X screen."""
    pump(lambda: widget.get_mapped() and widget.get_allocated_width() > 1, 10, f"{widget} on screen")
    top = widget.get_toplevel()
    x, y = widget.translate_coordinates(top, widget.get_allocated_width() // 2, widget.get_allocated_height() // 2)
    _, ox, oy = top.get_window().get_origin()
    xdotool(display, "mousemove", "--sync", str(ox + x), str(oy + y), "click", "1")
    settle(0.1)


def screenshot(path: Path, window: Any = None) -> Any:
    """The X screen as the server holds it (XGetImage of the root window), saved as PNG;
    only the part that ``window`` covers when one is given."""
    from gi.repository import Gdk
    root = Gdk.get_default_root_window()
    x, y, w, h = 0, 0, root.get_width(), root.get_height()
    if window is not None:
        _, x, y = window.get_window().get_origin()
        w, h = window.get_allocated_width(), window.get_allocated_height()
    pixbuf = Gdk.pixbuf_get_from_window(root, x, y, w, h)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixbuf.savev(str(path), "png", [], [])
    return pixbuf


def distinct_colours(pixbuf: Any, step: int = 7) -> int:
    """How many colours a sample of the picture has: a blank or uniform screen has one or two."""
    data = pixbuf.get_pixels()
    n, stride = pixbuf.get_n_channels(), pixbuf.get_rowstride()
    seen = set()
    for y in range(0, pixbuf.get_height(), step):
        for x in range(0, pixbuf.get_width(), step):
            i = y * stride + x * n
            seen.add(bytes(data[i:i + 3]))
    return len(seen)


# --- the guest's own word: its VGA text, over its serial console ----------------------------

def guest_shell(serial_sock: str | Path, command: str, timeout: float = 15.0) -> list[str]:
    """Run ``command`` in the demo guest (its ``sh:`` protocol); its output lines."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(serial_sock))
        s.sendall(b"sh:" + command.encode() + b"\n")
        buf, out = b"", []
        while time.monotonic() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                line = line.rstrip(b"\r")
                if line.startswith(b"OUT "):
                    out.append(line[4:].decode(errors="replace"))
                elif line.startswith(b"PONG sh"):
                    return out
    raise TimeoutError(f"no answer to {command!r} from {serial_sock} within {timeout} s")


def guest_screen(serial_sock: str | Path) -> list[str]:
    """The 25 rows of 80 characters that the guest's VGA console holds (``/dev/vcs1``)."""
    for _ in range(5):  # a line can be lost to the heartbeat written on the same serial console
        lines = guest_shell(serial_sock, "tr ' ' '~' </dev/vcs1 | fold -w 80 | awk '{print NR \":\" $0}'")
        rows: dict[int, str] = {}
        for line in lines:
            number, _, row = line.partition(":")
            if number.isdigit() and len(row) == COLS:
                rows[int(number)] = row.replace("~", " ")
        if sorted(rows) == list(range(1, ROWS + 1)):
            return [rows[i] for i in range(1, ROWS + 1)]
    raise AssertionError(f"cannot read the VGA text of the guest at {serial_sock}: {lines}")


def guest_keyboard_interrupts(serial_sock: str | Path) -> int:
    """How many keyboard (i8042, IRQ 1) interrupts the guest has taken: keys that reached it."""
    for line in guest_shell(serial_sock, "grep ' 1:' /proc/interrupts"):
        return int(line.split()[1])
    raise AssertionError("no IRQ 1 in the guest's /proc/interrupts")


# --- a VNC framebuffer as text ---------------------------------------------------------------

def cells(pixbuf: Any) -> list[list[bytes]]:
    """The framebuffer cut into text cells, each cell's pixels as lit/unlit bits."""
    assert (pixbuf.get_width(), pixbuf.get_height()) == (COLS * CELL_W, ROWS * CELL_H), \
        f"not an 80x25 VGA text screen: {pixbuf.get_width()}x{pixbuf.get_height()}"
    data = pixbuf.get_pixels()
    n, stride = pixbuf.get_n_channels(), pixbuf.get_rowstride()
    grid = []
    for r in range(ROWS):
        row = []
        for c in range(COLS):
            bits = bytearray()
            for y in range(r * CELL_H, (r + 1) * CELL_H):
                base = y * stride + c * CELL_W * n
                bits.extend(1 if sum(data[base + x * n: base + x * n + 3]) > 3 * 96 else 0 for x in range(CELL_W))
            row.append(bytes(bits))
        grid.append(row)
    return grid


def learn_font(pixbuf: Any, text: list[str]) -> dict[bytes, str]:
    """glyph -> character, from a picture and the text the guest says it shows.

    Rows that change every second and empty rows (where the cursor blinks) are left out.
    :raises AssertionError: the picture does not show that text.
    """
    font: dict[bytes, str] = {}
    by_char: dict[str, bytes] = {}
    grid = cells(pixbuf)
    for r, line in enumerate(text):
        if not line.strip() or any(w in line for w in CHANGING):
            continue
        for c, ch in enumerate(line):
            glyph = grid[r][c]
            if (ch == " ") != (not any(glyph)):
                raise AssertionError(f"row {r} col {c}: the guest has {ch!r} there, the picture "
                                     f"{'nothing' if not any(glyph) else 'a glyph'}")
            if font.setdefault(glyph, ch) != ch:
                raise AssertionError(f"row {r} col {c}: one glyph for {font[glyph]!r} and {ch!r}")
            if by_char.setdefault(ch, glyph) != glyph:
                raise AssertionError(f"row {r} col {c}: two glyphs for {ch!r}")
    assert len(font) > 10, f"too little text to learn from: {text}"
    return font


def read_text(pixbuf: Any, font: dict[bytes, str]) -> list[str]:
    """The picture's text, cell by cell; a glyph the font does not know reads as ``?``."""
    return ["".join(font.get(g, " " if not any(g) else "?") for g in row).rstrip() for row in cells(pixbuf)]


def capture_vnc(address: str, timeout: float = 20.0) -> Any:
    """The framebuffer of a VNC display, from the test's own GtkVnc connection (not the front-end's)."""
    import gi
    gi.require_version("Gtk", "3.0")
    gi.require_version("GtkVnc", "2.0")
    from gi.repository import Gtk, GtkVnc
    window = Gtk.OffscreenWindow()
    display = GtkVnc.Display()
    display.set_shared_flag(True)
    window.add(display)
    window.show_all()
    up: list[bool] = []
    display.connect("vnc-initialized", lambda _d: up.append(True))
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(address.removeprefix("unix:"))
    display.open_fd(sock.detach())
    try:
        pump(lambda: up, timeout, f"the display at {address}")
        settle(0.5)  # the first full update
        return display.get_pixbuf().copy()
    finally:
        display.close()
        window.destroy()


def session_font(serial_sock: str | Path, vnc: str, tries: int = 5) -> tuple[dict[bytes, str], list[str]]:
    """A font learned from a session's own display and its own text (retried: the guest
    redraws its console every second, and a picture may catch it half drawn)."""
    last: AssertionError | None = None
    for _ in range(tries):
        text = guest_screen(serial_sock)
        picture = capture_vnc(vnc)
        try:
            return learn_font(picture, text), text
        except AssertionError as e:
            last = e
            settle(0.3)
    raise AssertionError(f"the display at {vnc} does not show the guest's text: {last}")


# --- D-Bus calls as the bus carries them ------------------------------------------------------

class MethodCalls:
    """Every call of one method on a bus, seen by ``dbus-monitor`` (a monitor, which the
    bus allows root to be): what was called, whichever client called it.

    ``paths`` lists the object paths called, in order. Use it as a context manager;
    :meth:`wait_for` tells when the monitor sees calls at all.
    """

    def __init__(self, address: str, member: str):
        import threading
        self.member = member
        self.paths: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(["dbus-monitor", "--address", address, "--profile",
                                      f"type='method_call',member='{member}'"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, name=f"monitor-{member}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            # type, time, serial, sender, destination, path, interface, member
            fields = line.rstrip("\n").split("\t")
            if len(fields) >= 8 and fields[0] == "mc" and fields[7] == self.member:
                with self._lock:
                    self.paths.append(fields[5])

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.paths)

    def since(self, start: int) -> list[str]:
        """The paths called after the first ``start`` calls."""
        with self._lock:
            return self.paths[start:]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._reader.join(10)

    def __enter__(self) -> MethodCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
