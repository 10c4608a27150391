# Lubuntu: the LXQt desktop as a live system (a hybrid ISO whose root is a
# squashfs on the CD), user "user" logged in automatically by LightDM.
TITLE="Lubuntu"
DESCRIPTION="A fast, modern-looking desktop (LXQt) that runs straight from the disc."
SOURCE=iso
MEMORY_MIB=1024
PACKAGES="live-boot live-boot-initramfs-tools
  xserver-xorg-core xserver-xorg-input-libinput xserver-xorg-video-fbdev xserver-xorg-video-vesa
  xserver-xorg-video-qxl lightdm lightdm-gtk-greeter lxqt-core openbox
  dbus-x11 dbus-user-session x11-xserver-utils x11-utils
  cifs-utils curl xterm fonts-dejavu-core"
AGENT_WAIT_PROCESSES="openbox lxqt-panel"
AGENT_WAIT_WM=yes

flavour_configure() {
  desktop_configure lxqt
  office_desktop_configure bob
  # the window manager LXQt starts, without asking
  mkdir -p "$ROOT/etc/xdg/lxqt"
  printf '[General]\nwindow_manager=openbox\n' > "$ROOT/etc/xdg/lxqt/session.conf"
  # live-boot sets up the root; nothing to mount from fstab
  : > "$ROOT/etc/fstab"
}
