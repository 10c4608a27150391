"""Hypervisor backends behind one interface (:mod:`.base`): QEMU and Xen."""
