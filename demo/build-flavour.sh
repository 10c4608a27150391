#!/bin/bash
# Builds a real flavour (xubuntu, lubuntu, server) from Debian 12's packages,
# or finds it already built, and prints the folder that holds it:
#   build-flavour.sh NAME           build if needed; prints the ready folder
#   build-flavour.sh --check NAME   prints the folder if a valid build is cached, else fails
#   build-flavour.sh --key NAME     prints the recipe key
# The cache is machine-wide (XENUBUNTU_CACHE, default /var/cache/xenubuntu/flavours):
#   NAME-KEY/         a finished build; KEY hashes the recipe (these scripts,
#                     the guest files, the package indexes the versions come from)
#     flavour.json    name, title, description, source, memory, boot files, cmdline
#     vmlinuz initrd.img root.qcow2 | NAME.iso    (disk | live ISO)
#     build.log
#     MANIFEST        sha256, size and name of every file; written last
#   debs/             the .deb files every build shares (a rebuild downloads nothing)
#   base-*.tar.zst    the debootstrapped minimal system every flavour starts from
#   .lock             serialises builders (flock); .NAME-KEY.lock guards one entry
# A build is made in a temporary folder and renamed into place once complete;
# an entry that fails verification is removed and built again. Needs root.
set -euo pipefail
DEMO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RECIPES=$DEMO/real-flavours
CACHE=${XENUBUNTU_CACHE:-/var/cache/xenubuntu/flavours}
DEBS=$CACHE/debs
BIG=$((64 * 1024 * 1024))   # files above this are checked by size (and qemu-img), not hashed

usage() { echo "usage: build-flavour.sh [--check|--key] NAME" >&2; exit 2; }
MODE=build
case ${1:-} in --check) MODE=check; shift ;; --key) MODE=key; shift ;; --inside) MODE=inside; shift ;; esac
NAME=${1:-}
[ -n "$NAME" ] && [ -f "$RECIPES/$NAME.sh" ] || usage
# shellcheck source=real-flavours/lib.sh
. "$RECIPES/lib.sh"
# shellcheck source=/dev/null
. "$RECIPES/$NAME.sh"

recipe_key() {
  { for f in "$DEMO/build-flavour.sh" "$RECIPES/lib.sh" "$RECIPES/$NAME.sh" "$DEMO"/guest/*; do
      echo "${f#"$DEMO"/}"; sha256sum < "$f"
    done
    echo "$SUITE $MIRROR $SECMIRROR"; index_identity
  } | sha256sum | cut -c1-12
}

# A cached entry is valid when its MANIFEST is complete and every file in it
# is present with its size; small files match their sha256, qcow2 images pass
# qemu-img check.
verify_entry() {  # $1 = folder
  local d=$1 sum size file
  [ -f "$d/MANIFEST" ] && [ "$(tail -n 1 "$d/MANIFEST")" = "# complete" ] || return 1
  grep -q ' flavour.json$' "$d/MANIFEST" || return 1
  while read -r sum size file; do
    [ "$sum" = "#" ] && continue
    [ -f "$d/$file" ] && [ "$(stat -c %s "$d/$file")" = "$size" ] || return 1
    if [ "$size" -le $BIG ]; then
      [ "$(sha256sum < "$d/$file" | cut -d' ' -f1)" = "$sum" ] || return 1
    elif [[ $file == *.qcow2 ]]; then
      qemu-img check -q "$d/$file" >/dev/null 2>&1 || return 1
    fi
  done < "$d/MANIFEST"
  # a disk layer's common system (in the cache, next to the build) must be whole too
  if [ -f "$d/root.qcow2" ]; then
    local backing
    backing=$(qemu-img info --output=json "$d/root.qcow2" | sed -n 's/.*"full-backing-filename": "\(.*\)".*/\1/p')
    [ -z "$backing" ] || qemu-img check -q "$backing" >/dev/null 2>&1 || return 1
  fi
}

write_manifest() {  # $1 = folder
  local d=$1 f size
  (cd "$d"
   for f in *; do
     case $f in MANIFEST*) continue ;; esac
     size=$(stat -c %s "$f")
     if [ "$size" -le $BIG ]; then echo "$(sha256sum < "$f" | cut -d' ' -f1) $size $f"
     else echo "- $size $f"; fi
   done
   echo "# complete") > "$d/MANIFEST.part"
  mv "$d/MANIFEST.part" "$d/MANIFEST"
}

