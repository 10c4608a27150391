"""The bootable image: a hybrid ISO with GRUB, Xen, a dom0 live system and a mastered medium.

``xsession-image`` (:mod:`.cli`) builds it in cached steps (:mod:`.steps`):
the dom0 system from Debian's packages (:mod:`.dom0`), the product's layer on
top, and the ISO with the medium's own boot menu (:mod:`.iso`).
"""
