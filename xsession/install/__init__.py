"""Installing a flavour onto a disk of the host, asked for from inside its session.

The guest can only ask (:mod:`.protocol`, over its channel); a request becomes a
pending job (:mod:`.jobs`, published by :mod:`.dbus`); a person in dom0 confirms
it with a target disk that udev offers (:mod:`.targets`); dom0 then does the work
with Debian's tools (:mod:`.installer`, a pure plan of steps apart from running them).
"""
