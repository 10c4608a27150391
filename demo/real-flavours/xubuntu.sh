# Xubuntu: the Xfce desktop, user "user" logged in automatically by LightDM.
TITLE="Xubuntu"
DESCRIPTION="A light, classic desktop (Xfce) with a panel, a file manager and a terminal."
SOURCE=disk
MEMORY_MIB=1024
PACKAGES="xserver-xorg-core xserver-xorg-input-libinput xserver-xorg-video-fbdev xserver-xorg-video-vesa
  xserver-xorg-video-qxl lightdm lightdm-gtk-greeter xfce4 xfce4-terminal xfce4-notifyd
  dbus-x11 dbus-user-session at-spi2-core x11-xserver-utils x11-utils
  cifs-utils curl xterm
  fonts-dejavu-core adwaita-icon-theme tango-icon-theme desktop-base"
# ready once the window manager, the panel and the desktop run
AGENT_WAIT_PROCESSES="xfwm4 xfce4-panel xfdesktop"
AGENT_WAIT_WM=yes

flavour_configure() {
  desktop_configure xfce
  office_desktop_configure alice
}
