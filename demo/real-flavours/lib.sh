# Shared steps of the real flavours' builds (sourced by build-flavour.sh, run
# as root inside a private mount namespace so that every mount vanishes with
# the build). A flavour's recipe (NAME.sh) sets TITLE, DESCRIPTION, SOURCE
# (disk|iso), MEMORY_MIB, PACKAGES and may define flavour_configure.

SUITE=bookworm
# Everything a real flavour needs, whatever it is: a kernel for direct boot,
# systemd with udev, the QEMU guest agent (clock, drop caches), and a resolver
# that asks the DNS server DHCP names (dom0's, which knows NAME.xenubuntu.internal).
COMMON_PACKAGES="linux-image-amd64 initramfs-tools zstd systemd-sysv udev dbus kmod procps iproute2
  qemu-guest-agent systemd-resolved"
# Under TCG, zeroing every allocated page costs 10-20 s of boot; freed pages are
# zeroed instead, which also keeps a saved guest's RAM compressible.
KERNEL_TUNING="init_on_free=1 init_on_alloc=0"
CONSOLE="console=tty0 console=ttyS0,115200n8"

# The archives this machine's apt uses (first matching URI), so that the build
# talks to no other server.
apt_uri() {
  grep -hoE "https?://[^ \"]*$1/?( |\$)" /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1 | tr -d " " || true
}
MIRROR=${MIRROR:-$(apt_uri /debian)}
SECMIRROR=${SECMIRROR:-$(apt_uri /debian-security)}
MIRROR=${MIRROR%/}
SECMIRROR=${SECMIRROR%/}

# progress lines on stderr: seconds since the build started, and the phase
export BUILD_START=${BUILD_START:-$(date +%s)}
log_progress() { printf 'build-flavour: [%4ds] %s\n' $(($(date +%s) - BUILD_START)) "$*" >&2; }

