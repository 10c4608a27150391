# Ubuntu Server: no graphical session; Samba (file shares) and Radicale
# (calendars and contacts) running.
TITLE="Ubuntu Server"
DESCRIPTION="The office's server, without a desktop: shared folders (Samba) and calendars (Radicale)."
SOURCE=disk
MEMORY_MIB=512
PACKAGES="samba radicale"
# ready once Samba and Radicale answer on their ports
AGENT_WAIT_PORTS="445 5232"

flavour_configure() {
  install -m 644 "$DEMO/guest/xenubuntu-agent.service" "$ROOT/etc/systemd/system/xenubuntu-agent.service"
  in_root systemctl enable smbd.service radicale.service xenubuntu-agent.service >>"$BUILD_LOG" 2>&1
  # NetBIOS naming is not needed for shares by address, and nmbd holds up smbd
  # until a network interface is configured
  in_root systemctl mask nmbd.service >>"$BUILD_LOG" 2>&1
  office_server_configure
  in_root systemctl set-default multi-user.target >>"$BUILD_LOG" 2>&1
}
