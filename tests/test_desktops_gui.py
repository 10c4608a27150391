"""The chooser and the side-by-side view with real desktops: a daemon restores the real
flavours, the front-end shows them under Xvfb. The screenshots it takes are the ones
the README shows (tests/artifacts/desktops/)."""

from __future__ import annotations

import pytest

from .buslib import Client
from .conftest import ARTIFACTS
from .guilib import distinct_colours, pump, screenshot, settle
from .test_desktops import FLAVOURS

SHOTS = ARTIFACTS / "desktops"


@pytest.fixture
def desktop_daemon(private_bus, xsessiond, desktop_medium):
    xsessiond("xenubuntu.restore=eager xenubuntu.flavour=xubuntu", medium_path=desktop_medium)
    client = Client(private_bus)
    for name in FLAVOURS:
        assert client.wait_state(name, {"running", "failed"}, timeout=600) == "running", client.session(name)
    yield client
    client.close()


def test_the_chooser_shows_real_desktops_and_two_side_by_side(xdisplay, private_bus, desktop_daemon):
    from xsession.gui.client import SessionsClient
    from xsession.gui.window import MainWindow

    client = SessionsClient(private_bus)
    client.start()
    window = MainWindow(client, auto_show_default=False)
    window.move(0, 0)
    window.show()
    try:
        pump(lambda: window.get_mapped() and len(window.chooser.cards) == len(FLAVOURS), 60, "the cards")
        cards = window.chooser.cards

        def live(name):
            card = cards[name]
            pixbuf = card.picture.get_pixbuf() if card.picture_stack.get_visible_child_name() == "picture" else None
            enough = 0 if name == "server" else 8  # the server shows a text console, mostly black
            return pixbuf if card.picture_kind == "live" and pixbuf and distinct_colours(pixbuf) > enough else None

        for name in FLAVOURS:
            pixbuf = pump(lambda n=name: live(n), 60, f"a live picture of {name}")
            assert pixbuf.get_width() > pixbuf.get_height()  # a 4:3 desktop, not a placeholder
        descriptions = {name: desktop_daemon.session(name)["Description"] for name in FLAVOURS}
        assert all(descriptions.values()), descriptions
        settle(0.5)
        screenshot(SHOTS / "chooser.png", window)

        views = window.show_split(["xubuntu", "lubuntu"])
        pump(lambda: all(v.display.get_pixbuf() is not None and distinct_colours(v.display.get_pixbuf()) > 8
                         for v in views), 60, "both desktops side by side")
        for v in views:
            assert v.display.get_scaling()
            assert v.display.get_allocated_width() < v.display.get_width()  # scaled to its pane
        settle(0.5)
        screenshot(SHOTS / "split.png", window)
    finally:
        window.destroy()
        client.close()
        settle(0.1)
