"""The office scenario, dom0's side: a server flavour and two or more desktop flavours
whose workers share documents and calendar events once dom0 starts them.

    protocol.py   the office lines of the guest channel, both ways (pure)
    ledger.py     what the office heard and what it still has to say (pure)
    manager.py    the office bound to an engine: sessions, channels, events
    errors.py     its named errors
    dbus.py       its object on D-Bus

Nothing is imported here: :mod:`xsession.guestchannel` imports the protocol, and
the manager imports the channel.
"""
