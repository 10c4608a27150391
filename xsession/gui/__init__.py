"""The GTK front-end: the flavour chooser and the console switcher (GtkVnc).

It talks to the session manager over D-Bus only (:mod:`.client`, which imports
no GTK), never to the engine or a hypervisor.
"""