write_metadata() {  # $1 = folder, $2 = cmdline, $3 = key
  NAME=$NAME TITLE=$TITLE DESCRIPTION=$DESCRIPTION SOURCE=$SOURCE MEMORY_MIB=$MEMORY_MIB \
  CMDLINE=$2 KEY=$3 KVER=$(cat "$1/.kernel-version") python3 - "$1/flavour.json" <<'EOP'
import json, os, sys
e = os.environ
meta = {
    "name": e["NAME"], "title": e["TITLE"], "description": e["DESCRIPTION"],
    "source": e["SOURCE"], "memory_mib": int(e["MEMORY_MIB"]),
    "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": e["CMDLINE"],
    "guest_port": "org.xenubuntu.guest.0", "agent_port": "org.qemu.guest_agent.0",
    "kernel_version": e["KVER"], "debian": "12 (bookworm)", "key": e["KEY"],
}
if e["SOURCE"] == "disk":
    meta["disk"] = "root.qcow2"
else:
    meta["iso"] = e["NAME"] + ".iso"
with open(sys.argv[1], "w") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
EOP
  rm -f "$1/.kernel-version"
}

cmdline() {
  if [ "$SOURCE" = iso ]; then echo "boot=live live-media-path=/live $CONSOLE $KERNEL_TUNING quiet"
  else echo "root=/dev/vda rw $CONSOLE $KERNEL_TUNING quiet"; fi
}