# The package indexes this machine's apt holds for our mirrors and suites
# (apt names them after the URI). Their InRelease files identify the package
# versions a build gets.
list_prefix() { local u=${1#*://}; echo "${u//\//_}"; }
host_lists() {
  local f p
  for p in "$(list_prefix "$MIRROR")_dists_${SUITE}_" "$(list_prefix "$MIRROR")_dists_${SUITE}-updates_" \
           ${SECMIRROR:+"$(list_prefix "$SECMIRROR")_dists_${SUITE}-security_"}; do
    for f in /var/lib/apt/lists/"$p"*; do
      [ -f "$f" ] && echo "$f"
    done
  done
}
index_identity() { host_lists | grep '_InRelease$' | xargs -r cat | sha256sum | cut -c1-16; }

chroot_mounts() {  # $1 = root
  local r=$1
  mount -t proc proc "$r/proc"
  mount -t sysfs sysfs "$r/sys"
  mount --bind /dev "$r/dev"
  mount -t devpts devpts "$r/dev/pts" -o newinstance,ptmxmode=0666
  mount -t tmpfs tmpfs "$r/run"
  mkdir -p "$r/var/cache/apt/archives"
  mount --bind "$DEBS" "$r/var/cache/apt/archives"
}
chroot_umounts() {  # $1 = root; before anything deletes the tree
  local m
  for m in var/cache/apt/archives run dev/pts dev sys proc; do
    umount "$1/$m" 2>/dev/null || umount -l "$1/$m" 2>/dev/null || true
  done
}
in_root() {
  chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive "$@"
}

# The minimal Debian system every flavour starts from, kept as a tarball in the
# cache so that a rebuild neither runs debootstrap nor downloads anything.
BASE_INCLUDE="systemd-sysv,udev,dbus,kmod,procps,iproute2"
ensure_base() {  # prints the tarball's path
  local key tar tmp
  key=$( { echo "2 $SUITE $BASE_INCLUDE $MIRROR"; index_identity; } | sha256sum | cut -c1-12)
  tar=$CACHE/base-$SUITE-$key.tar.zst
  if [ ! -s "$tar" ]; then
    log_progress "debootstrap $SUITE (minbase) from $MIRROR"
    tmp=$(mktemp -d "$CACHE/.base.XXXXXX")
    debootstrap --variant=minbase --include="$BASE_INCLUDE" --cache-dir="$DEBS" \
      "$SUITE" "$tmp/root" "$MIRROR" >>"$BUILD_LOG" 2>&1
    # without the downloaded packages and indexes: the cache holds those
    tar --numeric-owner --xattrs --acls -C "$tmp/root" --exclude='./var/cache/apt/archives/*.deb' \
      --exclude='./var/lib/apt/lists/*_*' -cf - . | zstd -q -T0 -3 -o "$tar.part"
    mv "$tar.part" "$tar"
    rm -rf --one-file-system "$tmp"
  fi
  echo "$tar"
}

# apt inside the new system: this machine's mirrors, the package indexes this
# machine already holds (so the versions are those the recipe key names), no
# recommends, no documentation, no daemons started while building.
setup_apt() {
  local f
  cat > "$ROOT/etc/apt/sources.list" <<EOS
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
EOS
  [ -n "$SECMIRROR" ] && echo "deb $SECMIRROR $SUITE-security main" >> "$ROOT/etc/apt/sources.list"
  cat > "$ROOT/etc/apt/apt.conf.d/90xenubuntu" <<'EOS'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
Acquire::Check-Valid-Until "false";
EOS
  cat > "$ROOT/etc/dpkg/dpkg.cfg.d/90xenubuntu" <<'EOS'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
force-unsafe-io
EOS
  printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
  chmod 755 "$ROOT/usr/sbin/policy-rc.d"
  rm -rf "$ROOT"/var/lib/apt/lists/*
  mkdir -p "$ROOT/var/lib/apt/lists/partial"
  for f in $(host_lists); do cp "$f" "$ROOT/var/lib/apt/lists/"; done
  # only if this machine holds no index of the main suite does the build fetch them
  if ! host_lists | grep "_dists_${SUITE}_main_binary-amd64_Packages" >/dev/null; then
    log_progress "fetching package indexes"
    in_root apt-get -q update >>"$BUILD_LOG" 2>&1
  fi
}

install_packages() {  # package names
  in_root apt-get -q -y dist-upgrade >>"$BUILD_LOG" 2>&1
  # shellcheck disable=SC2068
  in_root apt-get -q -y install $@ >>"$BUILD_LOG" 2>&1
}

# Configuration every real flavour shares.
common_configure() {
  echo "$NAME" > "$ROOT/etc/hostname"
  printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n127.0.1.1 %s\n' "$NAME" > "$ROOT/etc/hosts"
  # minbase has no nsswitch.conf: without it, "localhost" goes to DNS first and fails
  printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\n' \
    > "$ROOT/etc/nsswitch.conf"
  # networking: DHCP on any wired NIC, never waited for at boot
  mkdir -p "$ROOT/etc/systemd/network"
  printf '[Match]\nName=en*\n[Network]\nDHCP=ipv4\n' > "$ROOT/etc/systemd/network/20-wired.network"
  in_root systemctl enable systemd-networkd.service >>"$BUILD_LOG" 2>&1
  in_root systemctl mask systemd-networkd-wait-online.service e2scrub_reap.service >>"$BUILD_LOG" 2>&1
  # the guest agent and its port
  in_root groupadd -f -r xenubuntu
  install -m 755 "$DEMO/guest/xenubuntu-agent" "$ROOT/usr/local/bin/xenubuntu-agent"
  install -m 755 "$DEMO/guest/xenubuntu-install" "$ROOT/usr/local/bin/xenubuntu-install"
  install -m 644 "$DEMO/guest/60-xenubuntu-guest.rules" "$ROOT/etc/udev/rules.d/60-xenubuntu-guest.rules"
  mkdir -p "$ROOT/etc/xenubuntu"
  {
    echo "FLAVOUR=$NAME"
    echo "WAIT_PROCESSES=\"${AGENT_WAIT_PROCESSES:-}\""
    echo "WAIT_PORTS=\"${AGENT_WAIT_PORTS:-}\""
    echo "WAIT_WM=${AGENT_WAIT_WM:-no}"
  } > "$ROOT/etc/xenubuntu/flavour"
  # a root shell on the serial console helps when a flavour misbehaves
  in_root passwd -d root >>"$BUILD_LOG" 2>&1
  # one machine-id for every copy (a restored guest is everybody's guest)
  : > "$ROOT/etc/machine-id"
}

# A desktop: the user "user" logged in automatically by LightDM into SESSION,
# the agent started from the session's xdg autostart.
desktop_configure() {  # $1 = X session name (/usr/share/xsessions/NAME.desktop)
  in_root useradd -m -s /bin/bash -G audio,video,xenubuntu user
  echo 'user:user' | in_root chpasswd
  in_root groupadd -f -r autologin
  in_root gpasswd -a user autologin >>"$BUILD_LOG"
  mkdir -p "$ROOT/etc/lightdm/lightdm.conf.d"
  printf '[Seat:*]\nautologin-user=user\nautologin-user-timeout=0\nautologin-session=%s\nuser-session=%s\n' \
    "$1" "$1" > "$ROOT/etc/lightdm/lightdm.conf.d/50-xenubuntu.conf"
  mkdir -p "$ROOT/etc/xdg/autostart"
  install -m 644 "$DEMO/guest/xenubuntu-agent.desktop" "$ROOT/etc/xdg/autostart/xenubuntu-agent.desktop"
  # "Install this flavour" in the desktop's menu (a live ISO's root, a squashfs, is not installed)
  if [ "$SOURCE" != iso ]; then
    install -m 644 "$DEMO/guest/xenubuntu-install.desktop" "$ROOT/usr/share/applications/xenubuntu-install.desktop"
  fi
  in_root systemctl set-default graphical.target >>"$BUILD_LOG" 2>&1
}

# Kernel modules for hardware no virtual machine has (a third of the
# installed kernel): sound, radio, cameras, most GPUs, exotic buses.
prune_modules() {
  local kver=$1 d=$ROOT/lib/modules/$1/kernel
  rm -rf "$d/sound" "$d/drivers/media" "$d/drivers/net/wireless" "$d/drivers/bluetooth" \
    "$d/drivers/infiniband" "$d/drivers/isdn" "$d/drivers/staging" "$d/drivers/iio" \
    "$d/drivers/gpu/drm/amd" "$d/drivers/gpu/drm/radeon" "$d/drivers/gpu/drm/nouveau" \
    "$d/drivers/gpu/drm/i915" "$d/net/wireless" "$d/net/mac80211" "$d/net/bluetooth"
  # of the wired network cards, those QEMU offers (virtio-net lives elsewhere)
  find "$d/drivers/net/ethernet" -mindepth 1 -maxdepth 1 ! -name intel ! -name realtek -exec rm -rf {} +
  in_root depmod "$kver"
}

finish_root() {
  rm -f "$ROOT/usr/sbin/policy-rc.d"
  rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/tmp/* "$ROOT"/var/log/*.log
  mkdir -p "$ROOT/var/lib/apt/lists/partial"
}

kernel_version() { ls "$ROOT"/boot/vmlinuz-* | sed 's/.*vmlinuz-//' | sort -V | tail -n 1; }

# The system every disk flavour shares, as one disk image in the cache: the
# base with COMMON_PACKAGES, configured as any flavour is, with no packages of
# its own. A disk flavour's image is a qcow2 layer over it holding only what the
# flavour changed, so a medium carries the shared part once (docs/flavours.md).
common_key() {
  { for f in "$DEMO/build-flavour.sh" "$RECIPES/lib.sh"; do sha256sum < "$f"; done
    echo "$SUITE $MIRROR $SECMIRROR"; index_identity
  } | sha256sum | cut -c1-12
}

# ext4 filled by mkfs.ext4 -d from a tree (no loop mount), as qcow2. Room to
# spare: used + 25% + 256 MiB.
tree_to_qcow2() {  # $1 = tree, $2 = output qcow2, $3 = scratch folder
  local used size raw=$3/.root.img
  used=$(du -sx --block-size=1M "$1" | cut -f1)
  size=$((used * 5 / 4 + 256))
  truncate -s "${size}M" "$raw"
  mkfs.ext4 -q -F -L root -E lazy_itable_init=0,lazy_journal_init=0 -d "$1" "$raw" >>"$BUILD_LOG" 2>&1
  qemu-img convert -O qcow2 "$raw" "$2"
  rm -f "$raw"
}

ensure_common_image() {  # prints the image's path; the caller holds the cache's lock
  local key img tmp
  key=$(common_key)
  img=$CACHE/common-$key.qcow2
  if [ -s "$img" ] && qemu-img check -q "$img" >/dev/null 2>&1; then echo "$img"; return; fi
  log_progress "common system shared by the disk flavours (key $key)"
  tmp=$(mktemp -d "$CACHE/.common.XXXXXX")
  (
    ROOT=$tmp/root NAME=common
    mkdir -p "$ROOT"
    zstd -q -dc "$(ensure_base)" | tar --numeric-owner --xattrs --acls -C "$ROOT" -xpf -
    chroot_mounts "$ROOT"
    trap 'chroot_umounts "$ROOT"' EXIT
    setup_apt
    install_packages $COMMON_PACKAGES
    common_configure
    prune_modules "$(kernel_version)"
    finish_root
    chroot_umounts "$ROOT"
    trap - EXIT
    rm -f "$ROOT"/var/cache/apt/archives/*.deb
    tree_to_qcow2 "$ROOT" "$tmp/common.qcow2" "$tmp"
  ) >&2
  chmod a-w "$tmp/common.qcow2"
  mv "$tmp/common.qcow2" "$img"
  rm -rf --one-file-system "$tmp"
  echo "$img"
}

# The installed system as a disk: a qcow2 layer over the common image. The layer
# is exported as a file (qemu-storage-daemon's FUSE export), its ext4 grown to
# the flavour's size and mounted in user space (fuse2fs), and the flavour's tree
# copied onto it by rsync comparing contents: files the common system has alike
# stay where they are, in the common image; the rest lands in the layer.
make_disk() {  # $1 = output qcow2
  local common used size common_size qsd layer=$WORKDIR/layer.img fs=$WORKDIR/fs
  common=$(ensure_common_image)
  used=$(du -sx --block-size=1M "$ROOT" | cut -f1)
  size=$((used * 5 / 4 + 256))
  common_size=$(( $(qemu-img info --output=json "$common" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p') >> 20 ))
  [ "$size" -ge "$common_size" ] || size=$common_size
  qemu-img create -q -f qcow2 -F qcow2 -b "$common" "$1" "${size}M"
  : > "$layer"
  qemu-storage-daemon --daemonize --pidfile "$WORKDIR/qsd.pid" \
    --blockdev driver=file,node-name=file,filename="$1" \
    --blockdev driver=qcow2,node-name=layer,file=file,discard=unmap,detect-zeroes=unmap \
    --export type=fuse,id=layer,node-name=layer,mountpoint="$layer",writable=on >>"$BUILD_LOG" 2>&1
  e2fsck -fy "$layer" >>"$BUILD_LOG" 2>&1 || true
  resize2fs "$layer" "${size}M" >>"$BUILD_LOG" 2>&1
  mkdir -p "$fs"
  fuse2fs -o rw "$layer" "$fs" >>"$BUILD_LOG" 2>&1
  rsync -aHAX --numeric-ids --delete --checksum "$ROOT"/ "$fs"/ >>"$BUILD_LOG" 2>&1
  umount "$fs"
  e2fsck -fn "$layer" >>"$BUILD_LOG" 2>&1
  qsd=$(cat "$WORKDIR/qsd.pid")
  kill "$qsd"
  while kill -0 "$qsd" 2>/dev/null; do sleep 0.1; done  # its writes are all in the layer file
  # named relative to the finished build's folder, next to the common image in the cache
  qemu-img rebase -u -F qcow2 -b "../$(basename "$common")" "$1"
  rm -f "$layer"
}

# The live system as a hybrid ISO (BIOS and EFI, CD or USB): the root as
# live/filesystem.squashfs, kernel and initrd next to it, GRUB booting them.
make_iso() {  # $1 = output ISO, $2 = kernel options
  local tree=$WORKDIR/iso
  mkdir -p "$tree/live" "$tree/boot/grub"
  # zstd level 6: a few per cent larger than 15, several times quicker to build
  mksquashfs "$ROOT" "$tree/live/filesystem.squashfs" -noappend -comp zstd -Xcompression-level 6 -b 128K \
    -wildcards -e 'boot/initrd.img*' 'boot/vmlinuz*' 'var/cache/apt/archives/*' >>"$BUILD_LOG" 2>&1
  cp "$OUTDIR/vmlinuz" "$tree/live/vmlinuz"
  cp "$OUTDIR/initrd.img" "$tree/live/initrd.img"
  cat > "$tree/boot/grub/grub.cfg" <<EOG
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=3
set default=0
menuentry "$TITLE (live)" {
  linux /live/vmlinuz $2
  initrd /live/initrd.img
}
EOG
  grub-mkrescue -o "$1" "$tree" -- -volid "$(echo "$NAME" | tr a-z A-Z)" >>"$BUILD_LOG" 2>&1
}

# The office (docs/office.md): the server's users, share and calendar, and the
# desktops set up as one of those users. Demo passwords: each user's own name.
OFFICE_USERS="alice bob carol"
OFFICE_SERVER=server.xenubuntu.internal

# A desktop of the office, as office user $1: the shared folder mounted at
# ~/Office when first used (and again by itself after the server was away), the
# shared calendar's address, and the office worker in a window of the session.
office_desktop_configure() {  # $1 = office user
  local u=$1 home=$ROOT/home/user
  install -d -m 700 "$ROOT/etc/xenubuntu/office"
  printf 'username=%s\npassword=%s\n' "$u" "$u" > "$ROOT/etc/xenubuntu/office/share.cred"
  chmod 600 "$ROOT/etc/xenubuntu/office/share.cred"
  cat > "$ROOT/etc/systemd/system/home-user-Office.mount" <<EOU
[Unit]
Description=The office's shared folder on the server
[Mount]
What=//$OFFICE_SERVER/office
Where=/home/user/Office
Type=cifs
Options=credentials=/etc/xenubuntu/office/share.cred,uid=user,gid=user,file_mode=0664,dir_mode=0775,echo_interval=5,nofail
TimeoutSec=20
EOU
  cat > "$ROOT/etc/systemd/system/home-user-Office.automount" <<'EOU'
[Unit]
Description=The office's shared folder, mounted when first used
[Automount]
Where=/home/user/Office
[Install]
WantedBy=remote-fs.target
EOU
  in_root systemctl enable home-user-Office.automount >>"$BUILD_LOG" 2>&1
  mkdir -p "$home/.config/xenubuntu"
  printf 'OFFICE_USER=%s\nOFFICE_PASSWORD=%s\nSHARE=/home/user/Office\nCALENDAR_URL=http://%s:5232/office/calendar/\n' \
    "$u" "$u" "$OFFICE_SERVER" > "$home/.config/xenubuntu/office"
  chmod 700 "$home/.config/xenubuntu"
  chmod 600 "$home/.config/xenubuntu/office"
  in_root chown -R user:user /home/user/.config
  install -m 755 "$DEMO/guest/xenubuntu-office-worker" "$ROOT/usr/local/bin/xenubuntu-office-worker"
  install -m 644 "$DEMO/guest/xenubuntu-office.desktop" "$ROOT/etc/xdg/autostart/xenubuntu-office.desktop"
}

# The office's server: a Samba share "office" writable by the office group, and
# Radicale (CalDAV) with the office's shared calendar at /office/calendar/.
office_server_configure() {
  local u col=$ROOT/var/lib/radicale/collections/collection-root/office/calendar
  in_root groupadd -f office
  for u in $OFFICE_USERS; do
    in_root useradd -M -N -g office -s /usr/sbin/nologin "$u"
    printf '%s\n%s\n' "$u" "$u" | in_root smbpasswd -s -a "$u" >>"$BUILD_LOG" 2>&1
  done
  mkdir -p "$ROOT/srv/office"
  in_root chown root:office /srv/office
  chmod 2775 "$ROOT/srv/office"
  cat >> "$ROOT/etc/samba/smb.conf" <<'EOC'

[office]
   comment = The office's shared folder
   path = /srv/office
   read only = no
   valid users = @office
   force group = office
   create mask = 0664
   directory mask = 2775
EOC
  cat > "$ROOT/etc/radicale/config" <<'EOC'
# XenUbuntu's office server: the office's users, plain passwords (a demo), and
# the rights in /etc/radicale/rights.
[server]
hosts = 0.0.0.0:5232
[auth]
type = htpasswd
htpasswd_filename = /etc/radicale/users
htpasswd_encryption = plain
[rights]
type = from_file
file = /etc/radicale/rights
[storage]
filesystem_folder = /var/lib/radicale/collections
EOC
  for u in $OFFICE_USERS; do echo "$u:$u"; done > "$ROOT/etc/radicale/users"
  in_root chown root:radicale /etc/radicale/users
  chmod 640 "$ROOT/etc/radicale/users"
  cat > "$ROOT/etc/radicale/rights" <<'EOC'
# Everyone of the office reads the root and their own principal, and reads and
# writes the calendars under /office/.
[root]
user: .+
collection:
permissions: R
[principal]
user: .+
collection: {user}
permissions: RW
[office]
user: .+
collection: office
permissions: R
[office-calendars]
user: .+
collection: office/[^/]+
permissions: rw
EOC
  mkdir -p "$col"
  printf '{"D:displayname": "Office", "C:calendar-description": "The office'"'"'s shared calendar", "tag": "VCALENDAR"}\n' \
    > "$col/.Radicale.props"
  in_root chown -R radicale:radicale /var/lib/radicale/collections
}