# The build proper; runs in its own mount namespace (build-flavour.sh --inside).
build_inside() {
  WORKDIR=$BUILD_WORKDIR OUTDIR=$BUILD_WORKDIR/out ROOT=$BUILD_WORKDIR/root BUILD_LOG=$BUILD_WORKDIR/out/build.log
  local base kver
  base=$(ensure_base)
  log_progress "$NAME: unpacking the base system"
  mkdir -p "$ROOT"
  zstd -q -dc "$base" | tar --numeric-owner --xattrs --acls -C "$ROOT" -xpf -
  chroot_mounts "$ROOT"
  trap 'chroot_umounts "$ROOT"' EXIT
  setup_apt
  log_progress "$NAME: installing packages"
  # shellcheck disable=SC2086
  install_packages $COMMON_PACKAGES $PACKAGES
  log_progress "$NAME: configuring"
  common_configure
  flavour_configure
  mkdir -p "$ROOT/etc/initramfs-tools/conf.d"
  if [ "$SOURCE" = disk ]; then
    # a disk flavour boots from virtio-blk only: a small initrd unpacks faster
    echo MODULES=list > "$ROOT/etc/initramfs-tools/conf.d/xenubuntu.conf"
    printf '%s\n' virtio_pci virtio_blk ext4 crc32c_generic > "$ROOT/etc/initramfs-tools/modules"
    echo '/dev/vda / ext4 defaults,noatime 0 0' > "$ROOT/etc/fstab"
  fi
  echo COMPRESS=zstd >> "$ROOT/etc/initramfs-tools/conf.d/xenubuntu.conf"
  prune_modules "$(kernel_version)"
  log_progress "$NAME: initrd"
  in_root update-initramfs -u -k all >>"$BUILD_LOG" 2>&1
  kver=$(kernel_version)
  cp "$ROOT/boot/vmlinuz-$kver" "$OUTDIR/vmlinuz"
  cp "$ROOT/boot/initrd.img-$kver" "$OUTDIR/initrd.img"
  echo "$kver" > "$OUTDIR/.kernel-version"
  finish_root
  echo "installed: $(du -sxh "$ROOT" | cut -f1), $(in_root dpkg-query -W | wc -l) packages" >>"$BUILD_LOG"
  chroot_umounts "$ROOT"
  trap - EXIT
  rm -f "$ROOT"/var/cache/apt/archives/*.deb
  if findmnt -rn -o TARGET | grep -q "^$ROOT/"; then echo "build-flavour: $ROOT still has mounts" >&2; exit 1; fi
  if [ "$SOURCE" = disk ]; then
    log_progress "$NAME: disk image"
    make_disk "$OUTDIR/root.qcow2"
  else
    log_progress "$NAME: squashfs and ISO"
    make_iso "$OUTDIR/$NAME.iso" "$(cmdline)"
  fi
  rm -rf --one-file-system "$ROOT"
}

if [ "$MODE" = inside ]; then
  build_inside
  exit 0
fi

KEY=$(recipe_key)
if [ "$MODE" = key ]; then echo "$KEY"; exit 0; fi
ENTRY=$CACHE/$NAME-$KEY
[ "$(id -u)" = 0 ] || { echo "build-flavour: needs root (debootstrap, chroot)" >&2; exit 1; }
mkdir -p "$CACHE" "$DEBS"
# Two locks: the entry's own (whoever asks for the same build waits for it and
# then finds it ready; checks of other entries never wait) and, while building,
# the cache's (builders run one at a time: each uses every core it gets).
lock() {  # $1 = fd, $2 = file
  eval "exec $1>\"\$2\""
  if ! flock -n "$1"; then
    log_progress "$NAME: waiting for another build"
    flock "$1"
  fi
}
lock 7 "$CACHE/.$NAME-$KEY.lock"
if [ -d "$ENTRY" ]; then
  if verify_entry "$ENTRY"; then echo "$ENTRY"; exit 0; fi
  [ "$MODE" = check ] && { echo "build-flavour: $ENTRY is damaged" >&2; exit 1; }
  log_progress "$NAME: cached build $ENTRY is damaged or incomplete; building it again"
  chmod -R u+w "$ENTRY"
  rm -rf --one-file-system "$ENTRY"
fi
[ "$MODE" = check ] && { echo "build-flavour: no build of $NAME with key $KEY" >&2; exit 1; }
lock 8 "$CACHE/.lock"

# Builds that were interrupted left their folders; nobody else builds while we hold the lock.
for stale in "$CACHE"/.build-* "$CACHE"/.base.* "$CACHE"/.common.*; do
  [ -e "$stale" ] && rm -rf --one-file-system "$stale"
done
BUILD_WORKDIR=$(mktemp -d "$CACHE/.build-$NAME-$KEY.XXXXXX")
export BUILD_WORKDIR
mkdir -p "$BUILD_WORKDIR/out"
log_progress "$NAME: building (key $KEY, log $BUILD_WORKDIR/out/build.log)"
if ! unshare -m --propagation private "$DEMO/build-flavour.sh" --inside "$NAME"; then
  echo "build-flavour: building $NAME failed; the end of its log:" >&2
  tail -n 25 "$BUILD_WORKDIR/out/build.log" >&2 || true
  rm -rf --one-file-system "$BUILD_WORKDIR"
  exit 1
fi
write_metadata "$BUILD_WORKDIR/out" "$(cmdline)" "$KEY"
write_manifest "$BUILD_WORKDIR/out"
chmod a-w "$BUILD_WORKDIR"/out/*
mv "$BUILD_WORKDIR/out" "$ENTRY"
rm -rf --one-file-system "$BUILD_WORKDIR"
log_progress "$NAME: ready: $(du -sh --apparent-size "$ENTRY" | cut -f1) in $ENTRY"
echo "$ENTRY"
